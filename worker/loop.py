"""The worker loop: claim one job at a time and run each attempt in a fresh child process.

This process never imports torch: the child (`python -m worker.run`) owns the GPU, so a crash, an
OOM or a leak dies with it and the memory is returned. The loop:

- registers a `Worker` row and heartbeats it (a thread) with GPU readings;
- requeues jobs whose lease expired (any worker does this for every other worker);
- claims the next job, starts the child with `CUDA_VISIBLE_DEVICES` set, its output in
  `runs/<job>/attempt-<A>.log`, and renews the job's lease while it runs; a refused renewal means
  another attempt owns the job now, so the child is killed and nothing more is written. A job with
  `gpus: N > 1` runs under `torchrun --standalone --nproc_per_node N` (one child per GPU; rank 0
  reports, see worker/run.py); the kill reaches every rank through the child's process group;
- records how the attempt ended, from the child's `AttemptResult` (app/attempt_result.py) or,
  when there is none, from its exit: SIGKILL fails the job as "killed" (most often the host ran out of RAM; a
  retry would likely die the same way, so the user decides), anything else as "unknown" with the
  last lines of the log. A first CUDA OOM requeues the job with half the micro-batch;
- on SIGTERM/SIGINT forwards SIGTERM to the child (it checkpoints and reports "released"), waits
  up to SHUTDOWN_GRACE_SECONDS, then kills it; the job goes back to the queue either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any
from uuid import uuid4

from sqlalchemy.exc import SQLAlchemyError

import worker
from app import queue
from app.attempt_result import AttemptResult, OomDetails
from app.db import Database
from app.models import JobStatus, Worker
from app.settings import Settings
from app.train_config import TrainConfig
from worker import failures, gpu
from worker.gpu_lock import GpuLocks
from worker.job_io import read_result
from worker.side_work import run_side_work

log = logging.getLogger("worker")

SHUTDOWN_GRACE_SECONDS = 60.0  # how long a stopping worker waits for the child's checkpoint
SUPERVISE_TICK_SECONDS = 0.1
LOG_TAIL_LINES = 20
WAITING_FOR_EVALUATION = (
    "GPU %s is computing an evaluation report; the next job starts when it is done"
)
RELEASED_NOTICE = (
    "The worker stopped while this job ran; it went back to the queue and resumes from its last "
    "complete checkpoint."
)


def default_child_command() -> list[str]:
    return [sys.executable, "-m", "worker.run"]


def distributed_command(child_command: list[str], nproc: int) -> list[str]:
    """The child command under PyTorch's launcher for a job on `nproc` GPUs (unchanged for one).

    `[python, -m, worker.run, ...]` becomes `[python, -m, torch.distributed.run, --standalone,
    --nproc_per_node, N, -m, worker.run, ...]`: the same interpreter, one process per GPU,
    rendezvous on a free local port (several workers on one host do not collide).
    """
    if nproc <= 1:
        return list(child_command)
    if len(child_command) < 3 or child_command[1] != "-m":
        raise ValueError(f"a multi-GPU child must be `python -m module`, not {child_command}")
    python, _, *module_and_args = child_command
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        *module_and_args,
    ]


def job_gpus(config: dict[str, Any]) -> int:
    return int(config.get("gpus") or 1)


def child_environment(settings: Settings, gpus: str) -> dict[str, str]:
    """The child reads Settings from the environment: hand it this worker's, resolved."""
    env = dict(os.environ)
    package_root = str(Path(worker.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(
        {
            "TUNEBOARD_DATA_DIR": str(settings.resolved_data_dir),
            "TUNEBOARD_DATABASE_URL": settings.resolved_database_url,
            "TUNEBOARD_LEASE_SECONDS": str(settings.lease_seconds),
            "TUNEBOARD_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "TUNEBOARD_POLL_SECONDS": str(settings.poll_seconds),
            "TUNEBOARD_MAX_ATTEMPTS": str(settings.max_attempts),
            "TUNEBOARD_DATABASE_BUSY_TIMEOUT_SECONDS": str(settings.database_busy_timeout_seconds),
            "TUNEBOARD_HF_OFFLINE": "true" if settings.hf_offline else "false",
            "TUNEBOARD_TRUST_REMOTE_CODE_MODELS": json.dumps(settings.trust_remote_code_models),
            # The cache only: HF_HOME stays the user's, so the token `hf auth login` saved there
            # (or HF_TOKEN) reaches the child and gated models download.
            "HF_HUB_CACHE": str(settings.hf_hub_cache),
            "CUDA_VISIBLE_DEVICES": gpus,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.gpu_lock_dir is not None:
        env["TUNEBOARD_GPU_LOCK_DIR"] = str(settings.gpu_lock_dir)
    if settings.hf_offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def kill_tree(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child and what it started in its session (torchrun's ranks start their own
    sessions too, so those are named one by one)."""
    for pid in [*_descendants(child.pid), child.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found += [child, *_descendants(child)]
    return found


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError:
        return []


class WorkerLoop:
    def __init__(
        self,
        settings: Settings,
        gpus: str,
        child_command: list[str],
        *,
        inference: bool = True,
        parent_pid: int | None = None,
    ) -> None:
        self.settings = settings
        self.gpus = gpus
        self.gpu_indices = gpu.parse_gpus(gpus)
        self.locks = GpuLocks(self.gpu_indices, settings.gpu_lock_dir)
        self.compute = GpuLocks(self.gpu_indices, settings.gpu_lock_dir, role="compute")
        self.parent_pid = parent_pid
        self.child_command = child_command
        self.db = Database(settings.resolved_database_url, settings.database_busy_timeout_seconds)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self._heartbeat_done = threading.Event()
        self.current_job_id: int | None = None
        self.serve_inference = inference
        self.inference: subprocess.Popen[bytes] | None = None
        self.inference_secret = secrets.token_urlsafe(32)

    # --- lifecycle ------------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self.stopping.set()

    def run(self) -> None:
        if self.parent_pid:
            threading.Thread(
                target=self._stop_when_orphaned, name="worker-parent", daemon=True
            ).start()
        if not self.locks.acquire(self.stopping, on_wait=self._say_waiting):
            log.info("worker stopped before its GPUs were free")
            return
        try:
            self._serve()
        finally:
            self.locks.release()

    def _say_waiting(self, index: int, path: Path, owner: str) -> None:
        log.warning(
            "GPU %d is owned by another Tuneboard worker on this host (%s, lock %s); waiting for "
            "it to stop. Two workers never train on one GPU: stop the other worker, or start this "
            "one with another --gpu.",
            index,
            owner,
            path,
        )

    def _stop_when_orphaned(self) -> None:
        """The process that started this worker (`tuneboard serve`) is gone, even by SIGKILL: stop
        as on SIGTERM (the job checkpoints and goes back to the queue), so that a restarted server's
        worker is the only one on this GPU."""
        while os.getppid() == self.parent_pid and not self.stopping.wait(1.0):
            pass
        if not self.stopping.is_set():
            log.warning(
                "the process that started this worker (pid %s) is gone; stopping", self.parent_pid
            )
            self.stopping.set()

    def _serve(self) -> None:
        self.register()
        beat = threading.Thread(
            target=self._heartbeat_forever, name="worker-heartbeat", daemon=True
        )
        beat.start()
        side = threading.Thread(
            target=run_side_work,
            args=(
                self.settings,
                self.db,
                self.stopping,
                child_environment(self.settings, self.gpus),
                self.settings.layout.side_work_log,
                f"{self.id}-side",
            ),
            name="worker-side-work",
            daemon=True,
        )
        side.start()
        if self.serve_inference:
            self._start_inference()
        log.info("worker %s started (gpus=%r)", self.id, self.gpus)
        waiting = False
        try:
            while not self.stopping.is_set():
                # One computation a GPU: an evaluation report that holds the card goes first
                # (it is short); the next job is claimed once it is done.
                if not self.compute.try_acquire():
                    if not waiting:
                        log.info(WAITING_FOR_EVALUATION, self.gpus)
                        waiting = True
                    self.stopping.wait(self.settings.poll_seconds)
                    continue
                waiting = False
                claim = self._next_claim()
                if claim is None:
                    self.compute.release()
                    self.stopping.wait(self.settings.poll_seconds)
                    continue
                try:
                    self.run_attempt(claim)
                except Exception:
                    # The worker outlives one attempt's trouble (database blip, disk error).
                    log.exception(
                        "job %s attempt %s: the worker failed", claim.job_id, claim.attempt
                    )
                    self._fail_quietly(claim)
                finally:
                    self.compute.release()
        finally:
            self._stop_inference()
            self._heartbeat_done.set()
            beat.join(timeout=5)
            try:
                queue.worker_stopped(self.db, self.id)
            except SQLAlchemyError:
                log.exception("could not mark the worker stopped")
            self.db.dispose()
            log.info("worker %s stopped", self.id)

    def _fail_quietly(self, claim: queue.Claim) -> None:
        """Fail the attempt (fenced); if even that fails, its lease expires and it is requeued."""
        try:
            queue.finish(
                self.db,
                claim.job_id,
                claim.attempt,
                JobStatus.failed,
                error_kind="unknown",
                error_message="The worker could not run or record this attempt.",
                error_hint=failures.hint_for("unknown") + " The worker's own log has the details.",
            )
        except Exception:
            log.exception("could not record the failure; the lease will expire")

    def register(self) -> None:
        readings = gpu.read_gpus(self.gpu_indices)
        queue.register_worker(
            self.db,
            Worker(
                id=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                gpus=self.gpus,
                gpu_name=", ".join(r.name for r in readings),
                vram_total_mib=sum(r.total_mib for r in readings),
                vram_used_mib=sum(r.used_mib for r in readings),
            ),
        )

    def _heartbeat_forever(self) -> None:
        while not self._heartbeat_done.wait(self.settings.heartbeat_seconds):
            readings = gpu.read_gpus(self.gpu_indices)
            fields: dict[str, Any] = {"current_job_id": self.current_job_id}
            if readings:
                fields["vram_used_mib"] = sum(r.used_mib for r in readings)
                fields["gpu_utilization"] = readings[0].utilization
                fields["gpu_temperature"] = readings[0].temperature
            try:
                queue.worker_heartbeat(self.db, self.id, **fields)
            except SQLAlchemyError:
                log.exception("worker heartbeat failed; will try again")

    def _next_claim(self) -> queue.Claim | None:
        try:
            requeued = queue.requeue_expired(self.db)
            if requeued:
                log.info("requeued or failed jobs whose lease expired: %s", requeued)
            # A CPU-only worker runs single-device jobs on the CPU.
            gpus = max(1, len(self.gpu_indices))
            return queue.claim_next_job(self.db, self.id, self.settings.lease_seconds, gpus=gpus)
        except SQLAlchemyError:
            log.exception("could not reach the queue; will try again")
            return None

    # --- one attempt ----------------------------------------------------------------------------

    def run_attempt(self, claim: queue.Claim) -> None:
        job_id, attempt = claim.job_id, claim.attempt
        log.info("job %s attempt %s: starting", job_id, attempt)
        log_path = self.settings.layout.attempt_log(job_id, attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        result_file = self.settings.layout.attempt_result(job_id, attempt)
        result_file.unlink(missing_ok=True)
        self.current_job_id = job_id

        self._unload_inference()  # the playground's model gives the card back to training
        vram_before = gpu.used_mib(self.gpu_indices)
        if vram_before is not None:
            queue.update_progress(self.db, job_id, attempt, vram_before_mib=vram_before)

        nproc = job_gpus(claim.config)
        command = [
            *distributed_command(self.child_command, nproc),
            "--job-id",
            str(job_id),
            "--attempt",
            str(attempt),
        ]
        env = child_environment(self.settings, self.gpus)
        if nproc > 1:
            # The job's own GPUs only; the ranks watch this worker's pid (their parent is
            # torchrun, which outlives a killed worker).
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpu_indices[:nproc]))
            env["TUNEBOARD_WORKER_PID"] = str(os.getpid())
        with log_path.open("ab") as log_file:
            log_file.write(f"=== attempt {attempt} on worker {self.id}: {command}\n".encode())
            log_file.flush()
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a Ctrl-C in the terminal reaches the worker only, which
                # forwards SIGTERM so the child can checkpoint.
                start_new_session=True,
                pass_fds=self.locks.fds,  # the GPU stays locked until the child is gone too
            )
            lost = self._supervise(child, claim)
        self.current_job_id = None

        if lost:
            log.warning(
                "job %s attempt %s: lease lost to another attempt; child killed, nothing recorded",
                job_id,
                attempt,
            )
            return
        vram_after = gpu.used_mib(self.gpu_indices)
        result = read_result(result_file)
        if result is None:
            result = self._result_from_exit(child.returncode, log_path)
        self.record(claim, result, vram_after)

    # --- the playground's inference server (worker/inference.py) -----------------------------------

    def _start_inference(self) -> None:
        """A child that serves chat generation for this worker's GPU; it writes its URL into this
        worker's row, which is how the web server finds it."""
        log_path = self.settings.layout.inference_log
        with log_path.open("ab") as out:
            self.inference = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.inference",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--worker-id",
                    self.id,
                    "--worker-pid",
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    **child_environment(self.settings, self.gpus),
                    # worker.inference.SECRET_VARIABLE (that module imports torch; this one never)
                    "TUNEBOARD_INFERENCE_SECRET": self.inference_secret,
                },
                start_new_session=True,
                pass_fds=self.locks.fds,
            )

    def _inference_url(self) -> str | None:
        with self.db.read() as s:
            row = s.get(Worker, self.id)
        return row.inference_url if row is not None else None

    def _unload_inference(self) -> None:
        if self.inference is None or self.inference.poll() is not None:
            return
        url = self._inference_url()
        if not url:
            return
        request = urllib.request.Request(
            url + "/unload",
            data=b"{}",
            method="POST",
            headers={
                "Authorization": f"Bearer {self.inference_secret}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=120):
                pass
        except OSError:
            log.warning("could not ask the inference server to unload its model", exc_info=True)

    def _stop_inference(self) -> None:
        if self.inference is None:
            return
        self.inference.terminate()
        try:
            self.inference.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.inference.kill()

    def _supervise(self, child: subprocess.Popen[bytes], claim: queue.Claim) -> bool:
        """Wait for the child, renewing the lease. True if the lease was lost (child killed)."""
        lost = False
        term_sent_at: float | None = None
        next_renewal = time.monotonic() + self.settings.heartbeat_seconds
        while True:
            try:
                child.wait(timeout=SUPERVISE_TICK_SECONDS)
                return lost
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self.stopping.is_set() and not lost:
                if term_sent_at is None:
                    log.info("job %s: stopping, asking the child to checkpoint", claim.job_id)
                    if job_gpus(claim.config) > 1:
                        # The ranks themselves: torchrun would give them only 30 s before SIGKILL.
                        for pid in _descendants(child.pid):
                            with contextlib.suppress(ProcessLookupError, PermissionError):
                                os.kill(pid, signal.SIGTERM)
                    else:
                        child.terminate()
                    term_sent_at = now
                elif now - term_sent_at > SHUTDOWN_GRACE_SECONDS:
                    log.warning("job %s: child ignored SIGTERM; killing it", claim.job_id)
                    kill_tree(child)
            if now >= next_renewal and not lost:
                next_renewal = now + self.settings.heartbeat_seconds
                try:
                    renewed = queue.heartbeat(
                        self.db, claim.job_id, claim.attempt, self.settings.lease_seconds
                    )
                except SQLAlchemyError:
                    log.exception("could not renew the lease; will try again")
                    continue
                if not renewed:
                    lost = True
                    kill_tree(child)

    def _result_from_exit(self, returncode: int, log_path: Path) -> AttemptResult:
        if self.stopping.is_set():
            # Killed after the grace period, or died while stopping: not the job's fault.
            return AttemptResult(status="released")
        tail = [line for line in log_tail(log_path) if not line.startswith("=== attempt")]
        return failures.classify_exit(returncode, tail)

    def record(self, claim: queue.Claim, result: AttemptResult, vram_after: int | None) -> None:
        """Record the attempt's end with the fenced queue operations."""
        job_id, attempt = claim.job_id, claim.attempt
        extra: dict[str, Any] = {} if vram_after is None else {"vram_after_mib": vram_after}
        status = result.status
        kind = result.error_kind or "unknown"
        if status == "released":
            if extra:
                queue.update_progress(self.db, job_id, attempt, **extra)
            recorded = queue.release(self.db, job_id, attempt, notice=RELEASED_NOTICE)
        elif status == "failed" and kind == "oom" and self._retry_after_oom(claim, result, extra):
            return
        elif status == "failed":
            recorded = queue.finish(
                self.db,
                job_id,
                attempt,
                JobStatus.failed,
                error_kind=kind,
                error_message=result.error_message or "Training failed.",
                error_hint=result.error_hint or failures.hint_for(kind),
                **extra,
            )
        else:
            adapter = result.adapter.model_dump() if result.adapter is not None else None
            recorded = queue.finish(
                self.db,
                job_id,
                attempt,
                JobStatus(status),
                adapter=adapter,
                evaluate=self.settings.evaluate_after_training,
                **extra,
            )
        if recorded:
            log.info("job %s attempt %s: %s", job_id, attempt, status)
        else:
            log.warning(
                "job %s attempt %s is stale: its result (%s) was refused", job_id, attempt, status
            )

    def _retry_after_oom(
        self, claim: queue.Claim, result: AttemptResult, extra: dict[str, Any]
    ) -> bool:
        """Requeue once with half the micro-batch. False: no retry left, fail the job."""
        job = queue.get_job(self.db, claim.job_id)
        if job.attempt != claim.attempt or job.oom_retries >= 1:
            return False
        oom = result.oom or OomDetails()
        step = oom.step if oom.step is not None else job.progress_step
        retry = failures.oom_retry(
            TrainConfig.model_validate(job.config), step=step, seq_len=oom.seq_len
        )
        if retry is None:
            return False
        config, notice = retry[0].model_dump(mode="json"), retry[1]
        if extra:
            queue.update_progress(self.db, claim.job_id, claim.attempt, **extra)
        released = queue.release(
            self.db, claim.job_id, claim.attempt, notice=notice, config=config, oom_retry=True
        )
        log.info("job %s attempt %s: OOM, retry queued=%s", claim.job_id, claim.attempt, released)
        return True


def run_worker(
    settings: Settings,
    gpus: str = "0",
    *,
    child_command: list[str] | None = None,
    inference: bool = True,
    parent_pid: int | None = None,
) -> None:
    """Run the worker until SIGTERM/SIGINT, or until the process `parent_pid` is gone.
    `child_command` is the argv prefix of the child; `inference` starts the playground's
    inference server beside it."""
    loop = WorkerLoop(
        settings,
        gpus,
        child_command or default_child_command(),
        inference=inference,
        parent_pid=parent_pid,
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, loop.request_stop)
    try:
        loop.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
