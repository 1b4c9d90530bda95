"""Datasets imported from the Hugging Face Hub: ask a worker for the rows, then ingest them as an
upload.

`request_import` checks the request and queues a `HubImport` (side work: the worker's
`worker/hub_import.py` runs `datasets.load_dataset`, which this process never imports). When the
worker has written the split's rows, `settled` ingests that file through `create_dataset`, the
upload's own path (the same validation, errors by line, split and token reports), once: the first
reader to move the import from `downloaded` to `ingesting` does it, and records the dataset (or
why the file as a whole was refused). Pages and the API read imports through `settled`, and the
web app's `settle_waiting` task (app/main.py) runs it every few seconds, so an import nobody
looks at finishes too.

The claim is a lease, as a worker's on its task: it holds `lease_expires_at` for
`hub_import_ingest_lease_seconds` and a thread renews it every third of that while the ingest
runs (`app/leases.py`), however long the ingest takes. An import whose lease ran out (its web
process died) is taken back and ingested again, by the next claim, `ingest_attempt` + 1, which
fences every write of the earlier one. The rows stay in their file until the outcome is recorded
(the dataset's folder gets a second name for them), and the dataset's row is written in the same
transaction as the import's `done`: a process that lost its claim records nothing, removes the
folder it made and leaves the rows to the one that took over. An import cut short
`INGEST_MAX_ATTEMPTS` times is refused, with a reason, rather than ingested forever.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import and_, or_, update
from sqlmodel import Session, col, select

from app.dataset_errors import DatasetError
from app.db import Database
from app.errors import NotFound, UserError
from app.leases import renewing
from app.models import Dataset, HubImport, SideWorkStatus, utcnow
from app.services.datasets import reports
from app.services.datasets.formats import MAPPABLE_FIELDS
from app.services.datasets.library import UPLOAD_PREFIX, UPLOAD_SUFFIX, create_dataset
from app.settings import Settings

log = logging.getLogger(__name__)

# "name" or "owner/name", as the Hub spells repository ids: no "..", no scheme, no path.
HUB_ID_PATTERN = r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
# A config name, or a split with the `datasets` slicing syntax ("train", "train[:1000]").
CONFIG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$"
SPLIT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\[\]:%+-]{0,199}$"
COLUMN_PATTERN = r"^[^\x00-\x1f\x7f]{1,200}$"
IMPORTS_SHOWN = 10
# Claims an import's ingest gets; one more finds it cut short each time, and refuses it.
INGEST_MAX_ATTEMPTS = 3
# A lock per import this process settles: a reader waits for the settle task's ingest of the
# same import instead of showing it half done.
_INGEST_LOCKS: dict[int, threading.Lock] = {}
_INGEST_LOCKS_GUARD = threading.Lock()


class HubImportRequest(BaseModel):
    """`POST /api/datasets/import`: a Hub dataset's split, and how its columns map to a format."""

    model_config = ConfigDict(extra="forbid")

    hub_id: Annotated[str, Field(pattern=HUB_ID_PATTERN)]
    """The dataset's id on the Hub, e.g. "tatsu-lab/alpaca"."""
    config: Annotated[str | None, Field(pattern=CONFIG_PATTERN)] = None
    """The dataset's configuration (subset); empty for a dataset with one."""
    split: Annotated[str, Field(pattern=SPLIT_PATTERN)] = "train"
    """The split to import; `datasets` slicing works ("train[:1000]")."""
    column_mapping: dict[str, Annotated[str, Field(pattern=COLUMN_PATTERN)]] = {}
    """Format fields to the dataset's columns, as for an upload ({"prompt": "question", ...})."""
    name: Annotated[str | None, Field(max_length=200)] = None
    """The dataset's name here (default: the Hub id, config and split)."""
    drop_bad_rows: bool = False
    """Keep the valid rows and drop the bad ones, as for an upload."""

    @field_validator("column_mapping")
    @classmethod
    def _known_fields(cls, mapping: dict[str, str]) -> dict[str, str]:
        unknown = [field for field in mapping if field not in MAPPABLE_FIELDS]
        if unknown:
            raise ValueError(
                f"{', '.join(map(repr, unknown))} is not a field of any format; the fields are: "
                f"{', '.join(MAPPABLE_FIELDS)}"
            )
        return mapping

    @field_validator("config", "name", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


class InvalidImport(UserError):
    status_code = 422
    code = "invalid"


def request_from_form(form: dict[str, str]) -> HubImportRequest:
    """The Datasets page's import form: its `column_<field>` inputs are the mapping, as on the
    upload form."""
    mapping = {
        field: form[f"column_{field}"].strip()
        for field in MAPPABLE_FIELDS
        if form.get(f"column_{field}", "").strip()
    }
    try:
        return HubImportRequest.model_validate(
            {
                "hub_id": form.get("hub_id", "").strip(),
                "config": form.get("config", ""),
                "split": form.get("split", "").strip() or "train",
                "column_mapping": mapping,
                "name": form.get("name", ""),
                "drop_bad_rows": form.get("drop_bad_rows") in ("on", "true", "1"),
            }
        )
    except ValidationError as exc:
        raise InvalidImport(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
            "Give the Hub id as owner/name (as on the dataset's Hub page), and a config and "
            "split the dataset has.",
        ) from exc


def import_public(task: HubImport) -> dict[str, Any]:
    """An import as the API shows it; `url` is its dataset's page once ingested."""
    body = task.model_dump(mode="json", exclude={"worker_id", "rows_file", "ingest_attempt"})
    body["config"] = body.pop("config_name")
    body["url"] = f"/datasets/{task.dataset_id}" if task.dataset_id else None
    return body


def request_import(db: Database, request: HubImportRequest) -> HubImport:
    """Queue the import for a worker."""
    config = f" ({request.config})" if request.config else ""
    task = HubImport(
        hub_id=request.hub_id,
        config_name=request.config,
        split=request.split,
        column_mapping=dict(request.column_mapping),
        name=(request.name or f"{request.hub_id}{config} {request.split}").strip()[:200],
        drop_bad_rows=request.drop_bad_rows,
    )
    with db.write() as session:
        session.add(task)
        session.flush()
        session.refresh(task)
    return task


def settled(db: Database, settings: Settings, import_id: int) -> HubImport:
    """The import, ingested first if its rows are waiting (NotFound for an unknown id)."""
    with db.read() as session:
        task = session.get(HubImport, import_id)
    if task is None:
        raise NotFound(f"There is no Hub import {import_id}.", "Start one on the Datasets page.")
    if task.status == SideWorkStatus.succeeded and task.stage in ("downloaded", "ingesting"):
        with _INGEST_LOCKS_GUARD:
            lock = _INGEST_LOCKS.setdefault(import_id, threading.Lock())
        with lock:  # an ingesting import may be this process's: wait for it
            _ingest(db, settings, task)
        with db.read() as session:
            task = session.get(HubImport, import_id)
        assert task is not None
    return task


def settle_waiting(db: Database, settings: Settings) -> list[int]:
    """Ingest every downloaded import, and take back those whose ingest lease ran out; returns
    their ids. The web app's background task runs it (app/main.py)."""
    with db.read() as session:
        ids = session.exec(
            select(HubImport.id)
            .where(col(HubImport.status) == SideWorkStatus.succeeded, _waiting())
            .order_by(col(HubImport.id))
        ).all()
    for import_id in ids:
        assert import_id is not None
        settled(db, settings, import_id)
    return [import_id for import_id in ids if import_id is not None]


def _waiting() -> Any:
    """Imports whose rows wait for the web: downloaded, or ingesting by a process that died."""
    return or_(
        col(HubImport.stage) == "downloaded",
        and_(col(HubImport.stage) == "ingesting", col(HubImport.lease_expires_at) < utcnow()),
    )


def recent_imports(db: Database, settings: Settings) -> list[HubImport]:
    """The newest imports, settled, for the Datasets page."""
    with db.read() as session:
        ids = session.exec(
            select(HubImport.id).order_by(col(HubImport.id).desc()).limit(IMPORTS_SHOWN)
        ).all()
    return [settled(db, settings, import_id) for import_id in ids if import_id is not None]


@dataclass(frozen=True)
class _IngestClaim:
    """What a process ingesting an import holds: the claim number that fences its writes."""

    import_id: int
    attempt: int


class _ClaimLost(Exception):
    """The import's ingest was taken over (this process stalled past its lease)."""


def _ingest(db: Database, settings: Settings, task: HubImport) -> None:
    """Ingest the worker's rows as an upload, if this call is the one that takes them, renewing
    the claim's lease while it works."""
    assert task.id is not None
    claim = _take(db, settings, task.id)
    if claim is None:
        return  # another request is ingesting it, or has
    every = settings.hub_import_ingest_lease_seconds / 3
    with renewing(lambda: _renew(db, settings, claim), every, f"hub_import-{task.id}"):
        dataset = _ingest_claimed(db, settings, task, claim)
    if dataset is not None:
        reports.request_default_report(db, dataset)  # as after an upload


def _ingest_claimed(
    db: Database, settings: Settings, task: HubImport, claim: _IngestClaim
) -> Dataset | None:
    """Ingest the rows and record the outcome if the claim still holds; the dataset if done."""
    rows = settings.layout.root / (task.rows_file or "")
    try:
        if claim.attempt > INGEST_MAX_ATTEMPTS:
            raise DatasetError(
                f"Ingesting the imported rows was cut short {claim.attempt - 1} times (the web "
                "server ingesting them stopped).",
                "The web server's log has the cause (most often it ran out of memory); import a "
                "smaller split (e.g. 'train[:10000]').",
            )
        if not task.rows_file or not rows.is_file():
            stopped = task.stage == "ingesting"
            cut_short = " (the web server ingesting them stopped)" if stopped else ""
            raise DatasetError(
                f"The imported rows are gone from the data dir{cut_short}.",
                "Import the dataset again.",
            )
        dataset = create_dataset(
            db,
            settings,
            upload_path=_second_name(settings, rows),
            size_bytes=rows.stat().st_size,
            filename=f"{task.hub_id.replace('/', '__')}-{task.id}.jsonl",
            name=task.name,
            column_mapping=task.column_mapping or None,
            drop_bad_rows=task.drop_bad_rows,
            recorded_with=lambda session, made: _record(
                session, claim, stage="done", dataset_id=made.id
            ),
        )
    except _ClaimLost:
        _log_lost(claim)
        return None
    except (DatasetError, UserError) as exc:
        try:
            with db.write() as session:
                _record(
                    session, claim, stage="refused", ingest_error=exc.message, ingest_hint=exc.hint
                )
        except _ClaimLost:
            _log_lost(claim)
            return None
        rows.unlink(missing_ok=True)
        return None
    rows.unlink(missing_ok=True)  # only now: a process taking over before the record needs them
    return dataset


def _second_name(settings: Settings, rows: Path) -> Path:
    """The rows under an upload's temp name, for `create_dataset` to move into the dataset's
    folder while the rows file stays for a process that takes the import over: a hard link (a
    copy where the file system has none). A killed server's is swept as an upload's is."""
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    name = settings.tmp_dir / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}{UPLOAD_SUFFIX}"
    try:
        os.link(rows, name)
    except OSError:
        shutil.copyfile(rows, name)
    return name


