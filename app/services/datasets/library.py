"""Datasets: receive an upload under the size cap, store it under a server-made id, ingest it, and
list, show and delete the results.

A dataset lives in `datasets_dir/<uuid hex>/`: `original.<type>` (the upload as sent),
`normalized.jsonl` and `split.json` (see `ingest` and `store`). The user's file name is display text.
While it is ingested the folder also holds `.ingest.lock`, locked (flock) by the ingesting process:
a folder with no database row, no `split.json` and no live lock is what a killed server left, and
the next start sweeps it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from app import faults
from app.dataset_errors import DatasetError
from app.dataset_store import SPLIT_FILENAME, DatasetRowsMissing, iter_rows
from app.db import Database
from app.errors import UserError
from app.models import Dataset, DatasetReport, Job, JobStatus
from app.services.datasets.formats import methods_of
from app.services.datasets.ingest import ingest_dataset
from app.services.datasets.readers import ACCEPTED_FILE_TYPES, IngestLimits
from app.settings import Settings

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 1024 * 1024
INGEST_LOCK_FILENAME = ".ingest.lock"
UPLOAD_PREFIX = "upload-"
UPLOAD_SUFFIX = ".part"
_DATASET_ID = re.compile(r"[0-9a-f]{32}")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class DatasetServiceError(UserError):
    """A request about datasets that cannot be served; carries its HTTP status."""


class UploadTooLarge(DatasetServiceError):
    status_code = 413
    code = "upload_too_large"


class UnsupportedFileType(DatasetServiceError):
    status_code = 415
    code = "unsupported_file_type"


class DatasetNotFound(DatasetServiceError):
    status_code = 404
    code = "dataset_not_found"


class DatasetInUse(DatasetServiceError):
    status_code = 409
    code = "dataset_in_use"


class ReadableUpload(Protocol):
    """What an upload must offer: Starlette's UploadFile does."""

    async def read(self, size: int = -1) -> bytes: ...


def file_type_of(filename: str) -> str:
    """The accepted file type named by `filename`'s extension, or UnsupportedFileType (415)."""
    suffix = Path(display_filename(filename)).suffix.lower().lstrip(".")
    if suffix not in ACCEPTED_FILE_TYPES:
        accepted = ", ".join(f".{t}" for t in ACCEPTED_FILE_TYPES)
        shown = f'Files of type ".{suffix}" are' if suffix else "Files without an extension are"
        raise UnsupportedFileType(
            f"{shown} not accepted; upload one of: {accepted}",
            hint="Export the data as JSON Lines (.jsonl), one example per line.",
        )
    return suffix


