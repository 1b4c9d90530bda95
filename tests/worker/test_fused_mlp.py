"""worker/fused_mlp.py on the CPU, through the recipe: every LoRA MLP of the demo model runs as one
autograd function, with peft's loss and LoRA gradients under every memory policy, keeping less
for the backward pass; MLPs it cannot do keep peft's path."""

from __future__ import annotations

import collections
import gc
import weakref

import pytest
import torch

from tests.worker.conftest import LAYERS, lora_recipe
from tests.worker.test_recipe import lora_gradients
from worker import fused_mlp, lora_projection
from worker.fused_attention import unfuse_attention
from worker.fused_mlp import fuse_mlps, unfuse_mlps


def _fused(model) -> int:
    return sum("_unfused_forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("policy", ["off", "on", "tiled"])
def test_fused_mlps_give_peft_s_loss_and_gradients(recipe, policy):
    assert _fused(recipe.model) == LAYERS
    assert "fused LoRA MLPs" in recipe.control.fields["compute_mode"]
    batch = recipe._longest_batch()
    recipe._tile_tokens = lambda: 16  # slices shorter than the batch: tiling happens
    assert batch["input_ids"].shape[-1] > 2 * 16
    recipe._set_memory_policy(policy)
    loss, grads = lora_gradients(recipe, batch)
    recipe._set_memory_policy("off")  # untiled first: tiling wraps the forward it finds
    unfuse_mlps(recipe.model)
    assert _fused(recipe.model) == 0
    recipe._set_memory_policy(policy)
    peft_loss, peft_grads = lora_gradients(recipe, batch)
    assert len(grads) == LAYERS * 7 * 2  # 7 projections, lora_A and lora_B
    assert loss == pytest.approx(peft_loss, rel=1e-5)
    for name, grad in peft_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_checkpointed_layer_s_recompute_skips_the_down_product(recipe, monkeypatch):
    """A Llama layer only adds its MLP's output to the residual it returns, and the backward pass
    never reads a recomputed layer's output: each down weight is read twice a step (forward,
    backward), not three times, and every gradient is the same, bit for bit."""
    downs = {id(layer.mlp.down_proj.get_base_layer()) for layer in recipe._decoder_layers()}
    reads: collections.Counter[int] = collections.Counter()
    real = lora_projection.weight

    def counting(base, dtype):
        reads[id(base)] += id(base) in downs
        return real(base, dtype)

    monkeypatch.setattr(lora_projection, "weight", counting)
    batch = recipe._longest_batch()
    recipe._set_memory_policy("on")
    results = {}
    for skip in (False, True):
        monkeypatch.setattr(fused_mlp, "SKIP_UNREAD_OUTPUT", skip)
        reads.clear()
        results[skip] = lora_gradients(recipe, batch)
        assert sorted(reads[i] for i in downs) == [2 if skip else 3] * LAYERS, (skip, reads)
    (loss, grads), (loss_skipped, grads_skipped) = results[False], results[True]
    assert loss_skipped == loss
    for name, grad in grads.items():
        assert torch.equal(grads_skipped[name], grad), name


def test_a_fused_mlp_keeps_less_for_the_backward_pass(recipe):
    """peft keeps the SwiGLU product for down_proj's backward pass; the fused MLP recomputes it."""
    batch = recipe._longest_batch()
    recipe._set_memory_policy("off")

    def saved_bytes() -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            if not isinstance(tensor, torch.nn.Parameter):
                total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            recipe.model(**batch).loss.backward()
        recipe.model.zero_grad(set_to_none=True)
        return total

    fused = saved_bytes()
    unfuse_mlps(recipe.model)
    unfused = saved_bytes()
    config = recipe.model.config
    product = batch["input_ids"].numel() * config.intermediate_size * 4  # fp32 on the CPU
    assert fused <= unfused - LAYERS * product, (fused, unfused)


@pytest.mark.parametrize("unfuse", [unfuse_mlps, unfuse_attention], ids=["mlp", "attention"])
def test_a_disabled_adapter_answers_as_the_base_model(recipe, unfuse):
    """The playground's "base model" answer disables the adapter: the fused MLP and the fused
    attention projections step aside (with the other fused, and with it taken out)."""
    batch = {k: v for k, v in recipe._longest_batch().items() if k != "labels"}
    model = recipe.model
    model.eval()
    with torch.no_grad():
        tuned = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        unfuse(model)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, base)
        torch.testing.assert_close(model(**batch).logits, tuned, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tuned, base, atol=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [{"lora_dropout": 0.1}, {"lora_targets": ["q_proj", "gate_proj", "up_proj"]}],
    ids=["lora dropout", "down_proj without LoRA"],
)
def test_an_mlp_the_function_cannot_do_keeps_peft_s_path(
    demo_model, demo_rows, tmp_path, overrides
):
    recipe = lora_recipe(demo_model, demo_rows, tmp_path, **overrides)
    try:
        assert _fused(recipe.model) == 0
        assert "fused" not in recipe.control.fields["compute_mode"]
        assert fuse_mlps(recipe.model) == 0
        assert recipe.forward_backward(recipe._longest_batch()).item() > 0
    finally:
        recipe.cleanup()


