"""worker/fused_attention.py on the CPU, through the recipe: every attention's LoRA projections run
as two autograd functions, with peft's loss and LoRA gradients under every memory policy; an output
computed ahead is handed only to a call with the same input; attention it cannot do keeps peft's
path. (Each model family against plain peft: tests/worker/test_model_families.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.worker.conftest import LAYERS, lora_recipe
from tests.worker.test_recipe import lora_gradients
from worker.fused_attention import fuse_attention, unfuse_attention


def _fused(model) -> int:
    return sum("_unfused_attention_forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("policy", ["off", "on", "partial"])
def test_fused_attention_gives_peft_s_loss_and_gradients(recipe, policy):
    assert _fused(recipe.model) == LAYERS * 4  # q, k, v and o of every layer
    assert "fused LoRA attention" in recipe.control.fields["compute_mode"]
    batch = recipe._longest_batch()
    recipe._set_memory_policy(policy, LAYERS // 2)
    loss, grads = lora_gradients(recipe, batch)
    unfuse_attention(recipe.model)
    assert _fused(recipe.model) == 0
    peft_loss, peft_grads = lora_gradients(recipe, batch)
    assert loss == pytest.approx(peft_loss, rel=1e-5)
    attention = [
        n for n in peft_grads if any(p in n for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ]
    assert len(attention) == LAYERS * 4 * 2
    for name, grad in peft_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_projection_computed_ahead_goes_only_to_a_call_with_the_same_input(recipe):
    """q_proj's call computes k and v too; k_proj called on another tensor computes its own, and
    nothing computed ahead is kept once it has been taken."""
    attention = recipe._decoder_layers()[0].self_attn
    hidden = recipe.model.config.hidden_size
    first, second = torch.randn(1, 5, hidden), torch.randn(1, 5, hidden)
    with torch.no_grad():
        q = attention.q_proj(first)
        k_other = attention.k_proj(second)
        k, v = attention.k_proj(first), attention.v_proj(first)
        unfuse_attention(recipe.model)
        expected = [attention.q_proj(first), attention.k_proj(second)]
        expected += [attention.k_proj(first), attention.v_proj(first)]
    for got, want in zip([q, k_other, k, v], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fuse_attention(recipe.model)
    shared = vars(attention.q_proj)["forward"].shared
    with torch.no_grad():
        attention.q_proj(first), attention.k_proj(first), attention.v_proj(first)
    assert shared.input is None and not shared.waiting


@pytest.mark.parametrize(
    "overrides",
    [{"lora_dropout": 0.1}, {"lora_targets": ["q_proj", "k_proj", "v_proj", "gate_proj"]}],
    ids=["lora dropout", "o_proj without LoRA"],
)
def test_attention_the_functions_cannot_do_keeps_peft_s_path(
    demo_model, demo_rows, tmp_path, overrides
):
    recipe = lora_recipe(demo_model, demo_rows, tmp_path, **overrides)
    try:
        assert _fused(recipe.model) == 0
        assert "fused LoRA attention" not in recipe.control.fields["compute_mode"]
        assert fuse_attention(recipe.model) == 0
        assert recipe.forward_backward(recipe._longest_batch()).item() > 0
    finally:
        recipe.cleanup()