def display_filename(filename: str) -> str:
    """The user's file name reduced to display text: no folders, no control characters."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return _CONTROL_CHARACTERS.sub("", name)[:255]


async def receive_upload(upload: ReadableUpload, settings: Settings) -> tuple[Path, int]:
    """Copy the upload to a temp file in `tmp_dir`, counting bytes; over the cap: UploadTooLarge
    (413) and the temp file is gone."""
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    temporary = settings.tmp_dir / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}{UPLOAD_SUFFIX}"
    size = 0
    try:
        with temporary.open("wb") as out:
            while chunk := await upload.read(UPLOAD_CHUNK_BYTES):
                size += len(chunk)
                if size > settings.upload_max_bytes:
                    raise too_large(settings)
                out.write(chunk)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary, size


def too_large(settings: Settings) -> UploadTooLarge:
    return UploadTooLarge(
        f"the upload is larger than the limit of {settings.upload_max_bytes} bytes",
        hint="Split the file, or ask the operator to raise TUNEBOARD_UPLOAD_MAX_BYTES.",
    )


def create_dataset(
    db: Database,
    settings: Settings,
    *,
    upload_path: Path,
    size_bytes: int,
    filename: str,
    name: str | None = None,
    column_mapping: dict[str, str] | None = None,
    drop_bad_rows: bool = False,
    substitutions: dict[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
    recorded_with: Callable[[Session, Dataset], None] | None = None,
) -> Dataset:
    """Move a received upload into its own folder, ingest it and record it.

    Raises DatasetError (nothing is kept) when the file as a whole cannot be used; a file with bad
    rows is kept with status invalid unless `drop_bad_rows`. `substitutions` (placeholder name ->
    value) are made in the rows and kept in the dataset's report, so a re-import makes them too;
    so are `tools` (for every row without its own). `recorded_with(session, dataset)` makes the
    writes that must commit with the dataset's row or not at all (a Hub import's outcome); what
    it raises leaves nothing kept, as a DatasetError does.
    """
    file_type = file_type_of(filename)
    dataset_id = uuid.uuid4().hex
    folder = settings.datasets_dir / dataset_id
    folder.mkdir(parents=True)
    lock = (folder / INGEST_LOCK_FILENAME).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = folder / f"original.{file_type}"
        os.replace(upload_path, stored)
        result = ingest_dataset(
            stored,
            file_type,
            column_mapping=column_mapping,
            drop_bad_rows=drop_bad_rows,
            limits=IngestLimits.from_settings(settings),
            substitutions=substitutions,
            tools=tools,
        )
        shown_name = display_filename(filename)
        dataset = Dataset(
            id=dataset_id,
            # Display text: no control characters (NUL also breaks PostgreSQL text columns).
            name=(_CONTROL_CHARACTERS.sub("", name or "").strip() or Path(shown_name).stem)[:200]
            or "dataset",
            original_filename=shown_name,
            file_type=file_type,
            format=result.format,
            status=result.status,
            size_bytes=size_bytes,
            rows=result.rows,
            valid_rows=result.valid_rows,
            dropped_rows=result.dropped_rows,
            error_count=result.error_count,
            errors=result.errors,
            column_mapping=column_mapping or {},
            eval_rows=result.eval_rows,
            split_seed=result.split_seed,
            report=result.report,
        )
        with db.write() as session:
            session.add(dataset)
            if recorded_with is not None:
                session.flush()  # the row first: what it records may refer to it
                recorded_with(session, dataset)
        (folder / INGEST_LOCK_FILENAME).unlink()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        upload_path.unlink(missing_ok=True)
        raise
    finally:
        lock.close()
    return dataset


def import_local_file(
    db: Database, settings: Settings, path: Path, *, name: str, is_demo: bool = False
) -> Dataset:
    """Import a file already on this machine (the demo dataset) exactly as an upload would be."""
    temporary = settings.tmp_dir / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}{UPLOAD_SUFFIX}"
    shutil.copyfile(path, temporary)
    dataset = create_dataset(
        db,
        settings,
        upload_path=temporary,
        size_bytes=path.stat().st_size,
        filename=path.name,
        name=name,
    )
    if is_demo:
        with db.write() as session:
            dataset.is_demo = True
            session.add(dataset)
    return dataset


def suited_methods(dataset: Dataset) -> list[str]:
    """The training methods the dataset's rows suit: ["sft"], or ["dpo", "orpo"] for pairs."""
    return list(methods_of(dataset.format))


def tool_rows(dataset: Dataset) -> int:
    """How many of the dataset's rows define tools (they train only on a template that takes
    them)."""
    return int((dataset.report or {}).get("tool_rows", 0))


def dataset_public(dataset: Dataset) -> dict[str, Any]:
    """A dataset as the API lists it: its record (`format` names the detected shape) and the
    training methods it suits."""
    return {**dataset.model_dump(mode="json"), "methods": suited_methods(dataset)}


def find_by_name(db: Database, name: str) -> Dataset | None:
    with db.read() as session:
        return session.exec(select(Dataset).where(Dataset.name == name)).first()


def list_datasets(db: Database) -> list[Dataset]:
    with db.read() as session:
        return list(session.exec(select(Dataset).order_by(col(Dataset.created_at).desc())))


