"""Every model family Tuneboard is measured on trains through the recipe with peft's loss and
gradients: tiny models of Llama, Qwen2 (biased q/k/v), Mistral and Gemma-2 (GeGLU, soft-capped
attention and logits, sliding windows), on the CPU, with our fused MLP (SwiGLU, or GeGLU for
Gemma), attention projections and packed attention (Gemma-2's soft-capped in blocks)."""

from __future__ import annotations

import random

import pytest
import torch

from app.train_config import TrainConfig
from devkit.model_families import FAMILY_MODELS, save_random_model, tiny_config
from tests.worker.test_recipe import lora_gradients
from worker import attention
from worker.data import PaddedBatchCollator, TokenizedExample
from worker.demo import build_demo_tokenizer
from worker.fused_mlp import fuse_mlps
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe

SEED = 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LENGTHS = (41, 23, 30)  # one packed row of 94 tokens: longer than the tiny sliding window (16)


def _build(family, tmp_path_factory, demo_dataset):
    """A folder with a tiny random model of the family and the demo tokenizer."""
    folder = tmp_path_factory.mktemp("families") / family
    tokenizer = build_demo_tokenizer(demo_dataset)
    save_random_model(tiny_config(family, len(tokenizer)), folder, seed=SEED)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILY_MODELS))
def family_model(request, tmp_path_factory, demo_dataset):
    """(family, its tiny model's folder)."""
    return request.param, _build(request.param, tmp_path_factory, demo_dataset)


def _examples(vocab_size: int) -> list[TokenizedExample]:
    rng = random.Random(SEED)
    out = []
    for length in LENGTHS:
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        out.append(TokenizedExample(input_ids=ids, labels=list(ids)))
    return out


def _nonzero_lora_b(model) -> None:
    """peft starts B at zero; the same non-zero B in both paths makes every gradient non-zero."""
    generator = torch.Generator().manual_seed(SEED)
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _recipe(folder, tmp_path, examples) -> SFTRecipe:
    config = TrainConfig(
        dataset_id="0" * 32, max_steps=1, micro_batch_size=2, max_seq_len=64, lora_r=8,
        lora_alpha=16, lora_dropout=0.0, quantization="none", eval_fraction=0.0, seed=SEED,
        packing=True, gradient_checkpointing="off",
    )  # fmt: skip
    recipe = SFTRecipe(
        config, folder, tmp_path, ListSink(), LocalControl(), train_examples=examples
    )
    recipe.setup()
    _nonzero_lora_b(recipe.model)
    return recipe


