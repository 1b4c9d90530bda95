"""The worker loop with real processes: a worker (tests.fakes.fake_worker) whose training child is
the stand-in (tests.fakes.fake_training), against a real SQLite file, with a 2 s lease."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from app import queue
from app.attempt_result import AdapterOutcome, AttemptResult
from app.db import Database
from app.models import FINISHED_STATUSES, Adapter, Job, JobStatus, Metric, Worker
from app.settings import Settings
from tests.conftest import POSTGRES_URL
from tests.fakes.jobs import add_job
from tests.fakes.real_workers import children_of, short_lease_settings
from worker.job_io import read_result
from worker.loop import RELEASED_NOTICE, child_environment

REPO = Path(__file__).resolve().parents[2]
SLOW_STEPS = 60


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return short_lease_settings(tmp_path / "data")


class Workers:
    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings, self.folder = settings, folder
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, gpus: str = "") -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "TUNEBOARD_DATA_DIR": str(self.settings.resolved_data_dir),
            "TUNEBOARD_DATABASE_URL": self.settings.resolved_database_url,
            "TUNEBOARD_LEASE_SECONDS": str(self.settings.lease_seconds),
            "TUNEBOARD_HEARTBEAT_SECONDS": str(self.settings.heartbeat_seconds),
            "TUNEBOARD_POLL_SECONDS": str(self.settings.poll_seconds),
        }
        out = (self.folder / f"worker-{len(self.processes)}.out").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.fake_worker", "--gpus", gpus],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def output(self, index: int) -> str:
        return (self.folder / f"worker-{index}.out").read_text()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(settings, tmp_path)
    yield w
    w.stop_all()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def finished(db, job_id: int) -> Job | None:
    job = queue.get_job(db, job_id)
    return job if job.status in FINISHED_STATUSES else None


def running_at_step(db, job_id: int, step: int) -> Job | None:
    job = queue.get_job(db, job_id)
    return job if job.status == JobStatus.running and job.progress_step >= step else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def metrics(db, job_id: int) -> list[Metric]:
    with db.read() as s:
        return list(s.exec(select(Metric).where(Metric.job_id == job_id).order_by(Metric.id)))


def test_a_job_runs_once_and_registers_its_adapter(db, settings, workers):
    job = add_job(db, settings)
    worker = workers.start()
    done = wait_for(lambda: finished(db, job.id), what="the job to finish")

    assert done.status == JobStatus.succeeded, done.error_message
    assert (done.attempt, done.progress_step, done.compute_mode) == (1, 5, "fake on CPU")
    assert done.vram_before_mib is None  # CPU: no NVML reading
    assert [m.step for m in metrics(db, job.id)] == [1, 2, 3, 4, 5]
    with db.read() as s:
        adapter = s.get(Adapter, f"job-{job.id}")
        row = s.exec(select(Worker).where(Worker.pid == worker.pid)).one()
    assert adapter is not None and (adapter.size_bytes, adapter.eval_loss) == (128, 0.5)
    assert (row.gpus, row.stopped) == ("", False)
    assert read_result(settings.layout.attempt_result(job.id, 1)) == AttemptResult(
        status="succeeded", adapter=AdapterOutcome(size_bytes=128, eval_loss=0.5)
    )
    assert "succeeded" in settings.layout.attempt_log(job.id, 1).read_text()


def test_cancel_queued_never_starts_and_cancel_running_ends_cancelled(db, settings, workers):
    never = add_job(db, settings)
    queue.request_cancel(db, never.id)
    slow = add_job(db, settings, name="fake slow")
    workers.start()
    wait_for(lambda: running_at_step(db, slow.id, 3), what="the slow job to train")
    queue.request_cancel(db, slow.id)
    done = wait_for(lambda: finished(db, slow.id), timeout=5, what="the cancel")

    assert done.status == JobStatus.cancelled
    assert done.progress_step < SLOW_STEPS
    assert (settings.runs_dir / str(slow.id) / "fake-checkpoint.json").exists()
    untouched = queue.get_job(db, never.id)
    assert (untouched.status, untouched.attempt) == (JobStatus.cancelled, 0)
    assert not (settings.runs_dir / str(never.id)).exists()


def test_sigkill_of_the_child_fails_the_job_as_killed_and_the_worker_goes_on(db, settings, workers):
    slow = add_job(db, settings, name="fake slow")
    worker = workers.start()
    wait_for(lambda: running_at_step(db, slow.id, 2), what="the slow job to train")
    (child,) = children_of(worker.pid)
    os.kill(child, signal.SIGKILL)
    done = wait_for(lambda: finished(db, slow.id), timeout=5, what="the failure")

    assert (done.status, done.error_kind) == (JobStatus.failed, "killed")
    assert "SIGKILL" in (done.error_message or "") and "RAM" in (done.error_hint or "")
    nxt = add_job(db, settings)
    assert wait_for(lambda: finished(db, nxt.id)).status == JobStatus.succeeded


def test_sigkill_of_the_worker_requeues_and_another_worker_resumes(db, settings, workers):
    slow = add_job(db, settings, name="fake slow")
    first = workers.start()
    wait_for(lambda: running_at_step(db, slow.id, 3), what="the slow job to train")
    (child,) = children_of(first.pid)
    first.kill()
    # The orphaned child notices its worker is gone and exits, freeing the GPU.
    wait_for(lambda: not alive(child), timeout=5, what="the orphaned child to exit")
    workers.start()
    done = wait_for(lambda: finished(db, slow.id), timeout=30, what="the second worker")

    assert (done.status, done.attempt) == (JobStatus.succeeded, 2)
    assert "lost its worker" in (done.notice or "")
    rows = metrics(db, slow.id)
    first_steps = [m.step for m in rows if m.attempt == 1]
    second_steps = [m.step for m in rows if m.attempt == 2]
    assert first_steps and second_steps
    assert max(first_steps) < min(second_steps) and max(second_steps) == SLOW_STEPS


def live_workers(db) -> list[Worker]:
    with db.read() as s:
        return list(s.exec(select(Worker).where(Worker.stopped == False)))  # noqa: E712


def test_a_second_worker_on_the_same_gpu_waits_until_the_first_and_its_child_are_gone(
    db, settings, workers
):
    slow = add_job(db, settings, name="fake slow")
    quick = add_job(db, settings)
    first = workers.start(gpus="0")
    wait_for(lambda: running_at_step(db, slow.id, 2), what="the slow job to train")
    (child,) = children_of(first.pid)

    workers.start(gpus="0")
    wait_for(
        lambda: "GPU 0 is owned by another Tuneboard worker" in workers.output(1),
        what="the second worker to say it waits for GPU 0",
    )
    assert [w.pid for w in live_workers(db)] == [first.pid]  # it claims nothing while it waits
    assert queue.get_job(db, quick.id).status == JobStatus.queued

    first.kill()  # its child holds the GPU's lock until it has noticed and exited
    second = wait_for(
        lambda: [w for w in live_workers(db) if w.pid != first.pid], what="the second worker"
    )
    assert not alive(child)
    for job in (slow, quick):
        done = wait_for(lambda j=job: finished(db, j.id), timeout=30, what="the second worker")
        assert done.status == JobStatus.succeeded and second[0].id == done.worker_id


def pause_outside_a_write(process: subprocess.Popen[bytes], settings: Settings) -> None:
    """SIGSTOP `process` at a moment it holds no SQLite write lock: a worker frozen inside a
    write transaction (its heartbeat's, a fraction of a millisecond in 0.3 s) would hold every
    other writer off the database file until it runs again, which no lease can break; such a
    pause is SQLite's limit, not the takeover this test is about."""
    path = settings.resolved_database_url.removeprefix("sqlite:///")
    for _ in range(100):
        process.send_signal(signal.SIGSTOP)
        probe = sqlite3.connect(path, timeout=0.2)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            return
        except sqlite3.OperationalError:  # "database is locked": it stopped mid-write
            process.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        finally:
            probe.close()
    raise AssertionError("the worker never stopped outside a write")


def test_a_paused_worker_loses_the_job_and_its_writes_are_refused(db, settings, workers):
    slow = add_job(db, settings, name="fake slow")
    first = workers.start()
    wait_for(lambda: running_at_step(db, slow.id, 2), what="the slow job to train")
    pause_outside_a_write(first, settings)
    second = workers.start()
    wait_for(lambda: queue.get_job(db, slow.id).attempt == 2, timeout=30, what="a takeover")
    time.sleep(settings.heartbeat_seconds * 2)
    first.send_signal(signal.SIGCONT)
    done = wait_for(lambda: finished(db, slow.id), timeout=30, what="the second worker")

    assert (done.status, done.attempt) == (JobStatus.succeeded, 2)
    assert str(second.pid) in (done.worker_id or "")
    assert done.started_at is not None
    assert all(m.created_at < done.started_at for m in metrics(db, slow.id) if m.attempt == 1)
    # After SIGCONT the first worker's release (or its lease renewal) is refused as stale.
    refused = (f"job {slow.id} attempt 1 is stale", f"job {slow.id} attempt 1: lease lost")
    wait_for(
        lambda: any(line in workers.output(0) for line in refused),
        timeout=5,
        what="the first worker's write to be refused",
    )
    assert first.poll() is None  # it survived and goes on claiming


def test_sigterm_puts_the_job_back_and_the_worker_exits_quickly(db, settings, workers):
    slow = add_job(db, settings, name="fake slow")
    worker = workers.start()
    wait_for(lambda: running_at_step(db, slow.id, 2), what="the slow job to train")
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert time.monotonic() - started < 5

    job = queue.get_job(db, slow.id)
    assert (job.status, job.attempt, job.notice) == (JobStatus.queued, 1, RELEASED_NOTICE)
    assert 2 <= job.progress_step < SLOW_STEPS
    assert read_result(settings.layout.attempt_result(slow.id, 1)) == AttemptResult(
        status="released"
    )
    with db.read() as s:
        assert s.exec(select(Worker).where(Worker.pid == worker.pid)).one().stopped


def test_out_of_memory_retries_once_with_half_the_micro_batch(db, settings, workers):
    recovers = add_job(db, settings, name="fake oom", micro_batch_size=4, grad_accum_steps=4)
    never = add_job(db, settings, name="fake oom always", micro_batch_size=4, grad_accum_steps=4)
    workers.start()
    done = wait_for(lambda: finished(db, recovers.id), what="the OOM retry")
    fails = wait_for(lambda: finished(db, never.id), what="the second OOM")

    assert (done.status, done.attempt, done.oom_retries) == (JobStatus.succeeded, 2, 1)
    assert (done.config["micro_batch_size"], done.config["grad_accum_steps"]) == (2, 8)
    assert done.notice == (
        "Ran out of GPU memory at step 2 (micro-batch 4, sequence 2048); retrying with "
        "micro-batch 2 and accumulation 8 (same effective batch)."
    )
    assert (fails.status, fails.error_kind, fails.attempt) == (JobStatus.failed, "oom", 2)
    assert fails.config["micro_batch_size"] == 2
    assert "micro-batch" in (fails.error_hint or "")


def test_crashes_are_reported_without_tracebacks(db, settings, workers):
    crash = add_job(db, settings, name="fake crash")
    gone = add_job(db, settings, name="fake exit")
    workers.start()
    crashed = wait_for(lambda: finished(db, crash.id))
    exited = wait_for(lambda: finished(db, gone.id))

    assert (crashed.status, crashed.error_kind) == (JobStatus.failed, "unknown")
    assert "the stand-in crashed on purpose" in (crashed.error_message or "")
    assert "Traceback" not in (crashed.error_message or "")
    assert "Traceback" in settings.layout.attempt_log(crash.id, 1).read_text()
    assert (exited.status, exited.error_kind) == (JobStatus.failed, "unknown")
    assert "exited with 3" in (exited.error_message or "")
    assert "the stand-in exits without a result" in (exited.error_message or "")


@pytest.mark.postgres
def test_a_worker_runs_a_job_against_postgresql(pg_db: Database, tmp_path: Path):
    pg_settings = short_lease_settings(tmp_path / "data", database_url=POSTGRES_URL)
    pg_workers = Workers(pg_settings, tmp_path)
    try:
        job = add_job(pg_db, pg_settings)
        pg_workers.start()
        done = wait_for(lambda: finished(pg_db, job.id), what="the job to finish")
    finally:
        pg_workers.stop_all()
    assert done.status == JobStatus.succeeded, done.error_message
    assert [m.step for m in metrics(pg_db, job.id)] == [1, 2, 3, 4, 5]


def test_the_worker_loop_never_imports_torch():
    code = "import sys, worker.loop, worker.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_training_children_find_the_users_hub_token_and_cache_models_in_the_data_dir(
    settings, tmp_path, monkeypatch
):
    """A user who ran `hf auth login` can train a gated model: the child keeps the user's HF_HOME
    (where the token lives) and only the download cache moves into the data dir."""
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text("hf_the_users_token")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    env = child_environment(settings, "0")
    code = (
        "from huggingface_hub import constants, get_token; "
        "print(get_token()); print(constants.HF_HUB_CACHE)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    token, cache = out.stdout.split()
    assert token == "hf_the_users_token"
    assert Path(cache) == settings.resolved_data_dir / "hf" / "hub"


def test_a_job_waits_while_an_evaluation_report_computes_on_its_gpu(db, settings, workers):
    from worker.gpu_lock import GpuLocks

    # What the side-work thread holds while an evaluation's child runs on GPU 0.
    evaluation = GpuLocks([0], Path(os.environ["TUNEBOARD_GPU_LOCK_DIR"]), role="compute")
    assert evaluation.try_acquire()
    try:
        job = add_job(db, settings)
        workers.start(gpus="0")
        wait_for(
            lambda: "computing an evaluation report" in workers.output(0),
            what="the worker to say it waits for the evaluation",
        )
        assert queue.get_job(db, job.id).status == JobStatus.queued
    finally:
        evaluation.release()
    done = wait_for(lambda: finished(db, job.id), timeout=30, what="the job after the evaluation")
    assert done.status == JobStatus.succeeded