def test_a_lora_bias_or_dora_keeps_peft_s_path(recipe):
    """Adapters the job config cannot ask for today, but peft can make: the function has no
    term for them, so such an MLP is left to peft."""
    mlp = recipe._decoder_layers()[0].mlp
    down = mlp.down_proj
    name = down.active_adapters[0]
    unfuse_mlps(recipe.model)
    down.lora_B[name].bias = torch.nn.Parameter(torch.zeros(down.lora_B[name].out_features))
    assert fuse_mlps(recipe.model) == LAYERS - 1 and "_unfused_forward" not in vars(mlp)
    unfuse_mlps(recipe.model)
    down.lora_B[name].bias = None
    down.use_dora[name] = True
    assert fuse_mlps(recipe.model) == LAYERS - 1 and "_unfused_forward" not in vars(mlp)


@pytest.mark.parametrize("where", ["_gated", "_gated_back"], ids=["forward", "backward"])
def test_out_of_memory_inside_a_fused_mlp_leaves_no_activation_alive(
    demo_model, demo_rows, tmp_path, monkeypatch, where
):
    """An out-of-memory error in the fused MLP's forward or backward pass: the job's typed
    OutOfMemory is raised and every activation the step made is freed. On the CPU, with an error
    raised by hand; the GPU side (a real error from the card) is test_gpu_recipe's 262,144-token
    test and bench/RESULTS.md, session 5."""
    from worker import fused_mlp
    from worker.errors import OutOfMemory

    recipe = lora_recipe(demo_model, demo_rows, tmp_path, max_steps=2, gradient_checkpointing="off")
    made: list[weakref.ref] = []
    original = getattr(fused_mlp, where)
    calls = 0

    def failing(kind, gate, up, *rest):
        nonlocal calls
        made.append(weakref.ref(gate))
        calls += 1
        if calls == LAYERS - 1:  # some layers done, some not
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(kind, gate, up, *rest)

    monkeypatch.setattr(fused_mlp, where, failing)
    try:
        with pytest.raises(OutOfMemory):
            recipe.train()
    finally:
        recipe.cleanup()
    gc.collect()
    assert made and not [ref for ref in made if ref() is not None]


@pytest.mark.parametrize("fused_adam", [False, True], ids=["foreach", "fused"])
def test_a_lora_weight_is_cast_once_per_pass_and_training_is_unchanged(
    recipe, monkeypatch, fused_adam
):
    """Under bf16 autocast the fused functions read each float32 LoRA weight as bf16 several times
    a pass; inside `casts_kept` (one forward and backward) the copy is made once. Three optimizer
    steps train exactly as with a fresh cast at every read (the fused AdamW does not bump a
    weight's version, so nothing may outlive the pass)."""
    batch = recipe._longest_batch()
    recipe._set_memory_policy("on")  # the recompute reads every weight a third time
    lora = [p for p in recipe.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in lora]
    casts = collections.Counter()
    real_cast = torch.Tensor.to

    def train(cache: bool) -> list[float]:
        monkeypatch.setattr(lora_projection, "CACHE_CASTS", cache)
        with torch.no_grad():
            for p, value in zip(lora, start, strict=True):
                p.copy_(value)
        optimizer = torch.optim.AdamW(lora, lr=1e-2, fused=fused_adam)
        losses = []
        for _ in range(3):
            with lora_projection.casts_kept():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = recipe.model(**batch).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    def counting_to(tensor, *args, **kwargs):
        if any(tensor is p for p in lora) and torch.bfloat16 in args:
            casts[lora_projection.CACHE_CASTS] += 1
        return real_cast(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    fresh = train(cache=False)
    kept = train(cache=True)
    monkeypatch.undo()
    assert kept == fresh
    assert len(set(fresh)) == 3  # the weights did change between steps
    # Kept: each weight once per pass. Fresh: the forward pass, the recompute (less down_proj's
    # lora_B: its product is skipped there) and the backward pass each cast every weight.
    assert casts[True] == 3 * len(lora), casts
    assert casts[False] == 3 * (3 * len(lora) - LAYERS), casts
    a = lora[0]
    with lora_projection.casts_kept():
        copy = lora_projection.cast(a, torch.bfloat16)
        assert lora_projection.cast(a, torch.bfloat16) is copy
    assert lora_projection.cast(a, torch.bfloat16) is not copy  # nothing outlives the pass
