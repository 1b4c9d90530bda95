"""The fused NF4 dequantisation (worker.nf4) against bitsandbytes', and the fused GeGLU MLP
against peft's path, on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from worker import nf4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _kernels_launched(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "emcpy" not in e.name]


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_nf4_dequantize_is_bitsandbytes_bit_for_bit_in_one_kernel(nested, storage):
    """Every shape a model has (and an odd one), bf16, fp16 and fp32 out: bitsandbytes' values,
    bit for bit, from one kernel where bitsandbytes launches three (nested) or one."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    for rows, cols in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (96, 320)):
        weight = bnb.nn.Params4bit(
            torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02,
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=nested,
            quant_storage=storage,
        ).cuda()
        assert weight.quant_state.nested is nested
        # bitsandbytes writes the weight's own dtype (bf16 here); in another dtype it is
        # compared with bitsandbytes' float32 values rounded once, as the kernel rounds them.
        in_fp32 = copy.copy(weight.quant_state)
        in_fp32.dtype = torch.float32
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ours = nf4.dequantize(weight, dtype)
            state = weight.quant_state if dtype == weight.quant_state.dtype else in_fp32
            theirs = bnb_functional.dequantize_4bit(weight.data, state).to(dtype)
            assert ours.shape == theirs.shape == (rows, cols)
            assert ours.dtype == dtype
            assert torch.equal(ours, theirs), (rows, cols, dtype, (ours - theirs).abs().max())
    ours = _kernels_launched(lambda: nf4.dequantize(weight, torch.bfloat16))
    theirs = _kernels_launched(
        lambda: bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    )
    assert ours == ["nf4_dequantize"], ours
    assert len(theirs) == (3 if nested else 1), theirs


def test_nf4_falls_back_to_bitsandbytes_where_the_kernel_does_not_apply(monkeypatch):
    """FP4 weights, and the switch the benchmark's `bnbdequant` variant uses."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    weight = bnb.nn.Params4bit(
        torch.randn(256, 512, dtype=torch.bfloat16), requires_grad=False, quant_type="fp4"
    ).cuda()
    expected = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(nf4.dequantize(weight, torch.bfloat16), expected)
    assert "nf4_dequantize" not in _kernels_launched(lambda: nf4.dequantize(weight, torch.bfloat16))
    monkeypatch.setattr(nf4, "FUSED", False)
    nf4_weight = bnb.nn.Params4bit(
        torch.randn(256, 512, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4"
    ).cuda()
    launched = _kernels_launched(lambda: nf4.dequantize(nf4_weight, torch.bfloat16))
    assert "nf4_dequantize" not in launched and launched


def test_fused_geglu_mlps_match_peft_on_4bit_weights(tmp_path_factory, demo_dataset, tmp_path):
    """Gemma-2's GeGLU MLPs run fused on the GPU (NF4 weights, Liger's geglu kernels, worker.nf4):
    peft's loss and LoRA gradients, each family test's CPU check on the card."""
    from app.train_config import TrainConfig
    from tests.worker.test_model_families import _build, _examples, _nonzero_lora_b, recipe_vocab
    from tests.worker.test_recipe import lora_gradients
    from worker.fused_mlp import unfuse_mlps
    from worker.metrics import ListSink
    from worker.recipes.sft import LocalControl, SFTRecipe

    folder = _build("gemma2", tmp_path_factory, demo_dataset)
    config = TrainConfig(
        dataset_id="0" * 32, max_steps=1, micro_batch_size=2, max_seq_len=64, lora_r=8,
        lora_alpha=16, lora_dropout=0.0, quantization="nf4", eval_fraction=0.0, seed=5,
        packing=True, gradient_checkpointing="off",
    )  # fmt: skip
    examples = _examples(recipe_vocab(folder))
    recipe = SFTRecipe(
        config, folder, tmp_path, ListSink(), LocalControl(), train_examples=examples
    )
    recipe.setup()
    try:
        _nonzero_lora_b(recipe.model)
        assert "fused LoRA MLPs" in recipe.control.fields["compute_mode"]
        layers = recipe._decoder_layers()
        assert {vars(layer.mlp)["forward"].gate for layer in layers} == {"geglu"}
        batch = recipe._longest_batch()
        loss, grads = lora_gradients(recipe, batch)
        unfuse_mlps(recipe.model)
        peft_loss, peft_grads = lora_gradients(recipe, batch)
    finally:
        recipe.cleanup()
    assert loss == pytest.approx(peft_loss, rel=1e-3)
    ours = torch.cat([grads[n].float().flatten() for n in sorted(grads)])
    theirs = torch.cat([peft_grads[n].float().flatten() for n in sorted(peft_grads)])
    assert torch.nn.functional.cosine_similarity(ours, theirs, 0) > 0.999


def test_soft_capped_attention_runs_flex_with_eager_s_loss_and_gradients(
    tmp_path_factory, demo_dataset, tmp_path, monkeypatch
):
    """Gemma-2's soft-capped attention on CUDA: compiled flex attention (the cap as a score
    modification, packed examples and the sliding window as a block mask) in place of eager's
    dense square; the same loss and LoRA gradients as eager on a packed NF4 row, with every layer
    checkpointed (the recompute runs the compiled kernel again)."""
    from app.train_config import TrainConfig
    from tests.worker.test_model_families import _build, _examples, _nonzero_lora_b, recipe_vocab
    from tests.worker.test_recipe import lora_gradients
    from worker import attention
    from worker.metrics import ListSink
    from worker.recipes.sft import LocalControl, SFTRecipe

    folder = _build("gemma2", tmp_path_factory, demo_dataset)
    examples = _examples(recipe_vocab(folder))
    results = {}
    for flex in (True, False):
        monkeypatch.setattr(attention, "FLEX_FOR_SOFTCAP", flex)
        config = TrainConfig(
            dataset_id="0" * 32, max_steps=1, micro_batch_size=4, max_seq_len=64, lora_r=8,
            lora_alpha=16, lora_dropout=0.0, quantization="nf4", eval_fraction=0.0, seed=5,
            packing=True, gradient_checkpointing="on",
        )  # fmt: skip
        recipe = SFTRecipe(
            config, folder, tmp_path / str(flex), ListSink(), LocalControl(),
            train_examples=examples,
        )  # fmt: skip
        recipe.setup()
        try:
            _nonzero_lora_b(recipe.model)
            implementation = recipe.model.config._attn_implementation
            notice = str(recipe.control.fields.get("notice", ""))
            batch = recipe._longest_batch()
            assert int(batch["position_ids"].eq(0).sum()) > 1  # several examples in the row
            results[flex] = lora_gradients(recipe, batch)
        finally:
            recipe.cleanup()
        assert implementation == ("flex_attention" if flex else "eager")
        assert ("flex attention" in notice) == flex, notice
    (loss, grads), (eager_loss, eager_grads) = results[True], results[False]
    assert loss == pytest.approx(eager_loss, rel=1e-3)
    ours = torch.cat([grads[n].float().flatten() for n in sorted(grads)])
    theirs = torch.cat([eager_grads[n].float().flatten() for n in sorted(eager_grads)])
    assert torch.nn.functional.cosine_similarity(ours, theirs, 0) > 0.999
