"""bench/fused_lora.py on the CPU: each LoRA projection as one autograd function gives the loss
and LoRA gradients of peft's own path, with and without checkpointing, and undoes cleanly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from app.train_config import TrainConfig
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from fused_lora import fuse_lora, unfuse_lora


@pytest.fixture
def recipe(demo_model, demo_rows, tmp_path):
    config = TrainConfig(
        dataset_id="0" * 32, max_steps=1, micro_batch_size=2, max_seq_len=64, lora_r=8,
        lora_alpha=16, lora_dropout=0.0, quantization="none", eval_fraction=0.0, seed=3,
    )  # fmt: skip
    recipe = SFTRecipe(
        config, demo_model, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows
    )
    recipe.setup()
    for name, param in recipe.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; non-zero B makes every gradient non-zero
            torch.nn.init.normal_(param, std=0.05)
    yield recipe
    recipe.cleanup()


def _gradients(recipe, batch):
    recipe.model.zero_grad(set_to_none=True)
    loss = recipe.forward_backward(batch).item()
    return loss, {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("policy", ["off", "on"])
def test_fused_projections_match_peft_loss_and_gradients(recipe, policy):
    batch = recipe._longest_batch()
    recipe._set_memory_policy(policy)
    loss, grads = _gradients(recipe, batch)
    assert fuse_lora(recipe.model) == 4 * 7  # 4 layers, 7 projections
    fused_loss, fused_grads = _gradients(recipe, batch)
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    unfuse_lora(recipe.model)
    assert not any(hasattr(m, "_unfused_forward") for m in recipe.model.modules())
    assert _gradients(recipe, batch)[0] == pytest.approx(loss, rel=1e-6)
