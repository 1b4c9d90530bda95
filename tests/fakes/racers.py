"""Process bodies for the concurrency tests (module-level so `spawn` can import them)."""

from __future__ import annotations

import time
from typing import Any

from app import queue
from app.db import Database
from app.models import JobStatus
from app.train_config import TrainConfig


def claim_each_round(url: str, name: str, rounds: int, barrier: Any, results: Any) -> None:
    """Each round: wait for the starting gun, try one claim, report, wait for the others."""
    db = Database(url)
    for _ in range(rounds):
        barrier.wait()
        claim = queue.claim_next_job(db, name, lease_seconds=60)
        results.put((name, claim.job_id if claim else None))
        barrier.wait()
    db.dispose()


def write_metrics(url: str, job_id: int, attempt: int, seconds: float, results: Any) -> None:
    """Metric batches as fast as one process can write them."""
    db = Database(url)
    written, errors, step = 0, [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = [{"step": step + i, "loss": 1.0 / (step + i + 1)} for i in range(5)]
        try:
            if queue.record_metrics(db, job_id, attempt, rows):
                written += len(rows)
                step += len(rows)
        except Exception as exc:
            errors.append(repr(exc))
    results.put(("metrics", written, errors))
    db.dispose()


def churn_jobs(url: str, dataset_id: str, seconds: float, results: Any) -> None:
    """What the web process and a worker do meanwhile: enqueue, claim, progress, finish, cancel."""
    db = Database(url)
    done, errors = 0, []
    deadline = time.monotonic() + seconds
    config = TrainConfig(name="churn", dataset_id=dataset_id)
    while time.monotonic() < deadline:
        try:
            job = queue.enqueue(db, config)
            claim = queue.claim_next_job(db, "churner", lease_seconds=60)
            if claim is not None:
                queue.update_progress(db, claim.job_id, claim.attempt, progress_step=1)
                queue.heartbeat(db, claim.job_id, claim.attempt, 60)
                queue.finish(db, claim.job_id, claim.attempt, JobStatus.succeeded)
            queue.list_jobs(db)
            if job.id is not None and queue.get_job(db, job.id).status == JobStatus.queued:
                queue.request_cancel(db, job.id)
            done += 1
        except Exception as exc:
            errors.append(repr(exc))
    results.put(("jobs", done, errors))
    db.dispose()


def claim_side_work_each_round(
    url: str, name: str, rounds: int, barrier: Any, results: Any
) -> None:
    """Each round: wait for the starting gun, try to claim one task of every kind, report."""
    from app import side_queue

    db = Database(url)
    for _ in range(rounds):
        barrier.wait()
        for kind in side_queue.KINDS:
            claim = side_queue.claim_next(db, kind, name, lease_seconds=60)
            results.put((name, kind, claim.task_id if claim else None))
        barrier.wait()
    db.dispose()
