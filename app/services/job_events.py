"""The reads behind a job's live stream: its display state and its metric rows after an id.

Each is one indexed query (`jobs` by primary key, `metrics` by `(job_id, id)`), cheap enough to
run a few times a second for every watched job. A metric row has one wire shape, `metric_data`
(the `Metric` model's fields), sent by the stream and by `GET /api/jobs/{id}/metrics` alike; the
stream encodes each row once however many pages read it.

Why `id > after` never skips a row: a job's metric rows come from one writer at a time (the
attempt holding the lease; stale attempts are refused), each batch in one transaction, so within
one job ids become visible in increasing order.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from app import queue
from app.db import Database
from app.models import FINISHED_STATUSES, Job, Metric

# What a `status` event carries; a change in any of them is worth telling an open page.
STATE_FIELDS = (
    "status",
    "progress_step",
    "progress_total",
    "epoch",
    "attempt",
    "cancel_requested",
    "notice",
    "error_kind",
    "error_message",
    "error_hint",
    "memory_policy",
    "memory_policy_reason",
    "compute_mode",
)


def job_state(db: Database, job_id: int) -> dict[str, Any] | None:
    """The job's display fields (None when the job no longer exists)."""
    columns = [getattr(Job, name) for name in STATE_FIELDS]
    with db.read() as s:
        row = s.connection().execute(select(*columns).where(col(Job.id) == job_id)).first()
    if row is None:
        return None
    state = dict(zip(STATE_FIELDS, row, strict=True))
    state["status"] = str(state["status"])
    state["finished"] = state["status"] in FINISHED_STATUSES
    return state


def last_metric_id(db: Database, job_id: int) -> int:
    with db.read() as s:
        return s.exec(select(func.max(Metric.id)).where(Metric.job_id == job_id)).one() or 0


def metric_data(row: Metric) -> dict[str, Any]:
    """A metric row as the API and the stream send it: every field of `Metric`, JSON-ready."""
    return row.model_dump(mode="json")


def metrics_page(db: Database, job_id: int, after: int) -> dict[str, Any]:
    """`GET /api/jobs/{id}/metrics`: the job's status and its rows after `after`."""
    job = queue.get_job(db, job_id)
    rows = queue.metrics_after(db, job_id, after)
    return {"status": job.status.value, "metrics": [metric_data(row) for row in rows]}


def metric_events_after(
    db: Database, job_id: int, after: int, limit: int = 1000
) -> list[tuple[int, str]]:
    """(id, JSON text) of the job's metric rows with id > after, oldest first, at most `limit`."""
    return [
        (row.id or 0, json.dumps(metric_data(row), separators=(",", ":")))
        for row in queue.metrics_after(db, job_id, after, limit)
    ]


def poll(
    db: Database, job_id: int, after: int, limit: int = 1000
) -> tuple[dict[str, Any] | None, list[tuple[int, str]]]:
    """The job's state, then its rows after `after`.

    State first: when it says finished, the rows read after it are all there will be (a finished
    job's writes are refused).
    """
    return job_state(db, job_id), metric_events_after(db, job_id, after, limit)
