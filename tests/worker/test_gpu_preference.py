"""DPO and ORPO on a real GPU: NF4 QLoRA on a ~1B Llama-shaped model (random weights, the demo
tokenizer), with the kernels the product uses there (Liger, fused LoRA MLPs) and the memory
policy's trial steps. Run on the GPU machine with `pytest -m gpu tests/worker/test_gpu_preference.py`."""

import json

import pytest
import torch

from app.train_config import TrainConfig
from tests.worker.test_preference import _pairs
from worker.metrics import ListSink
from worker.recipes import recipe_for
from worker.recipes.sft import LocalControl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_job_trains_stops_resumes_and_saves_on_the_gpu(
    method, llama_1b, demo_dataset, tmp_path
):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _pairs(demo_dataset)))
    config = TrainConfig(
        dataset_id="0" * 32,
        method=method,
        max_steps=6,
        save_every=3,
        eval_every=3,
        micro_batch_size=2,
        grad_accum_steps=1,
        max_seq_len=256,
        learning_rate=1e-4,
        quantization="nf4",
        seed=3,
    )
    run_dir = tmp_path / "run"
    first_sink, control = ListSink(), LocalControl(stop_at_step=3, reason="shutdown")
    first = recipe_for(method)(
        config, llama_1b, run_dir, first_sink, control, rows_path=rows, eval_rows_path=rows
    )
    first.setup()
    assert control.fields["compute_mode"].startswith("4-bit NF4 QLoRA")
    assert "trial step" in control.fields["memory_policy_reason"]
    assert first.train().stop_reason == "shutdown"
    first.cleanup()

    sink = ListSink()
    second = recipe_for(method)(
        config, llama_1b, run_dir, sink, LocalControl(), rows_path=rows, eval_rows_path=rows
    )
    second.setup()
    result = second.train()
    assert result.resumed_from_step == 3 and result.global_step == 6
    adapter = second.save()
    second.cleanup()

    train = first_sink.train_rows + sink.train_rows
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_second"] and r["vram_allocated_mib"] for r in train)
    evals = sink.eval_rows
    assert evals and all(r["eval_reward_accuracy"] is not None for r in evals)
    if method == "dpo":
        # The reference is the base with the adapter off (fused MLPs and 4-bit weights too):
        # once the adapter has moved, the rewards are no longer zero.
        assert abs(train[-1]["rewards_chosen"]) + abs(train[-1]["rewards_rejected"]) > 0
    saved = TrainConfig.model_validate_json((adapter / "train_config.json").read_text())
    assert saved.method == method and (adapter / "adapter_model.safetensors").is_file()
