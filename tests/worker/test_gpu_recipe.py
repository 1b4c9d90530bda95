"""The recipe on a real GPU: NF4 QLoRA on a ~1B Llama-shaped model (random weights, the demo
tokenizer). Run on the GPU machine with `pytest -m gpu tests/worker/test_gpu_recipe.py`."""

import gc
import json
import re
import time

import pytest
import torch

from app.train_config import TrainConfig
from worker import layer_graphs
from worker.data import FlattenedBatchCollator, TokenizedExample
from worker.errors import OutOfMemory
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe
from worker.training import memory_policy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _config(**overrides):
    fields = dict(
        dataset_id="0" * 32,
        max_steps=4,
        save_every=2,
        eval_every=2,
        micro_batch_size=4,
        grad_accum_steps=2,
        max_seq_len=512,
        quantization="nf4",
        seed=3,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _timed_steps(recipe, batch) -> tuple[float, int, float]:
    """Three forward+backward passes from a clean allocator: the last loss (its gradients stay
    on the weights), the last pass's peak memory, the fastest time."""
    times = []
    for _ in range(3):
        recipe.model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = recipe.forward_backward(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return loss.item(), torch.cuda.max_memory_allocated(), min(times)


def _eager(recipe) -> None:
    """The layers back to eager: `setup` measured its policy before graphing them (and may have
    captured them since), as a test that measures again under a cap must."""
    layer_graphs.ungraph_layers(recipe._decoder_layers())
    recipe.layer_graphs = None


def _graphed_after_the_policy(recipe) -> None:
    """What `setup` does once the policy is set: the layers graphed where their memory fits
    beside the step (a trial capture), and the Trainer's collator padding rows to their shape."""
    recipe._replay_layers_as_graphs()
    recipe.trainer = recipe._build_trainer()
    mode = recipe.compute_mode
    # Kept, or off for their memory or a slower timed step; not for a failed capture.
    assert re.search(r"replayed as CUDA graphs|CUDA graphs off \((with them|they fit)", mode), mode


def _cap_between_checkpointing_and_none(recipe, batch) -> None:
    """Cap this process's card memory halfway between the trial peaks of full checkpointing and
    none (a smaller card's stand-in); the caller sets the fraction back to 1.0."""
    peak_off = recipe._try_policy(batch, "off")
    peak_on = recipe._try_policy(batch, "on")
    assert peak_off is not None and peak_on is not None and peak_off > peak_on
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (peak_on + peak_off) / 2 / memory_policy.TRIAL_HEADROOM
    torch.cuda.set_per_process_memory_fraction(cap / total)


def test_qlora_trains_checkpoints_resumes_and_saves(llama_1b, demo_rows, tmp_path):
    config = _config()
    control = LocalControl(stop_at_step=2, reason="shutdown")
    first = SFTRecipe(config, llama_1b, tmp_path, ListSink(), control, rows_path=demo_rows)
    first.setup()
    assert control.fields["compute_mode"].startswith("4-bit NF4 QLoRA")
    assert control.fields["memory_policy"] in ("off", "on", "offload")
    assert "trial step" in control.fields["memory_policy_reason"]
    # No fp32 upcast of the base: embeddings and lm_head stay bf16.
    base = first.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert first.train().stop_reason == "shutdown"
    first.cleanup()

    sink = ListSink()
    second = SFTRecipe(config, llama_1b, tmp_path, sink, LocalControl(), rows_path=demo_rows)
    second.setup()
    result = second.train()
    assert result.resumed_from_step == 2 and result.global_step == 4
    adapter = second.save()
    second.cleanup()
    rows = sink.train_rows
    assert all(r["tokens_per_second"] and r["vram_allocated_mib"] for r in rows)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == config.lora_r
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_oom_is_typed_and_vram_comes_back(llama_1b, tmp_path):
    # 262,144 tokens, no checkpointing: more than an H200 holds (131,072 fits since the MLPs are
    # fused, worker.fused_mlp).
    rows = tmp_path / "rows.jsonl"
    text = "The Zephyr Kettle 3000 boils one litre of water in 94 seconds. " * 20000
    rows.write_text(json.dumps({"line": 1, "text": text}) + "\n")
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    config = _config(
        max_seq_len=262_144,
        micro_batch_size=1,
        grad_accum_steps=1,
        packing=False,
        gradient_checkpointing="off",
        eval_fraction=0.0,
    )
    recipe = SFTRecipe(
        config, llama_1b, tmp_path / "run", ListSink(), LocalControl(), rows_path=rows
    )
    recipe.setup()
    with pytest.raises(OutOfMemory) as raised:
        recipe.train()
    error = raised.value
    assert error.kind == "oom" and error.micro_batch_size == 1 and error.seq_len > 100_000
    assert "It happened in a training step." in str(error)
    assert error.hint
    del raised, error
    recipe.cleanup()
    del recipe
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - start < 64 * 1024**2


def test_packed_attention_on_the_gpu_matches_sdpa_and_says_how_fast(llama_1b):
    """The recipe's varlen flash attention against sdpa's dense block mask on one packed row of
    mixed lengths (grouped-query heads, bf16): the same loss and gradients. Prints both times."""
    from transformers import AutoModelForCausalLM

    from worker import attention

    model = AutoModelForCausalLM.from_pretrained(
        llama_1b, dtype=torch.bfloat16, attn_implementation="sdpa", use_safetensors=True
    ).cuda()
    model.train()
    generator = torch.Generator().manual_seed(0)
    lengths = [1900, 37, 2048, 5, 700, 1500, 1]
    examples = [
        TokenizedExample(ids, ids)
        for n in lengths
        for ids in [torch.randint(10, model.config.vocab_size, (n,), generator=generator).tolist()]
    ]
    batch = {
        k: v.cuda() if torch.is_tensor(v) else v
        for k, v in FlattenedBatchCollator()([examples]).items()
    }
    probe = model.model.layers[3].self_attn.q_proj.weight

    def step(implementation: str) -> tuple[float, torch.Tensor, float]:
        model.set_attn_implementation(implementation)
        times = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return loss.item(), probe.grad.float().clone(), min(times)

    sdpa_loss, sdpa_grad, sdpa_s = step("sdpa")
    varlen_loss, varlen_grad, varlen_s = step(attention.register())
    assert attention._parameters.cache_info().currsize == 1  # the flash kernel ran
    assert varlen_loss == pytest.approx(sdpa_loss, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(sdpa_grad.flatten(), varlen_grad.flatten(), 0)
    assert cosine > 0.99
    print(
        f"\npacked row of {sum(lengths)} tokens in {len(lengths)} examples, forward+backward: "
        f"sdpa dense mask {sdpa_s * 1000:.1f} ms, varlen flash {varlen_s * 1000:.1f} ms"
    )


def test_a_card_between_checkpointing_and_none_checkpoints_only_some_layers(
    llama_1b, demo_rows, tmp_path
):
    """Capped between the peak of no checkpointing and the peak of full checkpointing (a smaller
    card's stand-in), `auto` checkpoints only as many layers as it must, and then trains, its
    final evaluation included (a whole batch's logits ran it out of memory there: sliced now,
    worker.token_logps), an evaluation peaking within what a trial step may use."""
    config = _config(max_steps=2, save_every=100, eval_every=100, micro_batch_size=8)
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    _eager(recipe)
    batch = recipe._longest_batch()
    _cap_between_checkpointing_and_none(recipe, batch)
    try:
        policy, reason, kept = recipe._measure_memory_policy()
        layers = len(recipe._decoder_layers())
        assert policy == "partial" and 0 < kept < layers, (policy, reason)
        assert f"{layers - kept} of {layers} layers checkpointed" in reason
        recipe._set_memory_policy(policy, kept)
        checkpointed = [layer.gradient_checkpointing for layer in recipe._decoder_layers()]
        assert checkpointed == [True] * (layers - kept) + [False] * kept
        _graphed_after_the_policy(recipe)
        assert recipe.train().global_step == 2
        torch.cuda.reset_peak_memory_stats()
        assert recipe.trainer.evaluate()["eval_loss"] > 0
        evaluation_peak = torch.cuda.max_memory_allocated()
        assert evaluation_peak <= recipe.trial_limit
        print(
            f"\n{reason}; {recipe.compute_mode}; evaluation peak {evaluation_peak / 2**30:.2f} GiB"
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        recipe.cleanup()


def test_a_card_that_must_checkpoint_gets_the_input_embeddings_memory_back(
    llama_1b, demo_rows, tmp_path
):
    """`auto` on a card where no checkpointing fits: the untied input embeddings go to pinned
    host memory first (worker.host_embeddings), the card's allocated memory drops by their
    table, a step's loss and LoRA gradients do not change, the job page's compute mode says so,
    and the job trains."""
    from worker.host_embeddings import HostEmbedding

    config = _config(max_steps=2, save_every=100, eval_every=100, micro_batch_size=8)
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    _eager(recipe)
    batch = recipe._longest_batch()
    lora = [p for p in recipe.model.parameters() if p.requires_grad]
    table = recipe.model.get_input_embeddings().weight
    table_bytes = table.numel() * table.element_size()

    def on_step() -> tuple[float, torch.Tensor]:
        recipe._set_memory_policy("on")
        loss, _peak, _seconds = _timed_steps(recipe, batch)
        return loss, torch.cat([p.grad.float().flatten() for p in lora])

    try:
        loss, grads = on_step()
        _cap_between_checkpointing_and_none(recipe, batch)
        del table
        before = torch.cuda.memory_allocated()
        policy, reason, kept = recipe._measure_memory_policy()
        assert policy in ("partial", "on"), reason
        assert before - torch.cuda.memory_allocated() >= table_bytes
        moved = recipe.model.get_input_embeddings()
        assert isinstance(moved, HostEmbedding) and moved.table.is_pinned()
        assert "input embeddings in host memory" in recipe.compute_mode
        host_loss, host_grads = on_step()
        assert host_loss == pytest.approx(loss, rel=1e-3)
        assert torch.nn.functional.cosine_similarity(host_grads, grads, 0) > 0.999
        recipe.model.zero_grad(set_to_none=True)
        recipe._set_memory_policy(policy, kept)
        _graphed_after_the_policy(recipe)
        assert recipe.train().global_step == 2
        print(f"\n{reason}; {recipe.compute_mode}; table {table_bytes / 2**20:.0f} MiB")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        recipe.cleanup()


def test_offloaded_and_tiled_checkpointing_match_checkpointing_in_less_memory_and_train(
    llama_1b, demo_rows, tmp_path, monkeypatch
):
    """ "offload" moves the layers' saved inputs to host memory (worker.offload): the same loss
    and gradients as plain checkpointing, a lower peak by about those inputs; "tiled" also runs
    the MLPs in slices of tokens (worker.tiled_mlp): the same again, lower still. A job trains
    with it. Prints the step times. Eager layers: a graph's pool would sit in every peak."""
    monkeypatch.setattr(layer_graphs, "ENABLED", False)
    config = _config(max_steps=2, save_every=100, eval_every=100, micro_batch_size=8)
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    batch = recipe._longest_batch()
    probe = next(
        p for name, p in recipe.model.named_parameters() if "layers.3." in name and "lora_B" in name
    )

    def step(policy: str) -> tuple[float, torch.Tensor, int, float]:
        recipe._set_memory_policy(policy)
        loss, peak, seconds = _timed_steps(recipe, batch)
        return loss, probe.grad.float().clone(), peak, seconds

    try:
        on_loss, on_grad, on_peak, on_s = step("on")
        off_loss, off_grad, off_peak, off_s = step("offload")
        tiled_loss, tiled_grad, tiled_peak, tiled_s = step("tiled")
        for loss, grad in ((off_loss, off_grad), (tiled_loss, tiled_grad)):
            assert loss == pytest.approx(on_loss, rel=1e-3)
            cosine = torch.nn.functional.cosine_similarity(on_grad.flatten(), grad.flatten(), 0)
            assert cosine > 0.999
        layers = len(recipe._decoder_layers())
        tokens = batch["input_ids"].numel()
        inputs = tokens * recipe.model.config.hidden_size * 2 * layers
        assert off_peak < on_peak - inputs / 2, (off_peak, on_peak, inputs)
        # Slices: one layer's MLP intermediates (gate, up, product, and their gradients) no longer
        # all live at once. A quarter of them is the least it must save.
        assert tokens > recipe._tile_tokens()
        mlp = tokens * recipe.model.config.intermediate_size * 2 * 6
        assert tiled_peak < off_peak - mlp / 4, (tiled_peak, off_peak, mlp)
        recipe.model.zero_grad(set_to_none=True)
        recipe._set_memory_policy("tiled")
        assert recipe.train().global_step == 2
        print(
            f"\n{tokens} tokens, forward+backward: checkpointing {on_s * 1000:.0f} ms, peak "
            f"{on_peak / 2**20:.0f} MiB; offloaded {off_s * 1000:.0f} ms, peak "
            f"{off_peak / 2**20:.0f} MiB (layer inputs {inputs / 2**20:.0f} MiB); tiled MLPs "
            f"{tiled_s * 1000:.0f} ms, peak {tiled_peak / 2**20:.0f} MiB (MLP intermediates "
            f"{mlp / 2**20:.0f} MiB)"
        )
    finally:
        recipe.cleanup()


def test_a_last_resort_is_taken_only_where_its_second_step_fits_beside_the_optimizer_state(
    llama_1b, demo_rows, tmp_path, monkeypatch
):
    """`auto`'s last resorts (offloaded checkpointing, then sliced MLPs) have no headroom of their
    own: their trial step runs beside as much memory as AdamW's state, which a step carries from
    the second on, and that memory counts in the trial's peak. On a card capped just above sliced
    MLPs' peak with the state (offloading alone would have fit it), `auto` takes the slices, and
    the job trains two steps, the second with the optimizer's state."""
    monkeypatch.setattr(layer_graphs, "ENABLED", False)  # a graph's pool would sit in every peak
    config = _config(max_steps=2, save_every=100, eval_every=100, micro_batch_size=8)
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    batch = recipe._longest_batch()
    memory_policy.embeddings_to_host(recipe)  # as `auto` does before it checkpoints
    state = memory_policy.optimizer_state_bytes(recipe.model)
    try:
        tiled = recipe._try_policy(batch, "tiled")
        tiled_beside = memory_policy.try_policy(recipe, batch, "tiled", with_optimizer_state=True)
        reserved = torch.cuda.max_memory_reserved()  # what a cap bounds: the allocator's blocks
        offload = recipe._try_policy(batch, "offload")
        assert None not in (tiled, tiled_beside, offload)
        assert abs(tiled_beside - tiled - state) < 16 * 2**20, (tiled, tiled_beside, state)
        cap = max(tiled_beside, reserved) + 32 * 2**20
        # Offloading must not fit beside the state.
        assert offload + state > cap, (offload, state, reserved, cap)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
        policy, reason, _kept = recipe._measure_memory_policy()
        assert policy == "tiled", reason
        assert "beside the optimizer's state" in reason and "of the card's" in reason, reason
        recipe._set_memory_policy(policy)
        recipe.model.zero_grad(set_to_none=True)
        assert recipe.train().global_step == 2
        print(
            f"\n{reason}; optimizer state {state / 2**20:.0f} MiB; cap {cap / 2**20:.0f} MiB; "
            f"offloading alone peaked at {offload / 2**20:.0f} MiB (the rule before took it "
            "wherever its trial ran)"
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        recipe.cleanup()


def test_fused_mlps_match_peft_on_4bit_weights_in_less_memory(
    llama_1b, demo_rows, tmp_path, monkeypatch
):
    """worker.fused_mlp and worker.fused_attention on NF4 weights and Liger's SwiGLU kernels, each
    step with one fewer fused: peft's loss and LoRA gradients
    (bf16: to a cosine of 0.999), a lower peak by at least half the SwiGLU products peft keeps.
    Prints the step times. Eager layers: a graph's pool would sit in every peak."""
    from worker.fused_attention import unfuse_attention
    from worker.fused_mlp import unfuse_mlps

    monkeypatch.setattr(layer_graphs, "ENABLED", False)
    config = _config(max_steps=1, micro_batch_size=8, lora_dropout=0.0)
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    recipe._set_memory_policy("off")
    batch = recipe._longest_batch()
    lora = [p for p in recipe.model.parameters() if p.requires_grad]
    for name, param in recipe.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; non-zero B makes every gradient non-zero
            torch.nn.init.normal_(param, std=0.02)

    def step() -> tuple[float, torch.Tensor, int, float]:
        loss, peak, seconds = _timed_steps(recipe, batch)
        return loss, torch.cat([p.grad.float().flatten() for p in lora]), peak, seconds

    try:
        assert "fused LoRA MLPs" in recipe.compute_mode
        assert "fused LoRA attention" in recipe.compute_mode
        assert "NF4 dequantised in one kernel" in recipe.compute_mode
        fused_loss, fused_grads, fused_peak, fused_s = step()
        unfuse_attention(recipe.model)
        attention_loss, attention_grads, _, mlp_only_s = step()
        unfuse_mlps(recipe.model)
        loss, grads, peak, s = step()
        assert attention_loss == pytest.approx(loss, rel=1e-3)
        assert torch.nn.functional.cosine_similarity(attention_grads, grads, 0) > 0.999
        assert fused_loss == pytest.approx(loss, rel=1e-3)
        assert torch.nn.functional.cosine_similarity(fused_grads, grads, 0) > 0.999
        layers = len(recipe._decoder_layers())
        tokens = batch["input_ids"].numel()
        products = layers * tokens * recipe.model.config.intermediate_size * 2
        assert fused_peak < peak - products / 2, (fused_peak, peak, products)
        print(
            f"\n{tokens} tokens, no checkpointing, forward+backward: fused MLPs and attention "
            f"{fused_s * 1000:.0f} ms, peak {fused_peak / 2**20:.0f} MiB; fused MLPs only "
            f"{mlp_only_s * 1000:.0f} ms; peft {s * 1000:.0f} ms, peak "
            f"{peak / 2**20:.0f} MiB (SwiGLU products {products / 2**20:.0f} MiB)"
        )
    finally:
        recipe.cleanup()


def test_a_gpu_run_without_liger_says_so_and_the_benchmark_arm_refuses_to_measure_it(
    llama_1b, demo_rows, tmp_path, monkeypatch
):
    """Liger blocked as if not installed: the compute mode says the run went without it (the job
    page reads that), and the benchmark's Tuneboard arm stops instead of timing a slower recipe."""
    import sys

    from app.verified_versions import LIGER_MISSING
    from bench.train import require_product_kernels

    for name in [m for m in sys.modules if m.startswith("liger_kernel")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel... fails
    control = LocalControl()
    recipe = SFTRecipe(_config(), llama_1b, tmp_path, ListSink(), control, rows_path=demo_rows)
    recipe.setup()
    try:
        assert recipe.missing_kernels == ["liger-kernel"] and not recipe.liger
        assert LIGER_MISSING in control.fields["compute_mode"]  # what the job page looks for
        with pytest.raises(SystemExit, match="would run without liger-kernel"):
            require_product_kernels(recipe)
    finally:
        recipe.cleanup()


@pytest.mark.parametrize("policy", ["off", "on"])
def test_cuda_graphed_layers_match_the_eager_step_and_say_how_fast(
    llama_1b, demo_rows, tmp_path, policy
):
    """worker.layer_graphs on NF4 weights: the decoder layers captured as CUDA graphs (forward
    and backward, every layer checkpointed or none) give the eager step's loss and LoRA
    gradients, step after step, with gradients summed over two micro-batches. Prints both
    steps' times and peaks."""
    from worker.layer_graphs import graph_layers, ungraph_layers

    config = _config(max_steps=1, micro_batch_size=8, lora_dropout=0.0)
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    recipe._set_memory_policy(policy)
    batch = recipe._longest_batch()
    lora = [p for p in recipe.model.parameters() if p.requires_grad]
    for name, param in recipe.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    layers = recipe._decoder_layers()
    try:
        loss, peak, seconds = _timed_steps(recipe, batch)
        grads = torch.cat([p.grad.float().flatten() for p in lora])
        graphs = graph_layers(layers)
        assert graphs is not None
        graphed_loss, graphed_peak, graphed_s = _timed_steps(recipe, batch)  # record, capture
        assert graphs.failure is None, graphs.failure
        assert graphs.replays == 2 * len(layers)  # the second and third passes replayed
        graphed_grads = torch.cat([p.grad.float().flatten() for p in lora])
        assert graphed_loss == pytest.approx(loss, rel=1e-3)
        assert torch.nn.functional.cosine_similarity(graphed_grads, grads, 0) > 0.999
        recipe.model.zero_grad(set_to_none=True)
        recipe.forward_backward(batch)
        recipe.forward_backward(batch)
        twice = torch.cat([p.grad.float().flatten() for p in lora])
        assert torch.nn.functional.cosine_similarity(twice, 2 * grads, 0) > 0.999
        assert float(twice.norm()) == pytest.approx(2 * float(grads.norm()), rel=1e-2)
        print(
            f"\n{batch['input_ids'].numel()} tokens, policy {policy}: eager {seconds * 1000:.1f} "
            f"ms, peak {peak / 2**20:.0f} MiB; CUDA graphs {graphed_s * 1000:.1f} ms, peak "
            f"{graphed_peak / 2**20:.0f} MiB"
        )
    finally:
        ungraph_layers(layers)
        recipe.cleanup()


def test_packed_rows_padded_to_one_shape_replay_as_graphs_with_the_unpadded_gradients(
    llama_1b, demo_rows, tmp_path
):
    """Variable-length data on the GPU: each packed row padded to the run's one shape
    (worker.batch_shape: padding examples that train nothing, up to one count of examples)
    gives the unpadded row's loss and LoRA gradients on the varlen flash kernel, eagerly and
    replayed as CUDA graphs over rows of different fill. Prints the times."""
    from worker.batch_shape import REAL_TOKENS, PackedShape
    from worker.data import FlattenedBatchCollator
    from worker.layer_graphs import graph_layers, ungraph_layers

    config = _config(max_steps=1, micro_batch_size=8, lora_dropout=0.0)
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    recipe._set_memory_policy("off")
    rows = sorted(recipe.train_batches, key=lambda b: -sum(map(len, b)))[:3]
    assert len(rows) == 3 and len({sum(map(len, r)) for r in rows}) > 1  # of different fill
    shape = PackedShape.of(recipe.train_batches)
    plain, padded = FlattenedBatchCollator(), FlattenedBatchCollator(shape, 0)
    lora = [p for p in recipe.model.parameters() if p.requires_grad]
    for name, param in recipe.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)

    def step(batch) -> tuple[float, torch.Tensor, float]:
        batch = recipe._to_device({k: v for k, v in batch.items() if k != REAL_TOKENS})
        recipe.model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = recipe.forward_backward(batch).item()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return loss, torch.cat([p.grad.float().flatten() for p in lora]), seconds

    layers = recipe._decoder_layers()
    try:
        expected = [step(plain([row])) for row in rows]
        eager = [step(padded([row])) for row in rows]
        assert len({padded([row])["input_ids"].shape for row in rows}) == 1
        graphs = graph_layers(layers)
        assert graphs is not None
        graphed = [step(padded([row])) for row in rows + rows]  # record, capture, replay
        assert graphs.failure is None, graphs.failure
        assert graphs.replays == 5 * len(layers)  # every pass but the first (recorded)
        for (loss, grads, _), (padded_loss, padded_grads, _) in zip(
            expected * 3, eager + graphed, strict=True
        ):
            assert padded_loss == pytest.approx(loss, rel=1e-3)
            assert torch.nn.functional.cosine_similarity(padded_grads, grads, 0) > 0.999
        print(
            f"\nrows of {[sum(map(len, r)) for r in rows]} tokens padded to {shape}: unpadded "
            f"{[round(s * 1000, 1) for *_, s in expected]} ms, padded eager "
            f"{[round(s * 1000, 1) for *_, s in eager]} ms, replayed "
            f"{[round(s * 1000, 1) for *_, s in graphed[3:]]} ms"
        )
    finally:
        ungraph_layers(layers)
        recipe.cleanup()


def test_a_failed_capture_leaves_the_layers_eager_and_random_numbers_working(
    llama_1b, demo_rows, tmp_path, monkeypatch
):
    """A layer that reads a value back to the host mid-capture (illegal in a CUDA graph): the
    capture fails, the step runs eagerly with the same loss, and the card's random number
    generator still works afterwards (a failed capture leaves it marked as capturing)."""

    config = _config(
        max_steps=1, micro_batch_size=4, lora_dropout=0.0, gradient_checkpointing="off"
    )
    recipe = SFTRecipe(config, llama_1b, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows)
    recipe.setup()
    batch = recipe._longest_batch()
    layers = recipe._decoder_layers()
    try:
        eager = recipe.forward_backward(batch).item()
        graphs = layer_graphs.graph_layers(layers)
        assert graphs is not None
        real = layer_graphs._Record.run

        def reads_back(self, hidden):
            out = real(self, hidden)
            if torch.cuda.is_current_stream_capturing():
                float(out.sum())  # a sync: invalidates the capture
            return out

        monkeypatch.setattr(layer_graphs._Record, "run", reads_back)
        losses = [recipe.forward_backward(batch).item() for _ in range(3)]
        assert graphs.failure and not graphs.enabled and graphs.replays == 0
        assert losses == pytest.approx([eager] * 3, rel=1e-3)
        torch.randn(8, device="cuda").normal_()  # the generator is usable again
    finally:
        layer_graphs.ungraph_layers(layers)
        recipe.cleanup()
