"""Scale-out: several real worker processes on one queue, jobs that need several GPUs, and the
torchrun command line. The workers are tests.fakes.fake_worker (the real loop, the training
stand-in as its child), with a 2 s lease."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from app import queue
from app.db import Database
from app.models import Job, JobStatus, Metric
from app.settings import Settings
from tests.conftest import POSTGRES_URL
from tests.fakes.jobs import add_dataset, add_job
from tests.fakes.real_workers import children_of, short_lease_settings
from tests.worker.test_loop import Workers, alive, finished, wait_for
from worker.loop import distributed_command


def test_a_two_gpu_job_runs_under_torchrun_with_one_process_per_gpu():
    child = [sys.executable, "-m", "worker.run"]
    assert distributed_command(child, 1) == child
    assert distributed_command(child, 2) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "worker.run",
    ]
    with pytest.raises(ValueError, match="python -m module"):
        distributed_command(["/usr/bin/train"], 2)


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_the_claim_gives_a_two_gpu_job_only_to_a_worker_with_two_gpus(
    database, db, settings, request
):
    if database == "postgres":
        db = request.getfixturevalue("pg_db")
    two = add_job(db, settings, name="two", gpus=2)
    one = add_job(db, settings, name="one")

    first = queue.claim_next_job(db, "one-gpu", lease_seconds=60, gpus=1)
    assert first is not None and first.job_id == one.id  # passes the 2-GPU job at the head
    assert queue.claim_next_job(db, "one-gpu", lease_seconds=60, gpus=1) is None
    taken = queue.claim_next_job(db, "two-gpus", lease_seconds=60, gpus=2)
    assert taken is not None and taken.job_id == two.id


@pytest.fixture
def fast(tmp_path: Path) -> Settings:
    return short_lease_settings(tmp_path / "data")


def test_a_two_gpu_job_waits_for_a_worker_started_with_two_gpus(fast, tmp_path):
    from app.migrate import upgrade

    upgrade(fast.resolved_database_url)
    db = Database(fast.resolved_database_url)
    workers = Workers(fast, tmp_path)
    try:
        dataset = add_dataset(db, fast)
        two = add_job(db, fast, name="fake two", dataset_id=dataset, gpus=2)
        one = add_job(db, fast, name="fake one", dataset_id=dataset)
        single = workers.start(gpus="0")
        assert wait_for(lambda: finished(db, one.id)).status == JobStatus.succeeded
        time.sleep(1.0)  # several polls of the 1-GPU worker
        waiting = queue.get_job(db, two.id)
        assert (waiting.status, waiting.attempt) == (JobStatus.queued, 0)

        # GPU 0 is the 1-GPU worker's until it stops (one worker per GPU on a host).
        single.terminate()
        single.wait(30)
        pair = workers.start(gpus="0,1")
        done = wait_for(lambda: finished(db, two.id), timeout=60, what="the 2-GPU job")
    finally:
        workers.stop_all()
        db.dispose()
    assert done.status == JobStatus.succeeded, done.error_message
    assert str(pair.pid) in (done.worker_id or "")
    log = (fast.runs_dir / str(two.id) / "attempt-1.log").read_text()
    assert "torch.distributed.run" in log and "--nproc_per_node', '2'" in log
    with db.read() as s:  # rank 0 alone wrote the metric rows
        steps = [m.step for m in s.exec(select(Metric).where(Metric.job_id == two.id))]
    assert sorted(steps) == [1, 2, 3, 4, 5]


@pytest.mark.postgres
def test_three_workers_run_six_jobs_once_each_and_cover_a_killed_worker(
    pg_db: Database, tmp_path: Path
):
    """The issue's test: three workers, one PostgreSQL queue, six jobs. Each job runs exactly
    once and succeeds, except that the job of a worker killed with SIGKILL mid-job gets one
    more attempt, on another worker, which resumes it."""
    settings = short_lease_settings(tmp_path / "data", database_url=POSTGRES_URL)
    dataset = add_dataset(pg_db, settings)
    slow = add_job(pg_db, settings, name="fake slow", dataset_id=dataset)
    quick = [add_job(pg_db, settings, dataset_id=dataset) for _ in range(5)]
    workers = Workers(settings, tmp_path)
    try:
        procs = [workers.start(gpus=str(gpu)) for gpu in range(3)]

        def slow_running_at_step_3() -> Job | None:
            job = queue.get_job(pg_db, slow.id)
            return job if job.status == JobStatus.running and job.progress_step >= 3 else None

        running = wait_for(slow_running_at_step_3, timeout=30, what="the slow job to train")
        victim = next(p for p in procs if str(p.pid) in (running.worker_id or ""))
        # The System page lists every worker with its GPU (rendered from the same database).
        from app.main import create_app

        with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
            page = client.get("/system").text
        for gpu in range(3):
            assert f"GPU {gpu}" in page
        (child,) = children_of(victim.pid)
        victim.kill()
        victim.wait()
        wait_for(lambda: not alive(child), timeout=5, what="the orphaned child to exit")
        jobs = [
            wait_for(lambda j=j: finished(pg_db, j.id), timeout=60, what=f"job {j.id}")
            for j in [slow, *quick]
        ]
    finally:
        workers.stop_all()

    assert [j.status for j in jobs] == [JobStatus.succeeded] * 6, [j.error_message for j in jobs]
    done_slow, done_quick = jobs[0], jobs[1:]
    assert [j.attempt for j in done_quick] == [1] * 5  # each ran exactly once
    assert done_slow.attempt == 2 and str(victim.pid) not in (done_slow.worker_id or "")
    with pg_db.read() as s:
        rows = list(s.exec(select(Metric).order_by(Metric.id)))
    for job in done_quick:  # one attempt's rows, each step once
        assert [m.step for m in rows if m.job_id == job.id] == [1, 2, 3, 4, 5]
    slow_rows = [m for m in rows if m.job_id == slow.id]
    first = [m.step for m in slow_rows if m.attempt == 1]
    second = [m.step for m in slow_rows if m.attempt == 2]
    assert first and max(first) < min(second) and max(second) == 60  # resumed, not restarted
    assert len({j.worker_id for j in jobs}) >= 2  # the work was spread
