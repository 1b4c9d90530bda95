"""The side-work queue: dataset reports, merges, exports and every later kind of work a worker does beside
training. The only code that changes a side task's status.

One claim mechanism for every kind: each kind is its own table (its own columns and foreign keys)
built on `SideWork` (status, attempt, lease, the job's error columns), named in `KINDS`. A claim
is one atomic statement, as `app.queue.claim_next_job`'s is (SQLite: `UPDATE ... RETURNING`
inside `BEGIN IMMEDIATE`; PostgreSQL: the same with `FOR UPDATE SKIP LOCKED`), and each claim is a
new attempt that fences every later write. A task whose lease expires (its worker died), or whose
child died before recording an end, is requeued or, after its last attempt, failed with a reason
and a hint. Training keeps its own queue (`app/queue.py`): cancel, queue order, OOM retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from app.db import Database
from app.models import (
    DatasetReport,
    Evaluation,
    HubImport,
    MergeRequest,
    ModelExport,
    SideWork,
    SideWorkStatus,
    utcnow,
)
from app.units import human_bytes, seconds_in_words

# kind -> its table; the kind is what the worker's side loop and its children are told.
KINDS: dict[str, type[SideWork]] = {
    "dataset_report": DatasetReport,
    "merge": MergeRequest,
    "hub_import": HubImport,
    "export": ModelExport,
    "evaluation": Evaluation,
}
# in the user's words
NAMES = {
    "dataset_report": "token report",
    "merge": "merge",
    "hub_import": "Hub import",
    "export": "export",
    "evaluation": "evaluation",
}
FINISHED = (SideWorkStatus.succeeded, SideWorkStatus.failed)
# What the kinds write while they work; a change in any of them is progress (the stall watchdog).
PROGRESS_FIELDS = ("stage", "progress_done", "progress_total")
# What progress_done counts, by kind ("bytes": written while saving).
PROGRESS_UNITS = {
    "dataset_report": "rows tokenised",
    "merge": "bytes",
    "hub_import": "rows written",
    "export": "steps done",
    "evaluation": "steps done",
}
EXPORT_NAMES = {"gguf": "GGUF export", "gguf-lora": "LoRA GGUF export", "merged": "merged export"}
LOST_HINT = (
    "A worker killed by the host (most often out of RAM) or stopped past its time limit stops "
    "heartbeating; the worker's log (worker-side.log in the data dir) has its last lines. Ask "
    "again once the cause is fixed."
)


@dataclass(frozen=True)
class SideClaim:
    """What a worker holds after a claim: the task and the attempt that fences its writes."""

    kind: str
    task_id: int
    attempt: int

    @property
    def table(self) -> type[SideWork]:
        return KINDS[self.kind]


def claim_next(
    db: Database, kind: str, worker_id: str, lease_seconds: float, task_id: int | None = None
) -> SideClaim | None:
    """Atomically take the oldest queued task of this kind (or `task_id` if queued), or None."""
    table: Any = KINDS[kind]
    now = utcnow()
    first_queued = select(table.id).where(table.status == SideWorkStatus.queued)
    if task_id is not None:
        first_queued = first_queued.where(table.id == task_id)
    first_queued = first_queued.order_by(col(table.id)).limit(1)
    # As in claim_next_job: SQLite is serialised by BEGIN IMMEDIATE; PostgreSQL skips locked rows.
    if not db.is_sqlite:
        first_queued = first_queued.with_for_update(skip_locked=True)
    claim = (
        update(table)
        .where(col(table.id) == first_queued.scalar_subquery())
        .values(
            status=SideWorkStatus.running,
            attempt=table.attempt + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            finished_at=None,
            error_kind=None,
            error_message=None,
            error_hint=None,
        )
        .returning(col(table.id), col(table.attempt))
    )
    with db.write() as s:
        row = s.connection().execute(claim).first()
        return None if row is None else SideClaim(kind, row[0], row[1])


def _holding(s: Any, claim: SideClaim) -> Any:
    """The claimed row if this claim still holds it (running, same attempt), else None."""
    row = s.get(claim.table, claim.task_id)
    if row is None or row.attempt != claim.attempt or row.status != SideWorkStatus.running:
        return None
    return row


def note_queued(db: Database, kind: str, notice: str) -> None:
    """Tell the queued tasks of a kind why they wait (e.g. the GPU is training): their notice."""
    table: Any = KINDS[kind]
    note = (
        update(table)
        .where(
            col(table.status) == SideWorkStatus.queued, col(table.notice).is_distinct_from(notice)
        )
        .values(notice=notice)
    )
    with db.write() as s:
        s.connection().execute(note)


def heartbeat(db: Database, claim: SideClaim, lease_seconds: float) -> bool:
    """Extend the lease. False means the claim is stale: stop and write nothing more."""
    table: Any = claim.table
    renew = (
        update(table)
        .where(
            col(table.id) == claim.task_id,
            col(table.attempt) == claim.attempt,
            col(table.status) == SideWorkStatus.running,
        )
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    with db.write() as s:
        return s.connection().execute(renew).rowcount == 1


def update_progress(db: Database, claim: SideClaim, **fields: Any) -> bool:
    """Set the kind's own fields (a merge's stage and bytes...) of a running task. Fenced."""
    shared = set(SideWork.model_fields)
    if shared & set(fields):
        raise ValueError(f"not a progress field: {sorted(shared & set(fields))}")
    with db.write() as s:
        row = _holding(s, claim)
        if row is None:
            return False
        for name, value in fields.items():
            setattr(row, name, value)
        s.add(row)
        return True


def progress_of(db: Database, claim: SideClaim) -> tuple[Any, ...] | None:
    """What the claimed task last reported (its `PROGRESS_FIELDS`), or None if the claim is
    stale or the task has ended."""
    with db.read() as s:
        row = _holding(s, claim)
        return None if row is None else tuple(getattr(row, f, None) for f in PROGRESS_FIELDS)


def stop_stalled(db: Database, claim: SideClaim, stall_seconds: float) -> bool:
    """Fail a running task whose child made no progress for `stall_seconds` (the worker has
    killed it), saying what it last reported and what to do. Fenced, as `finish` is."""
    with db.read() as s:
        row = _holding(s, claim)
        if row is None:
            return False
        name = EXPORT_NAMES[row.kind] if claim.kind == "export" else NAMES[claim.kind]
        last = _last_progress(row, PROGRESS_UNITS[claim.kind])
    window = seconds_in_words(stall_seconds)
    return finish(
        db,
        claim,
        SideWorkStatus.failed,
        error_kind="stalled",
        error_message=f"The {name} made no progress for {window} (last: {last}) and was stopped.",
        error_hint="Look at worker-side.log in the data dir for what it was doing. If that step is "
        "legitimately slow (a very large model's conversion, a slow disk or network), raise "
        f"TUNEBOARD_SIDE_TASK_STALL_SECONDS on the worker (now {stall_seconds:g}), then start it "
        "again.",
    )


def _last_progress(row: Any, unit: str) -> str:
    """What a task last reported in the user's words: "saving, 3.2 GB of 8.1 GB written"."""
    stage = getattr(row, "stage", "")
    done, total = row.progress_done, row.progress_total
    if not total:
        counted = ""
    elif unit == "bytes":
        counted = f"{human_bytes(done)} of {human_bytes(total)} written"
    else:
        counted = f"{done:,} of {total:,} {unit}"
    return ", ".join(part for part in (stage, counted) if part) or "nothing reported yet"


