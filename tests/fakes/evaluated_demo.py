"""The demo job trained by a real worker loop, and its adapter's evaluation report computed by the
same worker's side loop with no further request: what the evaluation tests share (one training a
session, see the `evaluated_demo` fixture in tests/conftest.py).

`train_and_evaluate(data_dir)` installs the demo, queues the "demo" preset job through the New Job
page's service (cut to `STEPS` steps: enough for the adapter to beat its random base, and the
suite stays short), runs `worker.loop.run_worker` in its own process (CPU, no inference server) until
the job has succeeded and its evaluation has finished, then stops the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import queue
from app.db import Database
from app.migrate import upgrade
from app.models import Adapter, Job, SideWorkStatus
from app.services import evaluations, jobs
from app.services.demo import install_demo
from app.settings import Settings
from app.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DEADLINE_SECONDS = 900
STEPS = {"max_steps": 80, "eval_every": 40, "save_every": 40}
WORKER_CODE = """
import logging, sys
from app.settings import Settings
from worker.loop import run_worker
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")
run_worker(Settings(), gpus=sys.argv[1], inference=False)
"""


@dataclass
class EvaluatedDemo:
    settings: Settings
    db: Database
    job: Job
    adapter: Adapter


def worker_environment(settings: Settings, gpus: str = "") -> dict[str, str]:
    return {
        **os.environ,
        # the repo first; then what this process had (the GPU machine's site of packages)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TUNEBOARD_DATA_DIR": str(settings.resolved_data_dir),
        "TUNEBOARD_DATABASE_URL": settings.resolved_database_url,
        "TUNEBOARD_LEASE_SECONDS": "60",
        "TUNEBOARD_HEARTBEAT_SECONDS": "1",
        "TUNEBOARD_POLL_SECONDS": "0.2",
        "TUNEBOARD_HF_OFFLINE": "true",
        "TUNEBOARD_EVAL_MAX_NEW_TOKENS": str(settings.eval_max_new_tokens),
        "TUNEBOARD_EVALUATE_AFTER_TRAINING": "true",
        "TUNEBOARD_GPU_LOCK_DIR": str(settings.resolved_data_dir / "gpu-locks"),
        "CUDA_VISIBLE_DEVICES": gpus,
    }


def demo_job(data_dir: Path, max_new_tokens: int, **config: Any) -> tuple[Settings, Database, Job]:
    """A fresh data dir with the demo installed and a queued job on it."""
    settings = Settings(data_dir=data_dir, database_url="", eval_max_new_tokens=max_new_tokens)
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    demo = install_demo(db, settings)
    job = jobs.create_job(
        db,
        settings,
        TrainConfig(base_model=demo.model_name, dataset_id=demo.dataset_id, **config),
    )
    return settings, db, job


def train_and_evaluate(data_dir: Path, gpus: str = "") -> EvaluatedDemo:
    config = jobs.preset_values("demo") | STEPS
    settings, db, job = demo_job(data_dir, 24, name="kettle facts", **config)
    log = data_dir / "worker.out"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE, gpus],
            cwd=REPO,
            env=worker_environment(settings, gpus),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    adapter_id = f"job-{job.id}"
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            assert worker.poll() is None, "the worker exited:\n" + log.read_text()[-3000:]
            evaluation = evaluations.latest(db, adapter_id)
            if evaluation is not None and evaluation.status in (
                SideWorkStatus.succeeded,
                SideWorkStatus.failed,
            ):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(
                f"no finished evaluation after {DEADLINE_SECONDS}s: job "
                f"{queue.get_job(db, job.id).status}\n" + log.read_text()[-3000:]
            )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    with db.read() as s:
        adapter = s.get(Adapter, adapter_id)
    assert adapter is not None
    return EvaluatedDemo(settings, db, queue.get_job(db, job.id), adapter)


def untrained_adapter(data_dir: Path) -> EvaluatedDemo:
    """The demo installed and a demo job with an adapter of random LoRA weights saved by PEFT
    (no training): for tests of the report's machinery that need an adapter, not a good one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, db, job = demo_job(data_dir, 8, name="untrained", max_steps=1)
    model_dir = settings.models_dir / job.base_model
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    adapter_dir = settings.layout.adapter_dir(int(job.id or 0))
    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter_dir)
    with db.write() as s:
        s.add(Adapter(id=f"job-{job.id}", job_id=job.id, name=job.name, base_model=job.base_model))
    with db.read() as s:
        adapter = s.get(Adapter, f"job-{job.id}")
    assert adapter is not None
    return EvaluatedDemo(settings, db, job, adapter)
