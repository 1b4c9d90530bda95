"""The job queue. The only code that changes a job's status.

The database is the queue. A claim is one atomic statement (SQLite: `UPDATE ... RETURNING` inside
`BEGIN IMMEDIATE`; PostgreSQL: the same with `FOR UPDATE SKIP LOCKED` in the sub-select). Each claim
is a new attempt: the attempt number fences every later write, so a worker that lost its lease
(paused, partitioned, presumed dead) cannot change a job another worker now runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, text, update
from sqlmodel import col, select

from app.db import Database
from app.models import (
    FINISHED_STATUSES,
    Adapter,
    Evaluation,
    Job,
    JobStatus,
    Metric,
    Worker,
    metric_columns,
    utcnow,
)
from app.train_config import TrainConfig


class QueueError(Exception):
    """A queue operation that cannot be done in the job's current state."""

    def __init__(self, message: str, hint: str = "", code: str = "conflict") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


class JobNotFound(QueueError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"There is no job {job_id}.", "Check the job number.", code="not_found")


@dataclass(frozen=True)
class Claim:
    """What a worker holds after a claim: the job and the attempt that fences its writes."""

    job_id: int
    attempt: int
    config: dict[str, Any]


# --- enqueue and ordering ----------------------------------------------------------------------


def enqueue(db: Database, config: TrainConfig, *, max_attempts: int = 3) -> Job:
    with db.write() as s:
        last = s.exec(select(func.max(Job.position))).one()
        job = Job(
            name=config.name,
            base_model=config.base_model,
            dataset_id=config.dataset_id,
            config=config.model_dump(mode="json"),
            position=(last or 0.0) + 1.0,
            max_attempts=max_attempts,
        )
        s.add(job)
        s.flush()
        s.refresh(job)
        return job


def move(db: Database, job_id: int, where: str) -> Job:
    """Move a queued job: "top", "up" or "down" in the queue order."""
    with db.write() as s:
        job = _get(s, job_id)
        if job.status != JobStatus.queued:
            raise QueueError(
                f"Job {job_id} is {job.status}; only queued jobs can be moved.",
                "Move it before it starts.",
            )
        queued = list(
            s.exec(
                select(Job)
                .where(Job.status == JobStatus.queued)
                .order_by(col(Job.position), col(Job.id))
            )
        )
        index = next(i for i, j in enumerate(queued) if j.id == job_id)
        if where == "top":
            target = 0
        elif where == "up":
            target = max(0, index - 1)
        elif where == "down":
            target = min(len(queued) - 1, index + 1)
        else:
            raise QueueError(f"Unknown move {where!r}.", 'Use "top", "up" or "down".', "invalid")
        queued.insert(target, queued.pop(index))
        for position, j in enumerate(queued, start=1):
            j.position = float(position)
            s.add(j)
        return job


# --- claim, heartbeat, finish (the worker side) -----------------------------------------------


def claim_next_job(
    db: Database, worker_id: str, lease_seconds: float, gpus: int = 1
) -> Claim | None:
    """Atomically take the first queued job this worker has enough GPUs for, or None."""
    now = utcnow()
    gpus_needed = func.coalesce(col(Job.config)["gpus"].as_integer(), 1)
    first_queued = (
        select(Job.id)
        .where(Job.status == JobStatus.queued, col(Job.cancel_requested).is_(False))
        .where(gpus_needed <= gpus)
        .order_by(col(Job.position), col(Job.id))
        .limit(1)
    )
    # SQLAlchemy drops FOR UPDATE on SQLite: there the surrounding BEGIN IMMEDIATE is what
    # serialises claimers. On PostgreSQL, SKIP LOCKED lets concurrent claimers pass each other.
    if not db.is_sqlite:
        first_queued = first_queued.with_for_update(skip_locked=True)
    claim = (
        update(Job)
        .where(col(Job.id) == first_queued.scalar_subquery())
        .values(
            status=JobStatus.running,
            attempt=Job.attempt + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            updated_at=now,
            finished_at=None,
            error_kind=None,
            error_message=None,
            error_hint=None,
            start_timing=None,  # the new attempt's, once its first step is done
        )
        .returning(col(Job.id), col(Job.attempt), col(Job.config))
    )
    with db.write() as s:
        row = s.connection().execute(claim).first()
        if row is None:
            return None
        return Claim(job_id=row[0], attempt=row[1], config=dict(row[2]))


