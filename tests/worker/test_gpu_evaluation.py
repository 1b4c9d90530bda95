"""An evaluation report computed on a real GPU: the demo job trained by a real worker on GPU 0,
then its adapter evaluated by that worker's side loop under the GPU's compute lock (never beside
the training attempt). Run on the GPU machine with `pytest -m gpu tests/worker/test_gpu_evaluation.py`."""

from __future__ import annotations

import pytest
import torch

from app.models import SideWorkStatus
from app.services import evaluations
from tests.fakes.evaluated_demo import train_and_evaluate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_the_demo_adapter_is_evaluated_on_the_gpu(tmp_path):
    demo = train_and_evaluate(tmp_path / "data", gpus="0")
    try:
        # trained on the GPU (a CPU run says "fp32 LoRA on the CPU")
        assert demo.job.compute_mode and "bf16 compute" in demo.job.compute_mode, (
            demo.job.compute_mode
        )
        evaluation = evaluations.latest(demo.db, demo.adapter.id)
        assert evaluation is not None
        assert evaluation.status == SideWorkStatus.succeeded, evaluation.error_message
        base, tuned = evaluation.base_figures, evaluation.adapter_figures
        assert tuned["eval_loss"] < base["eval_loss"]
        assert tuned["rouge_l"] > base["rouge_l"]
        assert evaluation.rows and all(r["adapter_answer"] is not None for r in evaluation.rows)
        assert "CUDA" in tuned["compute_mode"], tuned["compute_mode"]
    finally:
        demo.db.dispose()