def get_dataset(db: Database, dataset_id: str) -> Dataset:
    """The dataset with this id, or DatasetNotFound (404). Ids that are not uuid hex never match."""
    if _DATASET_ID.fullmatch(dataset_id):
        with db.read() as session:
            dataset = session.get(Dataset, dataset_id)
        if dataset is not None:
            return dataset
    raise DatasetNotFound(f"No dataset with id {dataset_id[:64]!r}")


def jobs_using(db: Database, dataset_id: str) -> list[Job]:
    """Jobs that refer to the dataset, newest first."""
    with db.read() as session:
        return _jobs_using(session, dataset_id)


def _jobs_using(session: Session, dataset_id: str) -> list[Job]:
    """The jobs that train on the dataset, newest first: as their dataset, or as one of their
    `datasets` (a job's config lists those; only the first is its `dataset_id`)."""
    return [
        job
        for job in session.exec(select(Job).order_by(col(Job.id).desc()))
        if job.dataset_id == dataset_id
        or any(share.get("id") == dataset_id for share in job.config.get("datasets") or [])
    ]


def delete_refusal(jobs: list[Job]) -> DatasetInUse | None:
    """Why the dataset cannot be deleted while these jobs refer to it, or None when it can."""
    if not jobs:
        return None
    active = [j for j in jobs if j.status in (JobStatus.queued, JobStatus.running)]
    listed = ", ".join(str(j.id) for j in (active or jobs)[:10])
    if active:
        return DatasetInUse(
            f"job(s) {listed} are queued or running on this dataset",
            hint="Cancel them (or wait for them to finish) and delete those jobs first.",
        )
    return DatasetInUse(
        f"the dataset is used by job(s) {listed}",
        hint="Delete those jobs first; a job keeps its dataset for resume and history.",
    )


def delete_dataset(db: Database, settings: Settings, dataset_id: str) -> None:
    """Delete the record, its reports and its folder; refused (409) while a job refers to it
    (a finished job keeps its dataset for history and retry).

    On a full disk SQLite may have no room for the write-ahead log the delete needs: then the
    folder goes first (which frees the room) and the delete is tried again, so a user can free
    space through the app."""
    dataset = get_dataset(db, dataset_id)
    try:
        _delete_dataset_rows(db, dataset.id)
    except SQLAlchemyError as error:
        if not faults.is_disk_full(error):
            raise
        with db.read() as session:
            refusal = delete_refusal(_jobs_using(session, dataset.id))
        if refusal is not None:
            raise refusal from None
        _remove_folder(settings, dataset.id)
        _delete_dataset_rows(db, dataset.id)
        return
    _remove_folder(settings, dataset.id)


def _delete_dataset_rows(db: Database, dataset_id: str) -> None:
    with db.write() as session:
        jobs = _jobs_using(session, dataset_id)
        refusal = delete_refusal(jobs)
        if refusal is not None:
            raise refusal
        for report in session.exec(
            select(DatasetReport).where(DatasetReport.dataset_id == dataset_id)
        ):
            session.delete(report)
        row = session.get(Dataset, dataset_id)
        if row is not None:
            session.delete(row)


