"""GPU fault tests: the real worker loop (`tests.fakes.real_worker` with a GPU) runs the real
training child (`python -m worker.run`) on CUDA, 4-bit NF4 QLoRA on the tiny demo model.

On the GPU machine:

    pytest -m gpu tests/worker/test_gpu_faults.py -v

Memory is read in this process with `torch.cuda.mem_get_info()` (the whole card: the child's
memory shows as less free memory here), so the card must not be shared with other work while
these run. The worker gets the GPU that this process sees as cuda:0.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app import queue
from app.db import Database
from app.models import Job, JobStatus
from app.settings import Settings
from tests.fakes.real_workers import (
    RealWorkers,
    add_dataset,
    add_demo,
    children_of,
    complete_steps,
    kill,
    real_job,
    short_lease_settings,
    train_losses,
)
from tests.worker.test_loop import alive, finished, wait_for
from worker.job_io import read_result

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MIB = 1024**2
# A cold child: imports, the demo model in 4 bits, Liger's Triton kernels compiled on first use.
JOB_TIMEOUT = 180.0
# The driver takes back a dead process's memory in well under a second; allow for a slow host.
RETURN_TIMEOUT = 20.0
# "Back to the level before the job": within this much of it.
TOLERANCE_MIB = 128
# A training child on the card holds at least its CUDA context (several hundred MiB).
CHILD_HOLDS_MIB = 256
NF4 = "4-bit NF4 QLoRA"


def worker_gpus() -> str:
    """The worker's `--gpus`: the card this process sees as cuda:0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def free_mib() -> int:
    free, _total = torch.cuda.mem_get_info(0)
    return int(free // MIB)


def settled_free_mib() -> int:
    """Free memory once it stops changing (a process killed by an earlier test may still be
    giving its memory back)."""
    torch.cuda.empty_cache()
    last = free_mib()
    deadline = time.monotonic() + RETURN_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = free_mib()
        if abs(now - last) <= 16:
            return now
        last = now
    return last


def wait_until_free(level_mib: int, what: str) -> None:
    """Free memory back to `level_mib` (within TOLERANCE_MIB) within RETURN_TIMEOUT."""
    try:
        wait_for(lambda: free_mib() >= level_mib - TOLERANCE_MIB, timeout=RETURN_TIMEOUT, what=what)
    except AssertionError as error:
        raise AssertionError(
            f"{error}: {free_mib()} MiB free, {level_mib} MiB before the job"
        ) from None


def wait_until_held(level_mib: int) -> int:
    """Free memory at least CHILD_HOLDS_MIB below `level_mib`: the child trains on this card."""
    try:
        wait_for(lambda: free_mib() < level_mib - CHILD_HOLDS_MIB, timeout=10, what="child VRAM")
    except AssertionError:
        raise AssertionError(
            f"the training child holds no memory on this card ({free_mib()} MiB free, "
            f"{level_mib} MiB before it started): is it on another GPU, or on the CPU?"
        ) from None
    return free_mib()


@contextlib.contextmanager
def hogging_all_but(left_mib: int) -> Iterator[None]:
    """Allocate this card's free memory in this process, leaving about `left_mib` MiB free."""
    torch.cuda.empty_cache()
    chunks: list[torch.Tensor] = []
    try:
        while (excess := free_mib() - left_mib) > 16:
            size = min(excess, 1024) * MIB
            chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda:0"))
        yield
    finally:
        chunks.clear()
        torch.cuda.empty_cache()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return short_lease_settings(tmp_path / "data")


def start_gpu_worker(real_workers: RealWorkers):
    return real_workers.start(TUNEBOARD_TEST_GPUS=worker_gpus())


def training(db: Database, job_id: int, step: int) -> Job | None:
    job = queue.get_job(db, job_id)
    return job if job.status == JobStatus.running and job.progress_step >= step else None


def worker_log(tmp_path: Path, index: int = 0) -> str:
    path = tmp_path / f"worker-{index}.out"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def run_next_job(
    db: Database, settings: Settings, dataset_id: str, tmp_path: Path, free_before: int
) -> None:
    """A short job on the same worker trains to success on the GPU and gives the memory back."""
    job = real_job(db, dataset_id, name="the next job", max_steps=6)
    done = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="the next job")
    assert (done.status, done.attempt) == (JobStatus.succeeded, 1), (
        done.error_message,
        worker_log(tmp_path),
    )
    assert (done.compute_mode or "").startswith(NF4), done.compute_mode
    assert (settings.runs_dir / str(job.id) / "adapter" / "adapter_model.safetensors").is_file()
    wait_until_free(free_before, "the next job's GPU memory to come back")