def heartbeat(db: Database, job_id: int, attempt: int, lease_seconds: float) -> bool:
    """Extend the lease. False means the attempt is stale: stop and write nothing more."""
    now = utcnow()
    renew = (
        update(Job)
        .where(
            col(Job.id) == job_id, col(Job.attempt) == attempt, col(Job.status) == JobStatus.running
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    with db.write() as s:
        return s.connection().execute(renew).rowcount == 1


def stop_reason(db: Database, job_id: int, attempt: int) -> str | None:
    """Why a running attempt should stop now: "cancel", "lease_lost", or None to go on."""
    with db.read() as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status != JobStatus.running:
            return "lease_lost"
        return "cancel" if job.cancel_requested else None


def update_progress(db: Database, job_id: int, attempt: int, **fields: Any) -> bool:
    """Set display fields of a running attempt (step, epoch, memory policy...). Fenced."""
    allowed = {
        "progress_step",
        "progress_total",
        "epoch",
        "memory_policy",
        "memory_policy_reason",
        "compute_mode",
        "notice",
        "download_done_bytes",
        "download_total_bytes",
        "vram_before_mib",
        "vram_after_mib",
        "start_timing",
    }
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"not a progress field: {sorted(unknown)}")
    with db.write() as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status != JobStatus.running:
            return False
        for name, value in fields.items():
            setattr(job, name, value)
        job.updated_at = utcnow()
        s.add(job)
        return True


def record_metrics(db: Database, job_id: int, attempt: int, rows: Sequence[dict[str, Any]]) -> bool:
    """Insert metric rows for a running attempt in one transaction. False if the attempt is stale."""
    if not rows:
        return True
    fields = set(metric_columns())  # other keys (a recipe's timings) are not stored
    with db.write() as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status != JobStatus.running:
            return False
        now = utcnow()
        for row in rows:
            s.add(
                Metric(
                    job_id=job_id,
                    attempt=attempt,
                    created_at=now,
                    **{k: v for k, v in row.items() if k in fields},
                )
            )
        return True


def finish(
    db: Database,
    job_id: int,
    attempt: int,
    status: JobStatus,
    *,
    error_kind: str | None = None,
    error_message: str | None = None,
    error_hint: str | None = None,
    adapter: dict[str, Any] | None = None,
    evaluate: bool = True,
    **fields: Any,
) -> bool:
    """End a running attempt as succeeded, failed or cancelled. False if the attempt is stale.

    `adapter` (`size_bytes`, `eval_loss`) registers the trained adapter in the same transaction,
    so a job is never shown as succeeded without its adapter, and a stale attempt registers none;
    with `evaluate`, the adapter's evaluation report is queued with it (side work).
    """
    if status not in FINISHED_STATUSES:
        raise ValueError(f"{status} is not a finished status")
    with db.write() as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status != JobStatus.running:
            return False
        job.status = status
        job.error_kind, job.error_message, job.error_hint = error_kind, error_message, error_hint
        job.finished_at = job.updated_at = utcnow()
        job.lease_expires_at = None
        for name, value in fields.items():
            setattr(job, name, value)
        s.add(job)
        if adapter is not None and status == JobStatus.succeeded:
            # merge: a job retried after success replaces its adapter row ("job-<id>").
            s.merge(
                Adapter(
                    id=f"job-{job_id}",
                    job_id=job_id,
                    name=job.name,
                    base_model=job.base_model,
                    size_bytes=int(adapter.get("size_bytes") or 0),
                    eval_loss=adapter.get("eval_loss"),
                )
            )
            if evaluate:
                s.add(Evaluation(adapter_id=f"job-{job_id}", method=_method(job)))
        return True


def _method(job: Job) -> str:
    return str((job.config or {}).get("method") or "sft")


def release(
    db: Database,
    job_id: int,
    attempt: int,
    *,
    notice: str | None = None,
    config: dict[str, Any] | None = None,
    oom_retry: bool = False,
) -> bool:
    """Put a running attempt back at the head of the queue (worker shutdown, OOM retry).

    The next claim resumes from the last complete checkpoint. `config` replaces the stored one
    (the OOM retry halves the micro-batch; `oom_retry` counts it so a second OOM fails the job).
    Fenced by attempt.
    """
    with db.write() as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status != JobStatus.running:
            return False
        head = s.exec(select(func.min(Job.position)).where(Job.status == JobStatus.queued)).one()
        job.status = JobStatus.queued
        job.position = (head if head is not None else job.position) - 1.0
        job.worker_id = None
        job.lease_expires_at = None
        job.updated_at = utcnow()
        if notice is not None:
            job.notice = notice
        if config is not None:
            job.config = config
        if oom_retry:
            job.oom_retries += 1
        if job.cancel_requested:
            job.status = JobStatus.cancelled
            job.finished_at = job.updated_at
        s.add(job)
        return True


def requeue_expired(db: Database) -> list[int]:
    """Requeue running jobs whose lease has expired (attempts left) or fail them (none left)."""
    now = utcnow()
    changed: list[int] = []
    with db.write() as s:
        expired = s.exec(
            select(Job).where(Job.status == JobStatus.running, col(Job.lease_expires_at) < now)
        ).all()
        for job in expired:
            job.worker_id = None
            job.lease_expires_at = None
            job.updated_at = now
            if job.cancel_requested:
                job.status = JobStatus.cancelled
                job.finished_at = now
            elif job.attempt >= job.max_attempts:
                job.status = JobStatus.failed
                job.finished_at = now
                job.error_kind = "lost_worker"
                job.error_message = (
                    f"The worker running attempt {job.attempt} stopped heartbeating, and the job "
                    f"has used all {job.max_attempts} attempts."
                )
                job.error_hint = (
                    "Look at the job's log for the last lines before it stopped; a worker killed "
                    "by the host usually ran out of RAM. Retry when the cause is fixed."
                )
            else:
                job.status = JobStatus.queued
                job.notice = (
                    f"Attempt {job.attempt} lost its worker; requeued to resume from the last "
                    "complete checkpoint."
                )
            s.add(job)
            changed.append(job.id or 0)
    return changed


# --- workers (liveness rows shown on the dashboard) --------------------------------------------


def register_worker(db: Database, worker: Worker) -> Worker:
    """Add (or replace) a worker's liveness row when it starts."""
    with db.write() as s:
        return s.merge(worker)


def worker_heartbeat(db: Database, worker_id: str, **fields: Any) -> None:
    """Mark a worker alive now, with its current GPU readings and job."""
    with db.write() as s:
        worker = s.get(Worker, worker_id)
        if worker is None:
            return
        for name, value in fields.items():
            setattr(worker, name, value)
        worker.heartbeat_at = utcnow()
        s.add(worker)


def worker_stopped(db: Database, worker_id: str) -> None:
    with db.write() as s:
        worker = s.get(Worker, worker_id)
        if worker is not None:
            worker.stopped = True
            worker.current_job_id = None
            worker.heartbeat_at = utcnow()
            s.add(worker)


# --- user actions -----------------------------------------------------------------------------


def request_cancel(db: Database, job_id: int) -> Job:
    """Cancel: a queued job never starts; a running one checkpoints and stops at its next step."""
    with db.write() as s:
        job = _get(s, job_id)
        if job.status == JobStatus.queued:
            job.status = JobStatus.cancelled
            job.cancel_requested = True
            job.finished_at = utcnow()
        elif job.status == JobStatus.running:
            job.cancel_requested = True
        else:
            raise QueueError(f"Job {job_id} has already {job.status}.", "Nothing to cancel.")
        job.updated_at = utcnow()
        s.add(job)
        return job


def retry(db: Database, job_id: int, *, from_scratch: bool = False, attempts: int = 3) -> Job:
    """Queue a finished job again: from its last checkpoint, or from scratch."""
    with db.write() as s:
        job = _get(s, job_id)
        if job.status not in FINISHED_STATUSES:
            raise QueueError(
                f"Job {job_id} is {job.status}; only finished jobs can be retried.",
                "Cancel it first, or wait for it to finish.",
            )
        last = s.exec(select(func.max(Job.position))).one()
        job.status = JobStatus.queued
        job.cancel_requested = False
        job.position = (last or 0.0) + 1.0
        job.max_attempts = job.attempt + attempts
        job.error_kind = job.error_message = job.error_hint = None
        job.finished_at = None
        job.resume_from_scratch = from_scratch
        job.oom_retries = 0
        job.notice = (
            "Retried from scratch." if from_scratch else "Retried from the last checkpoint."
        )
        job.updated_at = utcnow()
        s.add(job)
        return job


def delete_finished(db: Database, job_id: int) -> Job:
    """Remove a finished job's rows (its files are removed by the caller)."""
    with db.write() as s:
        job = _get(s, job_id)
        if job.status not in FINISHED_STATUSES:
            raise QueueError(
                f"Job {job_id} is {job.status}; cancel it before deleting it.", "Cancel it first."
            )
        s.connection().execute(text("DELETE FROM metrics WHERE job_id = :id"), {"id": job_id})
        s.connection().execute(
            text(
                "DELETE FROM evaluations WHERE adapter_id IN "
                "(SELECT id FROM adapters WHERE job_id = :id)"
            ),
            {"id": job_id},
        )
        s.connection().execute(text("DELETE FROM adapters WHERE job_id = :id"), {"id": job_id})
        s.delete(job)
        return job


# --- reads ------------------------------------------------------------------------------------


def _get(session: Any, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def get_job(db: Database, job_id: int) -> Job:
    with db.read() as s:
        return _get(s, job_id)


def list_jobs(db: Database, statuses: Iterable[JobStatus] | None = None) -> list[Job]:
    """Running first, then queued in queue order, then finished newest first."""
    with db.read() as s:
        query = select(Job)
        if statuses is not None:
            query = query.where(col(Job.status).in_(list(statuses)))
        jobs = list(s.exec(query))
    rank = {JobStatus.running: 0, JobStatus.queued: 1}

    def key(job: Job) -> tuple[int, float, float]:
        r = rank.get(job.status, 2)
        if r == 2:
            return (r, -(job.finished_at or job.created_at).timestamp(), -(job.id or 0))
        return (r, job.position, job.id or 0)

    return sorted(jobs, key=key)


def metrics_after(db: Database, job_id: int, after: int = 0, limit: int = 10_000) -> list[Metric]:
    """The job's metric rows with id > after, oldest first: the one read behind the JSON API and
    the live stream (`app.services.job_events`)."""
    with db.read() as s:
        return list(
            s.exec(
                select(Metric)
                .where(Metric.job_id == job_id, col(Metric.id) > after)
                .order_by(col(Metric.id))
                .limit(limit)
            )
        )