def _remove_folder(settings: Settings, dataset_id: str) -> None:
    folder = _folder_of(settings, dataset_id)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def reimport_dataset(
    db: Database,
    settings: Settings,
    dataset_id: str,
    *,
    drop_bad_rows: bool = True,
    substitutions: dict[str, str] | None = None,
) -> Dataset:
    """Ingest the stored upload again (same column mapping), e.g. dropping bad rows this time,
    or with placeholder `substitutions` (None: those of the last import), without uploading it
    again; the upload's tools for every row are given again. Its token reports are deleted: the rows may have changed."""
    dataset = get_dataset(db, dataset_id)
    refusal = delete_refusal(
        [j for j in jobs_using(db, dataset.id) if j.status in (JobStatus.queued, JobStatus.running)]
    )
    if refusal is not None:
        raise refusal  # a running job reads normalized.jsonl: do not rewrite it under it
    folder = _folder_of(settings, dataset.id)
    stored = folder / f"original.{dataset.file_type}" if folder is not None else None
    if stored is None or not stored.is_file():
        raise DatasetNotFound(
            "The uploaded file of this dataset is gone from the data dir",
            hint="Upload the file again.",
        )
    result = ingest_dataset(
        stored,
        dataset.file_type,
        column_mapping=dataset.column_mapping or None,
        drop_bad_rows=drop_bad_rows,
        split_seed=dataset.split_seed,
        limits=IngestLimits.from_settings(settings),
        substitutions=substitutions
        if substitutions is not None
        else dataset.report.get("substitutions") or None,
        tools=dataset.report.get("tools") or None,
    )
    with db.write() as session:
        row = session.get(Dataset, dataset.id)
        if row is None:
            raise DatasetNotFound(f"No dataset with id {dataset.id!r}")
        row.format = result.format
        row.status = result.status
        row.rows = result.rows
        row.valid_rows = result.valid_rows
        row.dropped_rows = result.dropped_rows
        row.error_count = result.error_count
        row.errors = result.errors
        row.eval_rows = result.eval_rows
        row.report = result.report
        session.add(row)
        for report in session.exec(
            select(DatasetReport).where(DatasetReport.dataset_id == dataset.id)
        ):
            session.delete(report)
    return get_dataset(db, dataset.id)


def preview_rows(settings: Settings, dataset: Dataset, limit: int = 20) -> list[dict[str, Any]]:
    """The first `limit` normalised rows, as stored (shapes in `formats/base.py`)."""
    if _folder_of(settings, dataset.id) is None:
        return []
    try:
        return list(islice(iter_rows(settings, dataset.id), limit))
    except DatasetRowsMissing:
        return []


def _folder_of(settings: Settings, dataset_id: str) -> Path | None:
    """The dataset's folder, only if it lies directly under datasets_dir (ids are uuid hex)."""
    if not _DATASET_ID.fullmatch(dataset_id):
        return None
    folder = (settings.datasets_dir / dataset_id).resolve()
    return folder if folder.parent == settings.datasets_dir.resolve() else None


def sweep_stale_uploads(settings: Settings, older_than_seconds: float = 0.0) -> int:
    """Remove upload temp files left by a killed server; run at start. Returns how many."""
    if not settings.tmp_dir.is_dir():
        return 0
    cutoff = time.time() - older_than_seconds
    removed = 0
    for path in settings.tmp_dir.glob(f"{UPLOAD_PREFIX}*{UPLOAD_SUFFIX}"):
        try:
            if path.stat().st_mtime <= cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def sweep_orphan_datasets(db: Database, settings: Settings) -> int:
    """Remove dataset folders that an ingest left half-written when its server was killed: no
    database row, no `split.json` (ingest writes it last) and no process holding the ingest lock.
    A complete folder without a row (another database's, say) is only logged. Run at start."""
    if not settings.datasets_dir.is_dir():
        return 0
    folders = {p.name: p for p in settings.datasets_dir.iterdir() if _DATASET_ID.fullmatch(p.name)}
    if not folders:
        return 0
    with db.read() as session:
        known = set(session.exec(select(Dataset.id).where(col(Dataset.id).in_(list(folders)))))
    removed = 0
    for dataset_id, folder in sorted(folders.items()):
        if dataset_id in known or not folder.is_dir():
            continue
        if (folder / SPLIT_FILENAME).exists():
            log.warning("dataset folder %s has no database row; left in place", folder)
            continue
        if _ingest_in_progress(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    if removed:
        log.warning("removed %d dataset folder(s) of ingests cut short by a killed server", removed)
    return removed


def _ingest_in_progress(folder: Path) -> bool:
    try:
        with (folder / INGEST_LOCK_FILENAME).open("r") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def error_body(error: DatasetServiceError | DatasetError) -> dict[str, Any]:
    """The API's error shape: {"error": {"code", "message", "hint", ...}}."""
    return error.to_json()
