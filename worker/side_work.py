"""Work a worker does beside training: dataset token reports, adapter merges, exports, Hub
imports and evaluation reports.

A thread of the worker loop takes side work from `app.side_queue`, the way the loop takes jobs:
each round it requeues any worker's tasks whose lease expired, claims the oldest queued task of
each kind (an evaluation only while no training attempt holds the GPU), and runs it in a child
Python (`python -m worker.merge --task-id N --attempt A`) while
renewing the task's lease. So the loop process never imports the ML stack, a report never waits
behind the training job on the same worker (merges load the base on the CPU), and a child that
dies (the OOM killer, a crash) leaves a task that is requeued or, after its last attempt, failed
with a reason: never one "running" forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from app import side_queue
from app.db import Database
from app.models import Adapter, ModelExport, SideWorkStatus
from app.settings import Settings
from worker import gpu
from worker.gpu_lock import GpuLocks

log = logging.getLogger("tuneboard.worker.side")

EXIT_GRACE_SECONDS = 5.0  # a child that recorded its end exits within this
SIDE_TASK_TIMEOUT_SECONDS = 30 * 60
TICK_SECONDS = 0.1

# kinds whose child computes on the worker's GPU (the others load tokenizers, or the CPU)
ON_THE_GPU = ("evaluation",)
GPU_BUSY_NOTICE = "Waiting for the GPU: a training job is using it."
LOCK_HELD_ENV = "TUNEBOARD_GPU_COMPUTE_LOCK_HELD"  # read by the child (worker/evaluation.py)

# kind -> the module whose `python -m ... --task-id N --attempt A` runs one claimed task
CHILDREN = {
    "dataset_report": "worker.dataset_report",
    "merge": "worker.merge",
    "hub_import": "worker.hub_import",
    "export": "worker.export",
    "evaluation": "worker.evaluation",
}


def run_side_work(
    settings: Settings,
    db: Database,
    stopping: threading.Event,
    env: dict[str, str],
    log_path: Path,
    worker_id: str | None = None,
) -> None:
    """Until `stopping`: recover expired tasks, then claim and run queued ones, one at a time."""
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-side"
    while not stopping.is_set():
        ran = False
        try:
            recovered = side_queue.requeue_expired(db)
            if recovered:
                log.warning("requeued or failed side work whose lease expired: %s", recovered)
        except SQLAlchemyError:
            log.exception("could not recover expired side work")
        for kind in CHILDREN:
            if stopping.is_set():
                break
            # An evaluation computes on the GPU: claimed only with the GPU's compute lock, which
            # its child shares, so it never runs beside a training attempt (worker/gpu_lock.py).
            locks = GpuLocks(
                gpu.parse_gpus(env.get("CUDA_VISIBLE_DEVICES", "")),
                settings.gpu_lock_dir,
                role="compute",
            )
            try:
                if kind in ON_THE_GPU and not locks.try_acquire():
                    side_queue.note_queued(db, kind, GPU_BUSY_NOTICE)
                    continue
                claim = side_queue.claim_next(db, kind, worker_id, settings.lease_seconds)
                if claim is not None:
                    ran = True
                    run_in_child(settings, db, claim, env, log_path, stopping, locks.fds)
            except SQLAlchemyError:
                log.exception("side work (%s): could not reach the queue; will try again", kind)
            finally:
                locks.release()
        if not ran:
            stopping.wait(settings.poll_seconds)


def run_in_child(
    settings: Settings,
    db: Database,
    claim: side_queue.SideClaim,
    env: dict[str, str],
    log_path: Path,
    stopping: threading.Event,
    lock_fds: list[int] | None = None,
) -> None:
    """Run one claimed task in a child, renewing its lease; settle it if the child could not.
    `lock_fds`: GPU locks this thread holds for the task, held by the child with it."""
    command = [sys.executable, "-m", CHILDREN[claim.kind]]
    command += ["--task-id", str(claim.task_id), "--attempt", str(claim.attempt)]
    if lock_fds:
        env = {**env, LOCK_HELD_ENV: "1"}
    with log_path.open("ab") as out:
        out.write(f"=== {claim}: {command}\n".encode())
        out.flush()
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            pass_fds=tuple(lock_fds or ()),
        )
    name = side_queue.NAMES[claim.kind]
    deadline = time.monotonic() + SIDE_TASK_TIMEOUT_SECONDS
    next_renewal = time.monotonic() + settings.heartbeat_seconds
    while child.poll() is None:
        now = time.monotonic()
        if now >= next_renewal:
            next_renewal = now + settings.heartbeat_seconds
            with contextlib.suppress(SQLAlchemyError):  # a blip: the next renewal tries again
                if not side_queue.heartbeat(db, claim, settings.lease_seconds):
                    # A renewal just after the child recorded its end is refused too: a child
                    # that is exiting finishes on its own; one that is not lost the task.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=EXIT_GRACE_SECONDS)
                    if child.poll() is None:
                        log.warning("%s: lease lost to another worker; child killed", claim)
                        child.kill()
                        child.wait()
                        return
                    break
        if now >= deadline:
            child.kill()
            child.wait()
            side_queue.finish(
                db,
                claim,
                SideWorkStatus.failed,
                error_kind="timeout",
                error_message=f"The {name} ran longer than {SIDE_TASK_TIMEOUT_SECONDS // 60} "
                "minutes and was stopped.",
                error_hint="Look at worker-side.log in the data dir for what it was doing.",
            )
            return
        if stopping.is_set():
            child.terminate()
            child.wait()
            side_queue.release_lost(db, claim, "was stopped with its worker")
            return
        time.sleep(TICK_SECONDS)
    # A child that recorded an end leaves nothing to settle (release_lost is fenced on that).
    if child.returncode == -signal.SIGKILL:
        what = "was killed (SIGKILL: most often the host ran out of memory)"
    elif child.returncode < 0:
        what = f"was stopped by {signal.Signals(-child.returncode).name}"
    else:
        what = f"ended (exit code {child.returncode}) without recording a result"
    if side_queue.release_lost(db, claim, what):
        log.warning("%s %s", claim, what)
    if claim.kind == "export":
        discard_export_staging(settings, db, claim.task_id)


def discard_export_staging(settings: Settings, db: Database, export_id: int) -> None:
    """Remove the half-built files of an export whose child died: never offered for download,
    and a requeued attempt starts afresh."""
    with db.read() as s:
        export = s.get(ModelExport, export_id)
        adapter = s.get(Adapter, export.adapter_id) if export is not None else None
    if adapter is not None:
        shutil.rmtree(settings.layout.export_staging(adapter.job_id, export_id), ignore_errors=True)


@contextlib.contextmanager
def lease_kept(db: Database, claim: side_queue.SideClaim, settings: Settings) -> Iterator[None]:
    """Renew a claim's lease while the block runs the task in this process (by hand, in tests)."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(settings.heartbeat_seconds):
            try:
                if not side_queue.heartbeat(db, claim, settings.lease_seconds):
                    return
            except SQLAlchemyError:
                log.exception("could not renew the lease of %s; will try again", claim)

    renewer = threading.Thread(
        target=renew, name=f"lease-{claim.kind}-{claim.task_id}", daemon=True
    )
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