def _peft_plain(folder, examples, pad_id: int) -> tuple[float, dict[str, torch.Tensor]]:
    """peft's own path: the model as transformers loads it, LoRA by get_peft_model, one padded
    batch of the same examples (no packing, no kernels of ours)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    set_seed(SEED)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    _nonzero_lora_b(model)
    batch = PaddedBatchCollator(pad_id)(examples)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("policy", ["off", "on"])
def test_the_recipe_gives_peft_s_loss_and_gradients_on_every_family(family_model, tmp_path, policy):
    family, folder = family_model
    config = tiny_config(family, 10)  # only the features matter here
    recipe = _recipe(folder, tmp_path, _examples(recipe_vocab(folder)))
    try:
        batch = recipe._longest_batch()
        assert batch["input_ids"].shape == (1, sum(LENGTHS))  # one packed row, every example
        recipe._set_memory_policy(policy)
        loss, grads = lora_gradients(recipe, batch)
        pad_id = recipe.tokenizer.pad_token_id
        examples = list(recipe.train_examples or [])
    finally:
        recipe.cleanup()
    peft_loss, peft_grads = _peft_plain(folder, examples, pad_id)

    assert loss == pytest.approx(peft_loss, rel=1e-5)
    assert set(grads) == set(peft_grads)
    assert len(grads) == config.num_hidden_layers * 7 * 2  # 7 projections, lora_A and lora_B
    for name, grad in peft_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def recipe_vocab(folder) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(folder).vocab_size)


def test_the_recipe_says_which_kernels_of_ours_each_family_runs(family_model, tmp_path):
    family, folder = family_model
    recipe = _recipe(folder, tmp_path, _examples(recipe_vocab(folder)))
    try:
        fields = recipe.control.fields
        implementation = recipe.model.config._attn_implementation
        gates = {vars(layer.mlp)["forward"].gate for layer in recipe._decoder_layers()}
    finally:
        recipe.cleanup()
    notice = str(fields.get("notice", ""))
    # Every family's attention has four plain LoRA projections: fused, Gemma-2's eager one too;
    # every family's MLP is gated (SwiGLU, Gemma's GeGLU): fused.
    assert "fused LoRA attention" in fields["compute_mode"]
    assert "fused LoRA MLPs" in fields["compute_mode"]
    assert gates == {"geglu" if family == "gemma2" else "swiglu"}
    assert "NF4 dequantised" not in fields["compute_mode"]  # no 4-bit weights on the CPU
    # Every family's packed rows attend per example; Gemma-2's soft-capped logits in blocks
    # (worker.softcap_attention), not transformers' eager path over a dense mask.
    assert implementation == attention.NAME
    assert "dense mask" not in notice
    assert (attention.SOFTCAPPED in fields["compute_mode"]) == (family == "gemma2")


def test_a_geglu_mlp_is_fused_as_geglu_whatever_its_config_s_hidden_act_says(
    tmp_path_factory, demo_dataset, tmp_path
):
    """Gemma's MLP applies `hidden_activation`; a config whose `hidden_act` says silu beside it
    must not make the fused function compute a SwiGLU; an MLP whose activation is neither stays
    on peft's path."""
    folder = _build("gemma2", tmp_path_factory, demo_dataset)
    recipe = _recipe(folder, tmp_path, _examples(recipe_vocab(folder)))
    try:
        layers = recipe._decoder_layers()
        for layer in layers:
            layer.mlp.config.hidden_act = "silu"
        assert fuse_mlps(recipe.model) == len(layers)
        assert {vars(layer.mlp)["forward"].gate for layer in layers} == {"geglu"}
        layers[0].mlp.act_fn = torch.nn.GELU()  # exact GELU: no fused form
        assert fuse_mlps(recipe.model) == len(layers) - 1
        assert "_unfused_forward" not in vars(layers[0].mlp)
    finally:
        recipe.cleanup()


def test_liger_s_swiglu_mlp_is_still_fused(tmp_path_factory, demo_dataset, tmp_path):
    """On the GPU Liger swaps a Llama MLP for its `LigerSwiGLUMLP`, which has no `act_fn` (it
    applies SiLU by construction): the fused MLP must still take it, as the benchmark measured."""
    folder = _build("llama", tmp_path_factory, demo_dataset)
    recipe = _recipe(folder, tmp_path, _examples(recipe_vocab(folder)))
    try:
        for layer in recipe._decoder_layers():
            mlp = layer.mlp
            # what liger_kernel's patch leaves: its own class, the same projections, no act_fn
            mlp.__class__ = type("LigerSwiGLUMLP", (type(mlp),), {})
            del mlp.act_fn
        assert fuse_mlps(recipe.model) == len(recipe._decoder_layers())
    finally:
        recipe.cleanup()


@pytest.mark.parametrize("policy", ["off", "on"])
def test_gemma_2_s_soft_capped_layers_replay_as_graphs_with_the_eager_gradients(
    tmp_path_factory, demo_dataset, tmp_path, policy
):
    """Gemma-2's layers, their attention in blocks (worker.softcap_attention), through the CUDA
    graphs' machinery with the stand-in replay (tests/worker/test_layer_graphs.py): the recorded,
    captured and replayed passes give the eager pass's loss and LoRA gradients. (That the blocks
    wait on nothing on the host, which a real capture needs, the GPU test checks.)"""
    from worker.layer_graphs import graph_layers, ungraph_layers

    folder = _build("gemma2", tmp_path_factory, demo_dataset)
    recipe = _recipe(folder, tmp_path, _examples(recipe_vocab(folder)))
    try:
        batch = recipe._longest_batch()
        recipe._set_memory_policy(policy)
        eager_loss, eager_grads = lora_gradients(recipe, batch)
        layers = recipe._decoder_layers()
        graphs = graph_layers(layers, emulate=True)
        assert graphs is not None
        runs = [lora_gradients(recipe, batch) for _ in range(3)]  # recorded, captured, replayed
        assert graphs.failure is None and graphs.replays == 2 * len(layers)
        ungraph_layers(layers)
    finally:
        recipe.cleanup()
    for loss, grads in runs:
        assert loss == pytest.approx(eager_loss, rel=1e-6)
        for name, grad in eager_grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