# --- SIGKILL during GPU training -------------------------------------------------------------


def test_sigkill_of_the_training_child_frees_the_gpu_and_the_next_job_trains_on_it(
    db, settings, real_workers, demo_build, tmp_path
):
    dataset_id = add_demo(db, settings, demo_build)
    before = settled_free_mib()
    job = real_job(db, dataset_id, name="killed on the GPU", max_steps=100_000)
    worker = start_gpu_worker(real_workers)
    running = wait_for(
        lambda: training(db, job.id, 3), timeout=JOB_TIMEOUT, what="the job to train on the GPU"
    )
    assert (running.compute_mode or "").startswith(NF4), running.compute_mode
    wait_until_held(before)

    (child,) = children_of(worker.pid)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not alive(child), timeout=5, what="the child to die")
    wait_until_free(before, "the killed child's GPU memory to come back")
    done = wait_for(lambda: finished(db, job.id), timeout=10, what="the failure")

    assert (done.status, done.error_kind) == (JobStatus.failed, "killed"), done.error_message
    assert "SIGKILL" in (done.error_message or "")
    assert 3 <= done.progress_step < 100_000

    run_next_job(db, settings, dataset_id, tmp_path, free_before=before)
    assert worker.poll() is None  # the same worker ran it


def test_sigkill_of_the_worker_the_orphaned_child_frees_the_gpu_and_the_job_resumes(
    db, settings, real_workers, demo_build, tmp_path
):
    dataset_id = add_demo(db, settings, demo_build)
    before = settled_free_mib()
    total = 400  # enough to outlast the kill; the resumed rest takes seconds on the GPU
    job = real_job(db, dataset_id, name="worker killed", max_steps=total, save_every=1000)
    first = start_gpu_worker(real_workers)
    wait_for(lambda: training(db, job.id, 3), timeout=JOB_TIMEOUT, what="the job to train")
    wait_until_held(before)

    (child,) = children_of(first.pid)
    first.kill()
    # The orphan notices its worker is gone, writes a checkpoint and exits: the GPU is free.
    wait_for(lambda: not alive(child), timeout=30, what="the orphaned child to exit")
    wait_until_free(before, "the orphaned child's GPU memory to come back")
    saved = complete_steps(settings, job.id)
    assert saved, "the orphaned child wrote no checkpoint"
    assert saved[-1] < total, "the job ended before the worker was killed: raise `total`"

    start_gpu_worker(real_workers)
    done = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="the second worker")
    assert (done.status, done.attempt) == (JobStatus.succeeded, 2), (
        done.error_message,
        worker_log(tmp_path, 1),
    )
    assert f"Resuming from the checkpoint at step {saved[-1]}" in (done.notice or "")
    assert [step for step, _ in train_losses(db, job.id, 2)] == list(
        range(saved[-1] + 1, total + 1)
    )
    wait_until_free(before, "the resumed job's GPU memory to come back")


# --- killed and resumed: the loss curve goes on ------------------------------------------------


