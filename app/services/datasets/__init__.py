"""Datasets: uploads, their formats, their stored rows and their token reports.

- `library`: receive an upload, store and ingest it, list/show/delete/re-import (re-exported here:
  `from app.services import datasets; datasets.create_dataset(...)`);
- `readers`: stream the rows of a .jsonl/.json/.csv/.parquet file, bounded;
- `formats/`: one class per dataset format (detect, normalise, its row errors), one registry list;
- `ingest`: validate and normalise a stored file, write its rows and split;
- `store`: read a dataset's normalised rows, whole or split (the one reader, the worker's too);
- `reports`: ask for token reports (a worker computes them);
- `errors`: `RowError` and the `DatasetError` family.
"""

from __future__ import annotations

from app.services.datasets.library import (
    INGEST_LOCK_FILENAME,
    UPLOAD_PREFIX,
    UPLOAD_SUFFIX,
    DatasetInUse,
    DatasetNotFound,
    DatasetServiceError,
    ReadableUpload,
    UnsupportedFileType,
    UploadTooLarge,
    create_dataset,
    dataset_public,
    delete_dataset,
    delete_refusal,
    display_filename,
    error_body,
    file_type_of,
    find_by_name,
    get_dataset,
    import_local_file,
    jobs_using,
    list_datasets,
    preview_rows,
    receive_upload,
    reimport_dataset,
    suited_methods,
    sweep_orphan_datasets,
    sweep_stale_uploads,
    too_large,
    tool_rows,
)

__all__ = [
    "INGEST_LOCK_FILENAME",
    "UPLOAD_PREFIX",
    "UPLOAD_SUFFIX",
    "DatasetInUse",
    "DatasetNotFound",
    "DatasetServiceError",
    "ReadableUpload",
    "UnsupportedFileType",
    "UploadTooLarge",
    "create_dataset",
    "dataset_public",
    "delete_dataset",
    "delete_refusal",
    "display_filename",
    "error_body",
    "file_type_of",
    "find_by_name",
    "get_dataset",
    "import_local_file",
    "jobs_using",
    "list_datasets",
    "preview_rows",
    "receive_upload",
    "reimport_dataset",
    "suited_methods",
    "sweep_orphan_datasets",
    "sweep_stale_uploads",
    "too_large",
    "tool_rows",
]
