"""A training run without a GPU: the same queue calls the worker makes, on the same database.

`start_running_job` registers a model and a ready dataset, queues a job and claims it; `write_metrics`
then records rows and progress the way the worker's metric sink does. Run as a module it is a
writer process: `python -m devkit.simulated_run DB_URL JOB_ID ATTEMPT --rows N --interval S`.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid

from app import queue
from app.db import Database
from app.models import BaseModelEntry, Dataset, DatasetStatus, JobStatus
from app.train_config import TrainConfig


def start_running_job(
    db: Database, name: str = "live run", *, total: int = 1000, worker: str = "sim-worker", **config
) -> queue.Claim:
    """A job in status running, claimed by `worker`, with a model and a ready dataset."""
    with db.write() as s:
        if s.get(BaseModelEntry, "sim-model") is None:
            s.add(BaseModelEntry(name="sim-model", source="/nonexistent/sim-model", parameters=1))
        dataset = Dataset(
            id=uuid.uuid4().hex, name=f"{name} data", status=DatasetStatus.ready, rows=100
        )
        s.add(dataset)
    job = queue.enqueue(
        db, TrainConfig(name=name, base_model="sim-model", dataset_id=dataset.id, **config)
    )
    claim = queue.claim_next_job(db, worker, lease_seconds=3600)
    assert claim is not None and claim.job_id == job.id
    queue.update_progress(
        db,
        claim.job_id,
        claim.attempt,
        progress_total=total,
        memory_policy="no checkpointing",
        memory_policy_reason="the batch fits in 30% of the card",
        compute_mode="fp32 LoRA on CPU (simulated)",
    )
    return claim


def metric_row(step: int, seed: float = 0.0) -> dict:
    loss = 2.5 * math.exp(-step / 150) + 0.4 + 0.05 * math.sin(step / 3 + seed)
    return {
        "step": step,
        "epoch": step / 500,
        "loss": loss,
        "eval_loss": loss + 0.1 if step % 25 == 0 else None,
        "learning_rate": 2e-4 * min(1.0, step / 20),
        "grad_norm": 1.0 + 0.2 * math.cos(step / 5),
        "tokens_per_second": 1800.0 + 50 * math.sin(step / 7),
        "vram_allocated_mib": 3100.0,
        "vram_reserved_mib": 3600.0,
        "device_used_mib": 4200.0,
        "device_total_mib": 24576.0,
        "tokens": 512,  # one step of 512 real tokens a row
        "elapsed_seconds": step * 0.1,
    }


def preference_values(step: int) -> dict:
    """What a DPO step adds to its row: rewards drifting apart, accuracy rising (eval every 25)."""
    chosen, rejected = 0.02 * step, -0.015 * step
    values = {
        "rewards_chosen": chosen,
        "rewards_rejected": rejected,
        "reward_margin": chosen - rejected,
        "reward_accuracy": min(1.0, 0.5 + step / 200),
    }
    if step % 25 == 0:
        values.update({f"eval_{name}": value - 0.01 for name, value in values.items()})
    return values


GPU_MEMORY = ("vram_allocated_mib", "vram_reserved_mib", "device_used_mib", "device_total_mib")


def cpu_row(step: int) -> dict:
    """A CPU run's row: no card to read, the training process's resident memory instead."""
    row = {k: v for k, v in metric_row(step).items() if k not in GPU_MEMORY}
    return row | {"rss_mib": 1450.0 + 0.8 * step + 30 * math.sin(step / 9)}


def write_metrics(
    db: Database,
    claim: queue.Claim,
    first: int,
    count: int,
    interval: float = 0.0,
    *,
    preference: bool = False,
    cpu: bool = False,
    seed: float = 0.0,
) -> int:
    """Record `count` rows from step `first`, one per call, with progress; returns the next step.
    `preference`: the rows also carry a DPO job's rewards; `cpu`: they read process memory (RSS)
    where a GPU run reads VRAM; `seed` moves the losses (another attempt's)."""
    step = first
    for _ in range(count):
        row = cpu_row(step) if cpu else metric_row(step, seed)
        row |= preference_values(step) if preference else {}
        assert queue.record_metrics(db, claim.job_id, claim.attempt, [row])
        queue.update_progress(db, claim.job_id, claim.attempt, progress_step=step, epoch=step / 500)
        step += 1
        if interval:
            time.sleep(interval)
    return step


def resume(db: Database, claim: queue.Claim, worker: str = "sim-worker") -> queue.Claim:
    """The job's next attempt, as after its worker stopped: back in the queue, claimed again.
    A real one then logs again from its checkpoint's step on."""
    assert queue.release(db, claim.job_id, claim.attempt, notice="Resuming from a checkpoint.")
    again = queue.claim_next_job(db, worker, lease_seconds=3600)
    assert again is not None and again.job_id == claim.job_id
    return again


def finish(db: Database, claim: queue.Claim) -> None:
    assert queue.finish(db, claim.job_id, claim.attempt, JobStatus.succeeded)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("database_url")
    parser.add_argument("job_id", type=int)
    parser.add_argument("attempt", type=int)
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--finish", action="store_true")
    parser.add_argument("--preference", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    db = Database(args.database_url)
    claim = queue.Claim(job_id=args.job_id, attempt=args.attempt, config={})
    write_metrics(
        db, claim, args.first, args.rows, args.interval, preference=args.preference, cpu=args.cpu
    )
    if args.finish:
        finish(db, claim)


if __name__ == "__main__":
    main()