def _take(db: Database, settings: Settings, import_id: int) -> _IngestClaim | None:
    """Claim a waiting import's ingest (the next claim number), or None if it is not waiting."""
    take = (
        update(HubImport)
        .where(col(HubImport.id) == import_id, _waiting())
        .values(
            stage="ingesting",
            lease_expires_at=_lease_end(settings),
            ingest_attempt=col(HubImport.ingest_attempt) + 1,
        )
        .returning(col(HubImport.ingest_attempt))
    )
    with db.write() as session:
        attempt = session.connection().execute(take).scalar_one_or_none()
    return None if attempt is None else _IngestClaim(import_id, attempt)


def _renew(db: Database, settings: Settings, claim: _IngestClaim) -> bool:
    """Extend the claim's lease; False if it was taken over."""
    renew = update(HubImport).where(*_held(claim)).values(lease_expires_at=_lease_end(settings))
    with db.write() as session:
        return session.connection().execute(renew).rowcount == 1


def _record(session: Session, claim: _IngestClaim, **outcome: Any) -> None:
    """Write the ingest's outcome in `session`'s transaction; _ClaimLost (and nothing written)
    if the claim was taken over."""
    record = update(HubImport).where(*_held(claim)).values(**outcome, lease_expires_at=None)
    if session.connection().execute(record).rowcount != 1:
        raise _ClaimLost


def _held(claim: _IngestClaim) -> tuple[Any, ...]:
    """The import's row while this claim holds its ingest."""
    return (
        col(HubImport.id) == claim.import_id,
        col(HubImport.ingest_attempt) == claim.attempt,
        col(HubImport.stage) == "ingesting",
    )


def _lease_end(settings: Settings) -> datetime:
    return utcnow() + timedelta(seconds=settings.hub_import_ingest_lease_seconds)


def _log_lost(claim: _IngestClaim) -> None:
    log.warning(
        "Hub import %s: lost its claim on the ingest (attempt %s) to another web process, which "
        "records the outcome; this one's dataset is discarded",
        claim.import_id,
        claim.attempt,
    )
