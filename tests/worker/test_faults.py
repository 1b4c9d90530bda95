"""Fault tests with the real training child (`python -m worker.run` driving worker/recipes/sft.py)
on the tiny demo model, on the CPU, through a real worker loop and the database queue.

Faults that need a hook inside training use `tests.fakes.hooked_training`: the real child and
recipe with one injected fault (see its docstring), passed as the worker's child command.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import queue
from app.db import Database
from app.models import BaseModelEntry, JobStatus
from app.settings import Settings
from tests.fakes.real_workers import (
    MODEL,
    RealWorkers,
    add_demo,
    all_steps,
    checkpoints_of,
    children_of,
    complete_steps,
    kill,
    real_job,
    short_lease_settings,
    train_steps,
)
from tests.worker.test_loop import alive, finished, metrics, wait_for
from worker.checkpoints import COMPLETE_MARKER

pytestmark = pytest.mark.slow

# Generous: a cold child on two cores shared with other work (imports, model load, the steps).
JOB_TIMEOUT = 300.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return short_lease_settings(tmp_path / "data")


# --- SIGKILL mid-checkpoint ------------------------------------------------------------------


def test_sigkill_mid_checkpoint_the_partial_is_ignored_and_the_next_attempt_resumes(
    db, settings, real_workers, demo_build
):
    dataset_id = add_demo(db, settings, demo_build)
    job = real_job(db, dataset_id, max_steps=8, save_every=2)
    hooked = {
        "TUNEBOARD_TEST_CHILD": "tests.fakes.hooked_training",
        "TUNEBOARD_TEST_HOOK": "stall_checkpoint:4",
    }
    first = real_workers.start(**hooked)
    stalled = settings.runs_dir / str(job.id) / "stalled"
    wait_for(stalled.exists, timeout=JOB_TIMEOUT, what="the child to stall inside checkpoint 4")
    (child,) = children_of(first.pid)

    # The host dies mid-write: worker and child SIGKILLed together, checkpoint-4 half written.
    first.kill()
    kill(child)
    wait_for(lambda: not alive(child), timeout=5, what="the child to die")
    assert complete_steps(settings, job.id) == [2]
    partial = checkpoints_of(settings, job.id) / "checkpoint-4"
    assert partial.is_dir() and not (partial / COMPLETE_MARKER).exists()
    assert (partial / "adapter_model.safetensors").is_file()
    assert not (partial / "trainer_state.json").exists()

    real_workers.start(**hooked)  # the hook stalls attempt 1 only
    done = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="attempt 2")

    assert (done.status, done.attempt) == (JobStatus.succeeded, 2), done.error_message
    assert train_steps(db, job.id, 1) == [1, 2, 3, 4]
    # Resumed from the complete checkpoint at step 2, not from the partial one at step 4.
    assert train_steps(db, job.id, 2) == [3, 4, 5, 6, 7, 8]
    assert complete_steps(settings, job.id)[-2:] == [6, 8]
    assert (settings.runs_dir / str(job.id) / "adapter" / "adapter_model.safetensors").is_file()


# --- disk full during a checkpoint -----------------------------------------------------------


@pytest.fixture
def small_disk(settings: Settings) -> Iterator[Path]:
    """The runs folder on its own 32 MiB tmpfs (the database stays on the big disk)."""
    runs = settings.runs_dir
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "tmpfs", str(runs)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield runs
    finally:
        subprocess.run(["umount", "-l", str(runs)], check=False)


def test_disk_full_during_a_checkpoint_fails_clearly_and_the_previous_one_resumes(
    db, settings, small_disk, real_workers, demo_build
):
    dataset_id = add_demo(db, settings, demo_build)
    job = real_job(db, dataset_id, max_steps=8, save_every=2)
    real_workers.start(
        TUNEBOARD_TEST_CHILD="tests.fakes.hooked_training",
        TUNEBOARD_TEST_HOOK="fill_disk_after:2",
    )
    failed = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="the disk to fill")

    assert (failed.status, failed.error_kind) == (JobStatus.failed, "disk_full"), (
        failed.error_kind,
        failed.error_message,
    )
    assert "disk full" in (failed.error_message or "").lower()
    assert "step 4" in (failed.error_message or "")
    assert "Traceback" not in (failed.error_message or "")
    assert "free space" in (failed.error_hint or "").lower()
    # The previous checkpoint is kept, whole; the half-written one is gone.
    assert all_steps(settings, job.id) == [2]
    assert complete_steps(settings, job.id) == [2]

    (small_disk / str(job.id) / "filler").unlink()  # the user frees space, then retries
    queue.retry(db, job.id)
    done = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="the retry")

    assert (done.status, done.attempt) == (JobStatus.succeeded, 2), done.error_message
    assert train_steps(db, job.id, 1) == [1, 2, 3, 4]
    assert train_steps(db, job.id, 2) == [3, 4, 5, 6, 7, 8]  # resumed from the checkpoint at 2


# --- NaN loss, cancel ------------------------------------------------------------------------


def test_injected_nan_through_the_queue_stops_after_three_steps_without_a_checkpoint(
    db, settings, real_workers, demo_build
):
    dataset_id = add_demo(db, settings, demo_build)
    job = real_job(db, dataset_id, max_steps=20, save_every=1)
    real_workers.start(
        TUNEBOARD_TEST_CHILD="tests.fakes.hooked_training", TUNEBOARD_TEST_HOOK="nan_from:3"
    )
    done = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="the NaN stop")

    assert (done.status, done.error_kind, done.attempt) == (
        JobStatus.failed,
        "non_finite_loss",
        1,
    ), done.error_message
    message = done.error_message or ""
    assert "NaN or infinite for 3 steps in a row (up to step 5)" in message
    assert "Traceback" not in message
    assert "learning rate" in (done.error_hint or "")
    # Steps 3, 4, 5 were NaN: checkpoints 1 and 2 only, both complete.
    assert all_steps(settings, job.id) == [1, 2] == complete_steps(settings, job.id)
    rows = [m for m in metrics(db, job.id) if m.attempt == 1]
    # Step 5 raises before the Trainer logs it: the rows end at step 4 (3 and 4 without a loss).
    assert [m.step for m in rows] == [1, 2, 3, 4]
    assert all(m.loss is not None for m in rows[:2]) and all(m.loss is None for m in rows[2:])
    assert not (settings.runs_dir / str(job.id) / "adapter").exists()


def test_cancel_running_writes_a_checkpoint_then_cancels_and_cancel_queued_never_starts(
    db, settings, real_workers, demo_build
):
    dataset_id = add_demo(db, settings, demo_build)
    never = real_job(db, dataset_id, name="cancelled while queued")
    queue.request_cancel(db, never.id)
    running = real_job(db, dataset_id, name="cancelled while running", max_steps=2000)
    real_workers.start()
    wait_for(
        lambda: queue.get_job(db, running.id).progress_step >= 2,
        timeout=JOB_TIMEOUT,
        what="the job to train",
    )
    queue.request_cancel(db, running.id)
    done = wait_for(lambda: finished(db, running.id), timeout=20, what="the cancel")

    assert done.status == JobStatus.cancelled and done.error_kind is None
    assert 2 <= done.progress_step < 2000
    # save_every is 1000: the one checkpoint is the one the cancel wrote, at the last step.
    assert complete_steps(settings, running.id) == [done.progress_step]
    assert max(train_steps(db, running.id, 1)) == done.progress_step
    assert not (settings.runs_dir / str(running.id) / "adapter").exists()
    untouched = queue.get_job(db, never.id)
    assert (untouched.status, untouched.attempt, untouched.started_at) == (
        JobStatus.cancelled,
        0,
        None,
    )
    assert not (settings.runs_dir / str(never.id)).exists()


# --- missing model, unreachable hub ----------------------------------------------------------


def _idle_worker(real_workers: RealWorkers, db: Database, **env: str) -> None:
    from sqlmodel import select

    from app.models import Worker

    process = real_workers.start(**env)
    wait_for(lambda: _registered(db, process.pid, select, Worker), timeout=30, what="the worker up")


def _registered(db, pid, select, worker_model) -> bool:
    with db.read() as s:
        return s.exec(select(worker_model).where(worker_model.pid == pid)).first() is not None


def test_a_deleted_model_folder_fails_within_30_s_with_a_hint(
    db, settings, real_workers, demo_build
):
    dataset_id = add_demo(db, settings, demo_build)
    shutil.rmtree(settings.models_dir / MODEL)
    _idle_worker(real_workers, db)
    started = time.monotonic()
    job = real_job(db, dataset_id)
    done = wait_for(lambda: finished(db, job.id), timeout=30, what="the failure")

    assert time.monotonic() - started < 30
    assert (done.status, done.error_kind) == (JobStatus.failed, "model_not_found")
    assert str(settings.models_dir / MODEL) in (done.error_message or "")
    assert "Models page" in (done.error_hint or "")


def test_an_uncached_hub_model_with_the_hub_unreachable_fails_within_30_s(
    db, settings, real_workers, demo_build
):
    dataset_id = add_demo(db, settings, demo_build)
    with db.write() as s:
        s.add(BaseModelEntry(name="hub-model", source="tuneboard-test/not-cached-anywhere"))
    # Online mode, but the hub endpoint is a closed local port: every request is refused.
    _idle_worker(real_workers, db, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    started = time.monotonic()
    job = real_job(db, dataset_id, base_model="hub-model")
    done = wait_for(lambda: finished(db, job.id), timeout=30, what="the failure")

    assert time.monotonic() - started < 30
    assert (done.status, done.error_kind) == (JobStatus.failed, "model_not_found"), (
        done.error_message
    )
    assert "tuneboard-test/not-cached-anywhere" in (done.error_message or "")
    assert "network" in (done.error_hint or "")


# --- kill -9 of the web server mid-job -------------------------------------------------------


def test_the_server_killed_mid_job_the_job_goes_on_and_the_restarted_server_shows_it(
    tmp_path, demo_build
):
    import httpx

    from devkit.live_server import LiveServer

    server = LiveServer(tmp_path / "data").start()
    s = short_lease_settings(tmp_path / "data", database_url="")
    db = Database(s.resolved_database_url)
    pool = RealWorkers(s, tmp_path)
    try:
        dataset_id = add_demo(db, s, demo_build)
        total = 24
        job = real_job(db, dataset_id, max_steps=total, save_every=1000)
        # Half a second a step at least: the demo model trains 24 steps in about 2 s on a quick
        # machine, which would end the job before the server is down.
        pool.start(
            TUNEBOARD_TEST_CHILD="tests.fakes.hooked_training", TUNEBOARD_TEST_HOOK="pace:0.5"
        )
        wait_for(
            lambda: queue.get_job(db, job.id).progress_step >= 3,
            timeout=JOB_TIMEOUT,
            what="the job to train",
        )
        seen = httpx.get(f"{server.url}/api/jobs/{job.id}/metrics", timeout=5).json()
        assert seen  # the server showed the live run

        server.kill()  # SIGKILL: no shutdown of any kind
        at_kill = queue.get_job(db, job.id).progress_step
        wait_for(
            lambda: queue.get_job(db, job.id).progress_step >= at_kill + 3,
            timeout=JOB_TIMEOUT,
            what="training to go on without the server",
        )
        assert queue.get_job(db, job.id).status == JobStatus.running

        server.start()
        shown = httpx.get(f"{server.url}/api/jobs/{job.id}", timeout=5).json()
        assert shown["status"] in ("running", "succeeded")
        assert shown["progress_step"] >= at_kill + 3
        done = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="the job to end")
        assert (done.status, done.attempt) == (JobStatus.succeeded, 1), done.error_message

        rows = httpx.get(f"{server.url}/api/jobs/{job.id}/metrics", timeout=5).json()
        rows = rows["metrics"] if isinstance(rows, dict) else rows
        steps = [r["step"] for r in rows if r.get("loss") is not None]
        assert steps == list(range(1, total + 1))  # continuous: no gap, no duplicate
        page = httpx.get(f"{server.url}/jobs/{job.id}", timeout=5)
        assert page.status_code == 200 and "succeeded" in page.text.lower()
    finally:
        pool.stop_all()
        server.stop()
        db.dispose()