def test_real_qlora_killed_after_a_checkpoint_resumes_and_continues_the_loss_curve(
    db, settings, real_workers, demo_build, tmp_path
):
    dataset_id = add_demo(db, settings, demo_build)
    total, every = 48, 8
    reference = real_job(db, dataset_id, name="uninterrupted", max_steps=total, save_every=every)
    job = real_job(db, dataset_id, name="killed", max_steps=total, save_every=every)
    worker = start_gpu_worker(real_workers)
    ref = wait_for(lambda: finished(db, reference.id), timeout=JOB_TIMEOUT, what="the reference")
    assert ref.status == JobStatus.succeeded, (ref.error_message, worker_log(tmp_path))
    assert (ref.compute_mode or "").startswith(NF4), ref.compute_mode

    wait_for(lambda: complete_steps(settings, job.id), timeout=JOB_TIMEOUT, what="a checkpoint")
    (child,) = children_of(worker.pid)
    kill(child)
    wait_for(lambda: not alive(child), timeout=5, what="the child to die")
    killed = wait_for(lambda: finished(db, job.id), timeout=10, what="the failure")
    assert (killed.status, killed.error_kind) == (JobStatus.failed, "killed")
    resume_from = complete_steps(settings, job.id)[-1]
    assert resume_from < total, "the job ended before the kill: raise `total`"

    queue.retry(db, job.id)
    done = wait_for(lambda: finished(db, job.id), timeout=JOB_TIMEOUT, what="the retry")
    assert (done.status, done.attempt) == (JobStatus.succeeded, 2), (
        done.error_message,
        worker_log(tmp_path),
    )
    assert f"Resuming from the checkpoint at step {resume_from}" in (done.notice or "")

    curve = dict(train_losses(db, reference.id, 1))
    before_kill = dict(train_losses(db, job.id, 1))
    resumed = train_losses(db, job.id, 2)
    assert list(curve) == list(range(1, total + 1))
    assert list(before_kill)[:resume_from] == list(range(1, resume_from + 1))
    # Resumed at the checkpoint's next step, contiguous to the end: no gap, no repeat.
    assert [step for step, _ in resumed] == list(range(resume_from + 1, total + 1))
    assert all(math.isfinite(loss) for _, loss in resumed)
    # The same run (seed, data order, optimizer, scheduler and RNG state restored), so the same
    # losses up to GPU noise.
    for step, loss in resumed:
        assert abs(loss - curve[step]) <= 0.05 * abs(curve[step]) + 0.05, (step, resumed, curve)


# --- a real CUDA out-of-memory -----------------------------------------------------------------

# What the test leaves free for the child: its CUDA context, the demo model and the optimizer
# fit; one packed micro-batch of 128 x 2048 tokens (the retry's) needs over 10 GiB.
CHILD_GETS_MIB = 2560
LONG_ROW = "The Zephyr Kettle 3000 boils one litre of water in 94 seconds. " * 150  # 2100 tokens


def test_a_real_out_of_memory_frees_the_vram_and_the_next_job_runs(
    db, settings, real_workers, demo_build, tmp_path
):
    dataset_id = add_demo(db, settings, demo_build)
    long_id = add_dataset(db, settings, "e" * 32, "long rows", [{"text": LONG_ROW}] * 512)
    start_gpu_worker(real_workers)
    with hogging_all_but(CHILD_GETS_MIB):
        before = settled_free_mib()
        assert before < CHILD_GETS_MIB + 1024, f"could not fill the card: {before} MiB free"
        job = real_job(
            db,
            long_id,
            name="too big for the card",
            max_steps=2,
            micro_batch_size=256,
            grad_accum_steps=1,
            max_seq_len=2048,
            gradient_checkpointing="off",
        )
        done = wait_for(lambda: finished(db, job.id), timeout=2 * JOB_TIMEOUT, what="two OOMs")
        first = read_result(settings.layout.attempt_result(job.id, 1))
        assert first is not None and first.error_kind == "oom", (first, worker_log(tmp_path))
        assert first.oom is not None and first.oom.micro_batch_size == 256
        # Retried once with half the micro-batch and twice the accumulation, then failed.
        assert (done.status, done.error_kind, done.attempt, done.oom_retries) == (
            JobStatus.failed,
            "oom",
            2,
            1,
        ), (done.error_message, worker_log(tmp_path))
        assert (done.config["micro_batch_size"], done.config["grad_accum_steps"]) == (128, 2)
        message = done.error_message or ""
        assert "ran out of memory" in message and "micro batch 128" in message, message
        assert "Traceback" not in message
        assert "micro batch size" in (done.error_hint or ""), done.error_hint
        wait_until_free(before, "the OOM-ed child's GPU memory to come back")

    run_next_job(db, settings, dataset_id, tmp_path, free_before=settled_free_mib())