def finish(
    db: Database,
    claim: SideClaim,
    status: SideWorkStatus,
    *,
    error_kind: str | None = None,
    error_message: str | None = None,
    error_hint: str | None = None,
    **fields: Any,
) -> bool:
    """End a running task as succeeded or failed, with the kind's result `fields`. False (and
    nothing written) if the claim is stale."""
    if status not in FINISHED:
        raise ValueError(f"{status} is not a finished status")
    with db.write() as s:
        row = _holding(s, claim)
        if row is None:
            return False
        for name, value in fields.items():
            setattr(row, name, value)
        row.status = status
        row.error_kind, row.error_message, row.error_hint = error_kind, error_message, error_hint
        row.finished_at = utcnow()
        row.lease_expires_at = None
        s.add(row)
        return True


def fail(db: Database, claim: SideClaim, error: Any, **fields: Any) -> bool:
    """`finish` as failed with a typed error's `kind`, `message` and `hint` (the side kinds'
    ReportFailed, ImportFailed, ExportFailed, DatasetError...)."""
    return finish(
        db,
        claim,
        SideWorkStatus.failed,
        error_kind=error.kind,
        error_message=error.message,
        error_hint=error.hint,
        **fields,
    )


def error_of(task: Any) -> dict[str, Any] | None:
    """A failed task's error as the API shows it, or None."""
    if task.status != SideWorkStatus.failed:
        return None
    return {"kind": task.error_kind, "message": task.error_message, "hint": task.error_hint}


