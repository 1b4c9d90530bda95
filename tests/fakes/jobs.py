"""Jobs the stand-ins can run: a registered local model folder, a dataset folder, a queued job."""

from __future__ import annotations

import json
from typing import Any
from uuid import uuid4

from app import queue
from app.db import Database
from app.models import BaseModelEntry, Dataset, DatasetStatus, Job
from app.settings import Settings
from app.train_config import TrainConfig

MODEL = "demo-tiny-llama"


def add_dataset(db: Database, settings: Settings) -> str:
    dataset_id = uuid4().hex
    folder = settings.datasets_dir / dataset_id
    folder.mkdir(parents=True)
    row = {
        "line": 1,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    }
    (folder / "normalized.jsonl").write_text(json.dumps(row) + "\n")
    model_dir = settings.models_dir / MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    with db.write() as s:
        s.add(Dataset(id=dataset_id, name="chat", status=DatasetStatus.ready, rows=1, valid_rows=1))
        if s.get(BaseModelEntry, MODEL) is None:
            s.add(BaseModelEntry(name=MODEL, source=str(model_dir), is_local=True, is_demo=True))
    return dataset_id


def add_preference_dataset(db: Database, settings: Settings) -> str:
    """A ready preference dataset (TRL's prompt/chosen/rejected shape): for dpo and orpo jobs."""
    dataset_id = uuid4().hex
    folder = settings.datasets_dir / dataset_id
    folder.mkdir(parents=True)
    row = {
        "line": 1,
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello, how can I help?"}],
        "rejected": [{"role": "assistant", "content": "what"}],
    }
    (folder / "normalized.jsonl").write_text(json.dumps(row) + "\n")
    model_dir = settings.models_dir / MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    with db.write() as s:
        s.add(
            Dataset(
                id=dataset_id,
                name="pairs",
                format="preference",
                status=DatasetStatus.ready,
                rows=1,
                valid_rows=1,
            )
        )
        if s.get(BaseModelEntry, MODEL) is None:
            s.add(BaseModelEntry(name=MODEL, source=str(model_dir), is_local=True, is_demo=True))
    return dataset_id


def add_job(
    db: Database,
    settings: Settings,
    name: str = "fake quick",
    dataset_id: str | None = None,
    max_attempts: int = 3,
    **config: Any,
) -> Job:
    dataset_id = dataset_id or add_dataset(db, settings)
    train_config = TrainConfig(name=name, base_model=MODEL, dataset_id=dataset_id, **config)
    return queue.enqueue(db, train_config, max_attempts=max_attempts)
