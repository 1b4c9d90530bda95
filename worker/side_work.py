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

No task has a time limit: a GGUF export of a 70B model or a large Hub import may take hours. At
each renewal the loop reads what the task reports (its stage, rows, bytes or steps), and kills a
child (with what it started) whose task reported nothing new for TUNEBOARD_SIDE_TASK_STALL_SECONDS,
failing it as "stalled" with how far it got. So each child reports as it works, also in the steps
a library runs without a word (`worker/progress_meter.py`).

Each kind's module runs its claimed task with `child_main`, and `run_pending` runs the queued
tasks of a kind in the calling process (tests, and by hand without a worker).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app import side_queue
from app.db import Database
from app.leases import renewing
from app.models import Adapter, ModelExport, SideWorkStatus
from app.settings import Settings
from worker import gpu
from worker.gpu_lock import GpuLocks

log = logging.getLogger("tuneboard.worker.side")

EXIT_GRACE_SECONDS = 5.0  # a child that recorded its end exits within this
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

# runs one claimed task in this process and records how it ended; False if the claim went stale
RunClaimed = Callable[[Settings, Database, side_queue.SideClaim], bool]


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
    # The watchdog: no fixed time limit (a 70B export or a large import may take hours), but a
    # child whose task reports nothing new for the stall window is stopped.
    watch = StallWatch(settings.side_task_stall_seconds, time.monotonic())
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
                        signal_group(child, signal.SIGKILL)
                        return
                    break
                if watch.stalled(side_queue.progress_of(db, claim), now):
                    log.warning("%s: no progress for %ss; child killed", claim, watch.window)
                    signal_group(child, signal.SIGKILL)
                    side_queue.stop_stalled(db, claim, watch.window)
                    break  # as a killed child: an export's half-built files are removed
        if stopping.is_set():
            signal_group(child, signal.SIGTERM)
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


@dataclass
class StallWatch:
    """When a side task last showed progress: any change in what its child reports (stage,
    rows, bytes, steps). `stalled` is true once nothing changed for `window` seconds."""

    window: float
    moved_at: float
    seen: tuple[Any, ...] | None = None

    def stalled(self, progress: tuple[Any, ...] | None, now: float) -> bool:
        if progress is None:  # the task ended or went to another worker: not ours to stop
            return False
        if progress != self.seen:
            self.seen, self.moved_at = progress, now
            return False
        return now - self.moved_at >= self.window


def signal_group(child: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child and what it started (llama.cpp's converter...): its session's process
    group (the child leads it), then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)
    child.wait()


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
    with renewing(
        lambda: side_queue.heartbeat(db, claim, settings.lease_seconds),
        settings.heartbeat_seconds,
        f"{claim.kind}-{claim.task_id}",
    ):
        yield


def run_pending(
    settings: Settings,
    kind: str,
    run: RunClaimed,
    worker_id: str | None = None,
    task_id: int | None = None,
) -> int:
    """Claim and run the queued tasks of a kind in this process, one at a time, each under a
    renewed lease (`task_id`: only that one, if it is queued); returns how many ran. Safe to call
    from several workers at once: each task is claimed by exactly one."""
    db = Database(settings.resolved_database_url)
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{kind}"
    ran = 0
    try:
        while claim := side_queue.claim_next(db, kind, worker_id, settings.lease_seconds, task_id):
            with lease_kept(db, claim, settings):
                run(settings, db, claim)
            ran += 1
    finally:
        db.dispose()
    return ran


def child_main(
    kind: str,
    run: RunClaimed,
    argv: list[str] | None,
    description: str,
    pending: Callable[[Settings], int] | None = None,
    by_id: str | None = None,
) -> int:
    """`python -m worker.<kind> --task-id N --attempt A`: run the task the side loop claimed
    (settings from TUNEBOARD_*); exit 1 if the claim went stale. For running queued tasks by
    hand, without a worker: `pending` (the kind's `run_pending_...`) runs them all for
    `--pending`, and `by_id` ("--report-id") names the option that runs one."""
    name = side_queue.NAMES[kind]
    by_hand = pending is not None or by_id is not None
    parser = argparse.ArgumentParser(description=description)
    which = parser.add_mutually_exclusive_group(required=True) if by_hand else parser
    if by_id:
        which.add_argument(
            by_id, type=int, dest="by_id", metavar="ID", help=f"run this queued {name}"
        )
    if pending:
        which.add_argument("--pending", action="store_true", help=f"run every queued {name}")
    which.add_argument(
        "--task-id", type=int, required=not by_hand, help=f"the {name} a worker claimed"
    )
    parser.add_argument("--attempt", type=int, required=not by_hand, help="the claim's attempt")
    args = parser.parse_args(argv)
    settings = Settings()
    if pending and args.pending:
        print(f"{pending(settings)} {name}(s) done")
        return 0
    if by_id and args.by_id is not None:
        return _run_one_by_hand(settings, kind, run, args.by_id)
    if args.attempt is None:
        parser.error("--task-id needs --attempt")
    db = Database(settings.resolved_database_url)
    try:
        return 0 if run(settings, db, side_queue.SideClaim(kind, args.task_id, args.attempt)) else 1
    finally:
        db.dispose()


def _run_one_by_hand(settings: Settings, kind: str, run: RunClaimed, task_id: int) -> int:
    name = side_queue.NAMES[kind]
    if not run_pending(settings, kind, run, task_id=task_id):
        print(f"{name} {task_id} is not queued (done, failed, or taken)", file=sys.stderr)
        return 1
    db = Database(settings.resolved_database_url)
    try:
        with db.read() as s:
            task = s.get(side_queue.KINDS[kind], task_id)
    finally:
        db.dispose()
    assert task is not None
    error = f": {task.error_message}" if task.error_message else ""
    print(f"{name} {task_id}: {task.status.value}{error}")
    return 0 if task.status == SideWorkStatus.succeeded else 1
