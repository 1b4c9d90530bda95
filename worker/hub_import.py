"""Datasets from the Hugging Face Hub, fetched on the worker side with the `datasets` library
(the web process never imports it).

The web process asks for an import by adding a `queued` row to `hub_imports`
(`app/services/datasets/hub.py`). A worker claims it from `app.side_queue` and runs it here, in
`python -m worker.hub_import --task-id N --attempt A` (worker/side_work.py):
`datasets.load_dataset(hub_id, config, split=split)` into `layout.hf_datasets_cache`, a check
that the column mapping names columns the split has, and the split's rows written as JSON Lines
to `layout.hub_import_rows(N)` (the mapped columns only, when there is a mapping), with the rows
written so far on the page. The web then ingests that file exactly as an upload: the same
validation, errors by line and token reports.

The user's Hub token (HF_TOKEN, or the one `hf auth login` saved under their HF_HOME) reaches
`load_dataset` through the environment; it is never stored. With TUNEBOARD_HF_OFFLINE set the
worker sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, and only what is in the cache is read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from app import side_queue
from app.db import Database
from app.models import HubImport, SideWorkStatus
from app.settings import Settings
from worker.progress_meter import reading
from worker.side_work import child_main

PROGRESS_EVERY_ROWS = 1000


class ImportFailed(Exception):
    """An import that cannot be done, in the users' words, with what to do about it."""

    def __init__(self, kind: str, message: str, hint: str) -> None:
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint


def what_is_asked(task: HubImport) -> str:
    """The dataset, config and split, as the user named them."""
    config = f", config {task.config_name!r}" if task.config_name else ""
    return f"{task.hub_id}{config}, split {task.split!r}"


def load_split(settings: Settings, task: HubImport) -> Any:
    """The split as a `datasets.Dataset`, or ImportFailed saying what is missing."""
    if settings.hf_offline:  # read when `datasets` is imported: set before it is
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    offline = " (TUNEBOARD_HF_OFFLINE is set: only cached datasets are read)"
    try:
        return datasets.load_dataset(
            task.hub_id,
            task.config_name or None,
            split=task.split,
            cache_dir=str(settings.layout.hf_datasets_cache),
        )
    except DatasetNotFoundError as exc:
        raise ImportFailed(
            "not_found",
            f"There is no dataset {task.hub_id!r} on the Hub that this worker can read: {exc}",
            "Check the id (owner/name, as on the dataset's Hub page). A gated or private "
            "dataset needs your token on the worker: accept its terms on the Hub, then set "
            "HF_TOKEN or run `hf auth login` where the worker runs.",
        ) from exc
    except ConnectionError as exc:
        if settings.hf_offline:
            raise ImportFailed(
                "not_cached",
                f"{what_is_asked(task)} is not in the cache{offline}.",
                "Import it once with the Hub reachable (TUNEBOARD_HF_OFFLINE unset), or upload "
                "the file on the Datasets page.",
            ) from exc
        raise ImportFailed(
            "hub_unreachable",
            f"The Hub could not be reached for {task.hub_id!r}: {exc}",
            "Check the worker's network; set TUNEBOARD_HF_OFFLINE to use cached datasets only.",
        ) from exc
    except ValueError as exc:  # an unknown split or config: the library lists what there is
        where = offline if settings.hf_offline else ""
        raise ImportFailed(
            "not_found",
            f"{what_is_asked(task)} was not found{where}: {exc}",
            "Use a config and split the dataset has (its Hub page lists them); leave config "
            "empty for a dataset with one.",
        ) from exc
    except FileNotFoundError as exc:
        raise ImportFailed(
            "not_found",
            f"{what_is_asked(task)} was not found: {exc}",
            "Check the id, config and split on the dataset's Hub page.",
        ) from exc


def check_mapping(split: Any, task: HubImport) -> list[str] | None:
    """The columns to keep: those the mapping names (None: every column). ImportFailed names
    a mapped column the split does not have, with the columns it has."""
    if not task.column_mapping:
        return None
    columns = list(split.column_names)
    missing = {
        field: column for field, column in task.column_mapping.items() if column not in columns
    }
    if missing:
        named = ", ".join(f"{column!r} (for {field})" for field, column in missing.items())
        raise ImportFailed(
            "bad_column_mapping",
            f"The column mapping names {named}, which {what_is_asked(task)} does not have; its "
            f"columns are: {', '.join(columns)}.",
            "Map each field to one of those columns, or leave the mapping empty to let the "
            "format be detected.",
        )
    return list(dict.fromkeys(task.column_mapping.values()))


def write_rows(
    split: Any, columns: list[str] | None, path: Path, limit_bytes: int, progress: Any
) -> int:
    """Write the split's rows as JSON Lines (values JSON cannot hold, as text); returns the
    rows written. A file over the upload limit is refused as an upload would be."""
    if columns is not None:
        split = split.select_columns(columns)
    total = len(split)
    written = size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in split:
            line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
            size += len(line.encode("utf-8"))
            if size > limit_bytes:
                raise ImportFailed(
                    "too_large",
                    f"The rows of {total} are larger than the upload limit of {limit_bytes} bytes.",
                    "Import a smaller split (e.g. split 'train[:10000]'), or ask the operator "
                    "to raise TUNEBOARD_UPLOAD_MAX_BYTES.",
                )
            out.write(line)
            written += 1
            if written % PROGRESS_EVERY_ROWS == 0:
                progress(progress_done=written, progress_total=total)
    return written


def run_import(settings: Settings, db: Database, claim: side_queue.SideClaim) -> bool:
    """Fetch a claimed import's rows and record the end. False if the claim went stale."""
    with db.read() as session:
        task = session.get(HubImport, claim.task_id)
        assert task is not None
    path = settings.layout.hub_import_rows(claim.task_id)

    def progress(**fields: Any) -> None:
        if not side_queue.update_progress(db, claim, **fields):
            raise ImportFailed("stale", "The import was taken over.", "")

    try:
        progress(stage="loading")
        with reading(progress, "loading"):  # the download, then the split prepared: bytes read
            split = load_split(settings, task)
        columns = check_mapping(split, task)
        progress(stage="writing rows", progress_done=0, progress_total=len(split))
        written = write_rows(split, columns, path, settings.upload_max_bytes, progress)
    except ImportFailed as exc:
        path.unlink(missing_ok=True)
        if exc.kind == "stale":
            return False
        return side_queue.fail(db, claim, exc, stage="failed")
    except Exception as exc:  # an import must never take its worker down
        path.unlink(missing_ok=True)
        return side_queue.finish(
            db,
            claim,
            SideWorkStatus.failed,
            error_kind="internal",
            error_message=f"{type(exc).__name__}: {exc}"[:2000],
            error_hint="Look at worker-side.log in the data dir; import again to retry.",
            stage="failed",
        )
    return side_queue.finish(
        db,
        claim,
        SideWorkStatus.succeeded,
        stage="downloaded",
        progress_done=written,
        progress_total=written,
        rows_file=str(path.relative_to(settings.layout.root)),
    )


def main(argv: list[str] | None = None) -> int:
    return child_main(
        "hub_import",
        run_import,
        argv,
        "Run a claimed Hub import (settings from TUNEBOARD_* variables).",
    )


if __name__ == "__main__":
    sys.exit(main())
