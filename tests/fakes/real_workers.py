"""Real worker loops (`python -m tests.fakes.real_worker`) training the demo model for real, over
a test's data dir and SQLite file: the harness of the fault tests on the CPU
(tests/worker/test_faults.py) and on the GPU (tests/worker/test_gpu_faults.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from app import queue
from app.db import Database
from app.models import BaseModelEntry, Dataset, DatasetStatus, Job, Metric
from app.settings import Settings
from app.train_config import TrainConfig
from worker.checkpoints import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]
MODEL = "demo-tiny-llama"
DEMO_DATASET_ID = "d" * 32


def short_lease_settings(data_dir: Path, **overrides: Any) -> Settings:
    """A 2 s lease renewed every 0.3 s: a dead worker's job is requeued within seconds.
    `overrides`: other settings, e.g. `database_url`."""
    fields: dict[str, Any] = dict(lease_seconds=2.0, heartbeat_seconds=0.3, poll_seconds=0.1)
    s = Settings(data_dir=data_dir, **{**fields, **overrides})
    s.ensure_dirs()
    return s


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class RealWorkers:
    """`python -m tests.fakes.real_worker` processes over the test's data dir and database.

    `start(TUNEBOARD_TEST_GPUS="0")` gives the worker a GPU (its child trains on CUDA); without
    it the child trains on the CPU.
    """

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings, self.folder = settings, folder
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        full_env = {
            **os.environ,
            "TUNEBOARD_DATA_DIR": str(self.settings.resolved_data_dir),
            "TUNEBOARD_DATABASE_URL": self.settings.resolved_database_url,
            "TUNEBOARD_LEASE_SECONDS": str(self.settings.lease_seconds),
            "TUNEBOARD_HEARTBEAT_SECONDS": str(self.settings.heartbeat_seconds),
            "TUNEBOARD_POLL_SECONDS": str(self.settings.poll_seconds),
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        out = (self.folder / f"worker-{len(self.processes)}.out").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.real_worker"],
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            for child in children_of(process.pid):
                kill(child)
            if process.poll() is None:
                process.kill()
                process.wait()


def add_dataset(
    db: Database, settings: Settings, dataset_id: str, name: str, rows: list[dict[str, Any]]
) -> str:
    """A dataset as the upload side leaves it: normalised rows with their line numbers, ready."""
    folder = settings.datasets_dir / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "normalized.jsonl").open("w", encoding="utf-8") as out:
        for number, row in enumerate(rows, start=1):
            out.write(json.dumps({"line": number, **row}) + "\n")
    with db.write() as s:
        if s.get(Dataset, dataset_id) is None:
            s.add(Dataset(id=dataset_id, name=name, status=DatasetStatus.ready, rows=len(rows)))
    return dataset_id


def add_demo(db: Database, settings: Settings, demo_build: dict[str, Path]) -> str:
    """The demo model (a copy in the data dir, which a test may delete) and the demo dataset."""
    model_dir = settings.models_dir / MODEL
    if not model_dir.exists():
        shutil.copytree(demo_build["model_dir"], model_dir)
    lines = demo_build["dataset"].read_text(encoding="utf-8").splitlines()
    dataset_id = add_dataset(db, settings, DEMO_DATASET_ID, "demo", [json.loads(x) for x in lines])
    with db.write() as s:
        if s.get(BaseModelEntry, MODEL) is None:
            s.add(BaseModelEntry(name=MODEL, source=str(model_dir), is_local=True, is_demo=True))
    return dataset_id


def real_job(db: Database, dataset_id: str, base_model: str = MODEL, **overrides: Any) -> Job:
    fields: dict[str, Any] = dict(
        name="fault test",
        base_model=base_model,
        dataset_id=dataset_id,
        max_steps=8,
        micro_batch_size=1,
        grad_accum_steps=2,
        max_seq_len=64,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        lora_r=8,
        lora_alpha=16,
        eval_fraction=0.0,
        save_every=1000,
        seed=7,
    )
    fields.update(overrides)
    return queue.enqueue(db, TrainConfig(**fields), max_attempts=3)


def checkpoints_of(settings: Settings, job_id: int) -> Path:
    return settings.runs_dir / str(job_id) / "checkpoints"


def complete_steps(settings: Settings, job_id: int) -> list[int]:
    return [step for step, _, _ in complete_checkpoints(checkpoints_of(settings, job_id))]


def all_steps(settings: Settings, job_id: int) -> list[int]:
    folder = checkpoints_of(settings, job_id)
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


def train_losses(db: Database, job_id: int, attempt: int) -> list[tuple[int, float]]:
    """(step, training loss) rows of one attempt, in the order they were written."""
    with db.read() as s:
        rows = s.exec(
            select(Metric)
            .where(Metric.job_id == job_id, Metric.attempt == attempt)
            .order_by(col(Metric.id))
        )
        return [(m.step, m.loss) for m in rows if m.loss is not None]


def train_steps(db: Database, job_id: int, attempt: int) -> list[int]:
    return [step for step, _ in train_losses(db, job_id, attempt)]
