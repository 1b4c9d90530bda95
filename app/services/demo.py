"""The newcomer's demo: a tiny Llama and a chat dataset it can learn in a few CPU minutes.

The model is built by the worker side (`python -m worker.demo`, which needs torch); this module
registers the result like any user's model and dataset, through the same code paths.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from app.db import Database
from app.errors import UserError
from app.services import datasets, model_registry
from app.settings import Settings

DEMO_MODEL = "demo-tiny-llama"
DEMO_DATASET = "demo-chat"


@dataclass
class DemoInstall:
    model_name: str
    dataset_name: str
    dataset_id: str


def install_demo(db: Database, settings: Settings) -> DemoInstall:
    model_dir = settings.models_dir / DEMO_MODEL
    dataset_file = settings.tmp_dir / f"{DEMO_DATASET}.jsonl"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.demo",
            "--models-dir",
            str(settings.models_dir),  # worker.demo writes <models-dir>/demo-tiny-llama
            "--dataset-out",
            str(dataset_file),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        raise UserError(
            "Building the demo model failed: " + build.stderr.strip()[-2000:],
            "Check that the worker extras are installed: pip install 'tuneboard[worker]'.",
            code="demo_failed",
            status_code=500,
        )
    try:
        model_registry.get_model(db, DEMO_MODEL)
    except model_registry.NotFound:
        model_registry.register_model(db, settings, str(model_dir), DEMO_MODEL, is_demo=True)
    dataset = datasets.find_by_name(db, DEMO_DATASET)
    if dataset is None:
        dataset = datasets.import_local_file(
            db, settings, dataset_file, name=DEMO_DATASET, is_demo=True
        )
    dataset_file.unlink(missing_ok=True)
    return DemoInstall(model_name=DEMO_MODEL, dataset_name=DEMO_DATASET, dataset_id=dataset.id)