# What a cancelled evaluation is left with: no figures, no rows, and the reason.
CANCELLED: dict[str, Any] = {
    "error_kind": "cancelled",
    "error_message": "The evaluation was cancelled; it has no report.",
    "error_hint": "Run it again from the report page (or POST /api/adapters/{id}/evaluation).",
    "stage": "cancelled",
    "base_figures": {},
    "adapter_figures": {},
    "judge_figures": {},
    "rows": [],
    "eta_seconds": None,
}


def cancel_evaluation(db: Database, evaluation_id: int) -> Evaluation | None:
    """Cancel an evaluation: a queued one fails at once as cancelled; a running one is asked to
    stop (its child sees `cancel_requested`, drops what it has and fails as cancelled). Either
    way nothing it computed is kept. None if there is no such evaluation."""
    with db.write() as s:
        row = s.get(Evaluation, evaluation_id)
        if row is None or row.status in FINISHED:
            return row
        if row.status == SideWorkStatus.queued:
            row.status = SideWorkStatus.failed
            row.finished_at = utcnow()
            for name, value in CANCELLED.items():
                setattr(row, name, value)
        else:
            row.cancel_requested = True
        s.add(row)
        s.flush()
        s.refresh(row)
        return row


def _requeue_or_fail(row: SideWork, kind: str, what_happened: str, now: datetime) -> None:
    name = NAMES[kind]
    row.worker_id = None
    row.lease_expires_at = None
    if row.attempt >= row.max_attempts:
        row.status = SideWorkStatus.failed
        row.finished_at = now
        row.error_kind = "lost_worker"
        row.error_message = (
            f"The {name} {what_happened} on attempt {row.attempt}, and it has used all "
            f"{row.max_attempts} attempts."
        )
        row.error_hint = LOST_HINT
    else:
        row.status = SideWorkStatus.queued
        row.notice = f"Attempt {row.attempt} {what_happened}; requeued."


def release_lost(db: Database, claim: SideClaim, what_happened: str) -> bool:
    """The worker saw its child end without recording how the task ended (killed, crashed):
    requeue it, or fail it after its last attempt. Fenced: False if the claim is stale or the
    child recorded an end after all."""
    with db.write() as s:
        row = _holding(s, claim)
        if row is None:
            return False
        _requeue_or_fail(row, claim.kind, what_happened, utcnow())
        s.add(row)
        return True


def requeue_expired(db: Database) -> dict[str, list[int]]:
    """Requeue running tasks of every kind whose lease has expired (their worker died), or fail
    them after their last attempt. Any worker, and the web before it reuses a task, runs this."""
    now = utcnow()
    changed: dict[str, list[int]] = {}
    with db.write() as s:
        for kind, table in KINDS.items():
            expired = s.exec(
                select(table).where(
                    col(table.status) == SideWorkStatus.running,
                    col(table.lease_expires_at) < now,
                )
            ).all()
            for row in expired:
                _requeue_or_fail(row, kind, "lost its worker (no heartbeat)", now)
                s.add(row)
                changed.setdefault(kind, []).append(int(getattr(row, "id", 0) or 0))
    return changed
