"""The queue's promises, on a real SQLite file (and PostgreSQL where marked)."""

from __future__ import annotations

import multiprocessing
import time
from collections import defaultdict

import pytest
from sqlalchemy import text
from sqlmodel import select

from app import queue
from app.db import Database
from app.models import Adapter, JobStatus, Metric
from app.settings import Settings
from tests.fakes import racers
from tests.fakes.jobs import add_dataset, add_job

RACERS = 8
ROUNDS = 200


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")


def test_eight_processes_racing_claim_each_job_exactly_once(any_db: Database, settings: Settings):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(RACERS + 1, timeout=60)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=racers.claim_each_round,
            args=(any_db.url, f"racer-{i}", ROUNDS, barrier, results),
        )
        for i in range(RACERS)
    ]
    for p in processes:
        p.start()
    dataset_id = add_dataset(any_db, settings)
    job_ids, claims = [], defaultdict(list)
    try:
        for _ in range(ROUNDS):
            job_ids.append(add_job(any_db, settings, dataset_id=dataset_id).id)
            barrier.wait()  # go
            barrier.wait()  # everyone has tried
            for _ in range(RACERS):
                name, job_id = results.get(timeout=30)
                if job_id is not None:
                    claims[job_id].append(name)
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in processes)
    assert sorted(claims) == sorted(job_ids)
    assert {job_id: len(names) for job_id, names in claims.items() if len(names) != 1} == {}
    jobs = queue.list_jobs(any_db)
    assert {(j.status, j.attempt) for j in jobs} == {(JobStatus.running, 1)}


def test_an_expired_lease_requeues_then_fails_after_the_last_attempt(db, settings):
    job = add_job(db, settings, max_attempts=2)
    first = queue.claim_next_job(db, "w1", lease_seconds=0.05)
    time.sleep(0.1)
    assert queue.requeue_expired(db) == [job.id]
    requeued = queue.get_job(db, job.id)
    assert (requeued.status, requeued.attempt) == (JobStatus.queued, 1)
    assert "lost its worker" in (requeued.notice or "")

    second = queue.claim_next_job(db, "w2", lease_seconds=0.05)
    assert first is not None and second is not None and second.attempt == first.attempt + 1
    time.sleep(0.1)
    queue.requeue_expired(db)
    failed = queue.get_job(db, job.id)
    assert failed.status == JobStatus.failed
    assert failed.error_kind == "lost_worker"
    assert "all 2 attempts" in (failed.error_message or "")
    assert queue.claim_next_job(db, "w3", lease_seconds=1) is None


def test_a_stale_attempt_cannot_write_anything(db, settings):
    job = add_job(db, settings)
    old = queue.claim_next_job(db, "paused", lease_seconds=0.05)
    assert old is not None
    time.sleep(0.1)
    queue.requeue_expired(db)
    new = queue.claim_next_job(db, "taker", lease_seconds=60)
    assert new is not None

    assert queue.heartbeat(db, job.id, old.attempt, 60) is False
    assert queue.stop_reason(db, job.id, old.attempt) == "lease_lost"
    assert queue.record_metrics(db, job.id, old.attempt, [{"step": 99, "loss": 9.0}]) is False
    assert queue.update_progress(db, job.id, old.attempt, progress_step=99) is False
    assert queue.release(db, job.id, old.attempt, notice="stale") is False
    assert (
        queue.finish(db, job.id, old.attempt, JobStatus.succeeded, adapter={"size_bytes": 1})
        is False
    )

    current = queue.get_job(db, job.id)
    assert (current.status, current.attempt, current.worker_id) == (JobStatus.running, 2, "taker")
    assert current.progress_step == 0 and current.notice != "stale"
    with db.read() as s:
        assert list(s.exec(select(Metric))) == []
        assert list(s.exec(select(Adapter))) == []
    assert queue.stop_reason(db, job.id, new.attempt) is None


def test_a_cancelled_queued_job_is_never_claimed(db, settings):
    cancelled = add_job(db, settings)
    queue.request_cancel(db, cancelled.id)
    other = add_job(db, settings)
    claim = queue.claim_next_job(db, "w", lease_seconds=60)
    assert claim is not None and claim.job_id == other.id
    assert queue.claim_next_job(db, "w", lease_seconds=60) is None
    assert queue.get_job(db, cancelled.id).attempt == 0


def test_success_registers_the_adapter_with_the_job(db, settings):
    job = add_job(db, settings, name="kettle bot")
    claim = queue.claim_next_job(db, "w", lease_seconds=60)
    assert claim is not None
    adapter = {"size_bytes": 1234, "eval_loss": 0.25}
    assert queue.finish(db, job.id, claim.attempt, JobStatus.succeeded, adapter=adapter)
    with db.read() as s:
        row = s.get(Adapter, f"job-{job.id}")
    assert row is not None
    assert (row.name, row.size_bytes, row.eval_loss) == ("kettle bot", 1234, 0.25)


def test_an_oom_release_is_counted_and_a_user_retry_resets_it(db, settings):
    job = add_job(db, settings)
    claim = queue.claim_next_job(db, "w", lease_seconds=60)
    assert claim is not None
    smaller = {**job.config, "micro_batch_size": 2, "grad_accum_steps": 8}
    assert queue.release(db, job.id, claim.attempt, notice="oom", config=smaller, oom_retry=True)
    released = queue.get_job(db, job.id)
    assert (released.status, released.oom_retries) == (JobStatus.queued, 1)
    assert released.config["micro_batch_size"] == 2

    claim = queue.claim_next_job(db, "w", lease_seconds=60)
    assert claim is not None
    queue.finish(db, job.id, claim.attempt, JobStatus.failed, error_kind="oom")
    assert queue.retry(db, job.id).oom_retries == 0


def test_high_rate_metric_writes_beside_job_writes_never_lock(db, settings):
    """~10 s of one process writing metric batches while another churns jobs: no lock errors."""
    dataset_id = add_dataset(db, settings)
    job = add_job(db, settings, dataset_id=dataset_id)
    claim = queue.claim_next_job(db, "trainer", lease_seconds=600)
    assert claim is not None
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    seconds = 10.0
    processes = [
        ctx.Process(
            target=racers.write_metrics, args=(db.url, job.id, claim.attempt, seconds, results)
        ),
        ctx.Process(target=racers.churn_jobs, args=(db.url, dataset_id, seconds, results)),
    ]
    for p in processes:
        p.start()
    outcomes = {
        kind: (count, errors)
        for kind, count, errors in (results.get(timeout=60) for _ in processes)
    }
    for p in processes:
        p.join(timeout=30)

    assert outcomes["metrics"][1] == [] and outcomes["jobs"][1] == []
    assert outcomes["metrics"][0] > 1000 and outcomes["jobs"][0] > 20
    assert len(queue.metrics_after(db, job.id, limit=10**6)) == outcomes["metrics"][0]
    with db.read() as s:
        assert s.connection().execute(text("PRAGMA integrity_check")).scalar() == "ok"
