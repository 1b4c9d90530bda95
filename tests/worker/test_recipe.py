"""The SFT recipe on the real tiny demo model, on the CPU."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from app.train_config import TrainConfig
from worker.checkpoints import COMPLETE_MARKER
from worker.errors import NonFiniteLoss, OutOfMemory, TrainingError
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe
from worker.training.distributed import load_adapter_weights


def _config(**overrides) -> TrainConfig:
    fields = dict(
        dataset_id="0" * 32,
        max_steps=6,
        micro_batch_size=1,
        grad_accum_steps=2,
        max_seq_len=64,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        lr_scheduler="linear",
        lora_r=8,
        lora_alpha=16,
        quantization="nf4",  # on the CPU the recipe falls back to fp32 LoRA and says so
        eval_fraction=0.05,
        eval_every=1000,
        save_every=1000,
        seed=7,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _run(config, demo_model, demo_rows, output_dir, control=None, before_train=None):
    sink, control = ListSink(), control or LocalControl()
    recipe = SFTRecipe(config, demo_model, output_dir, sink, control, rows_path=demo_rows)
    try:
        recipe.setup()
        if before_train:
            before_train(recipe)
        result = recipe.train()
        adapter = recipe.save() if result.stop_reason is None else None
    finally:
        recipe.cleanup()
    return result, sink, control, adapter


def _checkpoint_steps(output_dir):
    return sorted(
        int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("checkpoint-*")
    )


@pytest.mark.slow
def test_short_cpu_run_lowers_the_loss_and_saves_a_loadable_adapter(
    demo_model, demo_rows, tmp_path
):
    config = _config(max_steps=12, eval_every=6, save_every=6, learning_rate=5e-3)
    result, sink, control, adapter = _run(config, demo_model, demo_rows, tmp_path)

    assert result.global_step == 12 and result.stop_reason is None
    losses = [row["loss"] for row in sink.train_rows]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert len(sink.eval_rows) == 2
    first = sink.train_rows[0]
    assert first["tokens"] > 0 and first["step_seconds"] > 0
    assert first["tokens_per_second"] == pytest.approx(first["tokens"] / first["step_seconds"])
    assert control.fields["compute_mode"].startswith("fp32 LoRA on the CPU")
    assert control.fields["memory_policy"] == "off"
    assert control.fields["progress_step"] == 12

    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.json"):
        assert (adapter / name).is_file()
    # The config records what ran: the job asked for nf4 (the default), the CPU ran fp32.
    assert config.quantization == "nf4"
    saved = TrainConfig.model_validate_json((adapter / "train_config.json").read_text())
    assert saved == config.model_copy(update={"quantization": "none"})
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(demo_model)
    model = PeftModel.from_pretrained(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(demo_model).chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Zephyr Kettle price?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_run_that_reports_to_tensorboard_writes_its_events_in_the_run_folder(
    demo_model, demo_rows, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard", reason="the trackers extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from app.layout import tensorboard_in

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "restored after the test")
    config = _config(max_steps=3, logging_every=1, report_to="tensorboard")
    _run(config, demo_model, demo_rows, tmp_path)

    (events,) = tensorboard_in(tmp_path).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3]
    assert not (tmp_path / "checkpoints" / "runs").exists()


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(demo_model, demo_rows, tmp_path):
    config = _config(max_steps=6, save_every=3)
    _, _, _, straight = _run(config, demo_model, demo_rows, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    result, _, _, _ = _run(
        config, demo_model, demo_rows, interrupted, control=LocalControl(stop_at_step=3)
    )
    assert result.stop_reason == "cancel" and result.global_step == 3
    assert _checkpoint_steps(interrupted) == [3]
    # A crash mid-save leaves a newer folder without its completion marker: it must be ignored.
    half = interrupted / "checkpoints" / "checkpoint-5"
    shutil.copytree(interrupted / "checkpoints" / "checkpoint-3", half)
    (half / COMPLETE_MARKER).unlink()
    (half / "adapter_model.safetensors").write_bytes(b"partial")

    result, sink, control, resumed = _run(config, demo_model, demo_rows, interrupted)
    assert result.resumed_from_step == 3 and result.global_step == 6
    assert [row["step"] for row in sink.train_rows] == [4, 5, 6]
    assert "Resuming from the checkpoint at step 3" in control.fields["notice"]

    want = load_file(straight / "adapter_model.safetensors")
    got = load_file(resumed / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_after_three_steps_without_checkpointing_them(
    demo_model, demo_rows, tmp_path
):
    control = LocalControl()

    def poison_after_step_two(recipe):
        # A real NaN in the forward pass from step 3 on (what an overflowing layer produces).
        def hook(module, inputs, output):
            if control.fields.get("progress_step", 0) >= 2:
                return output * float("nan")
            return None

        recipe.model.get_base_model().model.embed_tokens.register_forward_hook(hook)

    config = _config(max_steps=10, save_every=1)
    with pytest.raises(NonFiniteLoss) as raised:
        _run(config, demo_model, demo_rows, tmp_path, control, before_train=poison_after_step_two)
    assert raised.value.kind == "non_finite_loss" and raised.value.step == 5
    assert _checkpoint_steps(tmp_path) == [1, 2]
    assert all(
        (tmp_path / "checkpoints" / f"checkpoint-{s}" / COMPLETE_MARKER).is_file() for s in (1, 2)
    )


@pytest.mark.slow
def test_checkpoints_keep_the_last_two_and_the_best(demo_model, demo_rows, tmp_path):
    config = _config(max_steps=8, save_every=2, eval_every=2)
    _run(config, demo_model, demo_rows, tmp_path)
    steps = _checkpoint_steps(tmp_path)
    assert steps[-2:] == [6, 8] and len(steps) <= 3
    markers = [
        json.loads((tmp_path / "checkpoints" / f"checkpoint-{s}" / COMPLETE_MARKER).read_text())
        for s in steps
    ]
    assert all(m["eval_loss"] is not None for m in markers)


def test_packed_examples_from_the_benchmark_train(demo_model, tokenizer, demo_rows, tmp_path):
    from worker.data import read_rows, tokenize_rows

    examples, _ = tokenize_rows(tokenizer, read_rows(demo_rows)[:40], "assistant", 64)
    sink = ListSink()
    recipe = SFTRecipe(
        _config(max_steps=2, eval_fraction=0.0),
        demo_model,
        tmp_path,
        sink,
        LocalControl(),
        train_examples=examples,
    )
    recipe.setup()
    try:
        assert recipe.train().global_step == 2
    finally:
        recipe.cleanup()
    assert [row["step"] for row in sink.train_rows] == [1, 2]
    assert all(row["tokens"] > 0 for row in sink.train_rows)


LINEAR = (1_000, 1_350, 1_700, 2_050, 2_400)  # peak by layers kept: 350 more for each
UNEVEN = (1_000, 1_500, 1_800, 1_900, 2_500)  # the estimate from 2 kept (400 each) says 2


@pytest.mark.parametrize(
    ("peaks", "usable", "policy", "kept", "state"),
    [
        (LINEAR, 10_000, "off", 0, 100),  # everything fits: no layer is checkpointed
        (LINEAR, 2_000, "partial", 2, 100),  # limit 1,800: 1,000 + 2 x 350 = 1,700
        (LINEAR, 1_300, "on", 0, 100),  # limit 1,135: not one layer more than full checkpointing
        (LINEAR, 1_000, "offload", 0, 100),  # full checkpointing runs out of memory
        (LINEAR, 400, "tiled", 0, 100),  # so does offloading: MLPs in slices
        (LINEAR, 250, None, 0, 100),  # nothing fits: a typed out-of-memory error, before training
        (UNEVEN, 2_200, "partial", 3, 100),  # limit 1,980: a trial past the estimate finds 3 fit
        # The last resorts' trials carry the optimizer's state: offloading alone would run at 500
        # of 560, and its second step, with the state, would not.
        (LINEAR, 560, "tiled", 0, 100),
        (LINEAR, 380, None, 0, 100),  # slices alone would run at 300; with the state, 400
        # A state larger than the 10% kept free (a LoRA of high rank): the limit is what the card
        # leaves beside it and the allocator's slack, 1,900 - 400: one layer kept, not two.
        (LINEAR, 2_000, "partial", 1, 400),
    ],
)
def test_the_auto_memory_policy_keeps_as_many_layers_as_the_card_allows(
    demo_model, demo_rows, tmp_path, monkeypatch, peaks, usable, policy, kept, state
):
    """The trial-step arithmetic with a stand-in for a card's memory: full checkpointing peaks at
    1,000, each layer that keeps its activations adds to it (`peaks`), offloading needs 500,
    offloading with MLPs in slices 300, and the optimizer's state (`state`) is held beside the
    last resorts' trial steps."""
    from worker.training import memory_policy

    recipe = SFTRecipe(
        _config(), demo_model, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows
    )
    recipe.setup()
    layers = recipe._decoder_layers()
    assert len(layers) == 4

    held = []  # the optimizer state's stand-in, while a trial holds it

    @contextlib.contextmanager
    def optimizer_state_held():
        held.append(state)
        try:
            yield
        finally:
            held.pop()

    def trial_step(batch):
        peak = {"offload": 500, "tiled": 300}.get(recipe.memory_policy) or peaks[
            sum(not layer.gradient_checkpointing for layer in layers)
        ]
        peak += sum(held)
        if peak > usable:
            raise torch.OutOfMemoryError("stand-in card is full")
        return peak

    monkeypatch.setattr(recipe, "_trial_step", trial_step)
    monkeypatch.setattr(recipe, "_optimizer_state_held", optimizer_state_held)
    monkeypatch.setattr(recipe, "_optimizer_state_bytes", lambda: state)
    monkeypatch.setattr(recipe, "_usable_memory", lambda: usable)
    monkeypatch.setattr(memory_policy, "TRIAL_HEADROOM", 0.9)
    if policy is None:
        with pytest.raises(OutOfMemory, match="sliced MLPs does not fit"):
            recipe._measure_memory_policy()
        return recipe.cleanup()
    chosen, reason, layers_kept = recipe._measure_memory_policy()
    assert (chosen, layers_kept) == (policy, kept), reason
    assert ("beside the optimizer's state" in reason) == (policy in ("offload", "tiled")), reason
    assert not held
    recipe._set_memory_policy(chosen, layers_kept)
    assert [not layer.gradient_checkpointing for layer in layers].count(True) == (
        4 if policy == "off" else kept
    )
    recipe.cleanup()


def test_the_optimizer_state_held_beside_a_last_resort_trial_is_adamw_s_own(
    demo_model, demo_rows, tmp_path
):
    """What the last resorts' trials hold beside the step is what the optimizer keeps from the
    first step on: the Trainer's AdamW after one real step on the demo model's LoRA weights."""
    from worker.training import memory_policy

    recipe = SFTRecipe(
        _config(), demo_model, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows
    )
    recipe.setup()
    try:
        recipe.forward_backward(recipe._longest_batch())
        trainable = [p for p in recipe.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable)
        optimizer.step()
        kept = sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for name, t in state.items()
            if name != "step"  # one number a weight
        )
        assert kept > 0
        assert memory_policy.optimizer_state_bytes(recipe.model) == kept
    finally:
        recipe.cleanup()


def lora_gradients(recipe, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward pass from zeroed gradients: the loss, and a copy of every LoRA
    weight's gradient (each must have one)."""
    recipe.model.zero_grad(set_to_none=True)
    loss = recipe.forward_backward(batch)
    lora = {n: p for n, p in recipe.model.named_parameters() if p.requires_grad}
    missing = [n for n, p in lora.items() if p.grad is None]
    assert not missing, f"{recipe.memory_policy}: no gradient for {missing[:3]}"
    return loss.item(), {n: p.grad.clone() for n, p in lora.items()}


def test_every_memory_policy_gives_every_lora_weight_the_same_gradient(
    demo_model, demo_rows, tmp_path
):
    """Checkpointing (all layers, or all but some) changes what is kept, never the result: the
    same loss and the same gradient on every LoRA weight as no checkpointing. A checkpointed layer
    whose backward never ran would leave its LoRA gradients empty."""
    recipe = SFTRecipe(
        _config(lora_dropout=0.0),
        demo_model,
        tmp_path,
        ListSink(),
        LocalControl(),
        rows_path=demo_rows,
    )
    recipe.setup()
    batch = recipe._longest_batch()
    lora = {n: p for n, p in recipe.model.named_parameters() if p.requires_grad}
    assert len(lora) == 4 * 7 * 2  # 4 layers, 7 projections, lora_A and lora_B

    def gradients(policy: str, kept: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
        recipe._set_memory_policy(policy, kept)
        return lora_gradients(recipe, batch)

    try:
        off_loss, off = gradients("off")
        recipe._tile_tokens = lambda: 16  # MLP slices shorter than the batch: tiling happens
        assert batch["input_ids"].shape[-1] > 2 * 16
        for policy, kept in (("on", 0), ("partial", 2), ("offload", 0), ("tiled", 0)):
            loss, grads = gradients(policy, kept)
            assert loss == pytest.approx(off_loss, rel=1e-5), policy
            for name, grad in grads.items():
                torch.testing.assert_close(grad, off[name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        recipe.cleanup()


def test_a_checkpoints_lora_weights_load_into_a_fresh_model_and_a_mismatch_is_refused(
    demo_model, demo_rows, tmp_path
):
    """What a multi-GPU resume does before FSDP wraps the model (the Trainer's own FSDP resume
    skips PEFT adapters): the checkpoint's LoRA weights, by name, into the new model."""
    _run(_config(max_steps=2, save_every=2), demo_model, demo_rows, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    saved = load_file(checkpoint / "adapter_model.safetensors")

    fresh = SFTRecipe(
        _config(), demo_model, tmp_path / "fresh", ListSink(), LocalControl(), rows_path=demo_rows
    )
    fresh.setup()
    lora = {k: v for k, v in fresh.model.state_dict().items() if "lora_B" in k}
    assert all(not v.any() for v in lora.values())  # a new adapter starts at zero
    load_adapter_weights(fresh.model, checkpoint, fresh.device)
    state = fresh.model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], value), key
    assert any(state[k].any() for k in lora)
    # A checkpoint from another LoRA layout (here: without the q_proj weights) is refused.
    with pytest.raises(TrainingError, match=r"does not match this job's LoRA layers \(8 missing"):
        load_adapter_weights(
            fresh.model, _without(checkpoint, "q_proj", tmp_path / "partial"), fresh.device
        )
    fresh.cleanup()


def _without(checkpoint, name, folder):
    """A copy of the checkpoint's adapter without one projection's LoRA weights."""
    from safetensors.torch import save_file

    folder.mkdir()
    weights = load_file(checkpoint / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if name not in k}, folder / "adapter_model.safetensors"
    )
    return folder


@pytest.mark.parametrize(
    ("operator_value", "expected"),
    [(None, "expandable_segments:True"), ("max_split_size_mb:256", "max_split_size_mb:256")],
)
def test_gpu_processes_get_growable_allocator_segments_unless_the_operator_chose(
    operator_value, expected
):
    """A training child imports `worker` (python -m worker.run) before CUDA starts."""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if operator_value is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = operator_value
    code = "import os, worker; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == expected


def test_the_kernels_the_gpu_recipe_would_use_are_named_when_they_cannot_be_imported(
    monkeypatch,
):
    """On one CUDA device the recipe uses liger-kernel; on the CPU and under FSDP it does not."""
    import sys

    from worker.training.loading import missing_kernels

    for name in [m for m in sys.modules if m.startswith("liger_kernel")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    assert missing_kernels(torch.device("cuda", 0), distributed=False) == ["liger-kernel"]
    assert missing_kernels(torch.device("cuda", 0), distributed=True) == []
    assert missing_kernels(torch.device("cpu"), distributed=False) == []


def test_the_benchmarks_tuneboard_arm_stops_when_a_product_kernel_is_missing():
    from types import SimpleNamespace

    from bench.train import require_product_kernels

    require_product_kernels(
        SimpleNamespace(missing_kernels=[], compute_mode="fp32 LoRA on the CPU")
    )
    without = SimpleNamespace(
        missing_kernels=["liger-kernel"], compute_mode="4-bit NF4 QLoRA, without Liger kernels"
    )
    with pytest.raises(SystemExit) as stopped:
        require_product_kernels(without)
    message = str(stopped.value)
    assert message.startswith("The Tuneboard arm would run without liger-kernel")
    assert "no figure is recorded" in message and "pip install liger-kernel==0.8.5" in message


def test_the_start_is_timed_in_parts_up_to_the_first_optimizer_step(
    demo_model, demo_rows, tmp_path, monkeypatch
):
    """Tokenisation, model load and the memory policy's trial steps, itemised: the job page's
    start timing (from the claim in a job; here from setup) and the benchmark's."""
    config = _config(max_steps=2, eval_fraction=0.0, gradient_checkpointing="auto")
    result, _sink, control, _adapter = _run(config, demo_model, demo_rows, tmp_path)
    assert result.global_step == 2
    sentence = control.fields["start_timing"]
    assert sentence.startswith("setup to first step ")
    for part in ("tokenisation", "model load", "memory policy", "(0 trial steps)", "first step"):
        assert part in sentence, sentence

    # A card's `auto` (a stand-in: no checkpointing runs out of memory) counts its trial steps.
    def measured(recipe):
        def trial_step(batch):
            if recipe.memory_policy == "off":
                raise torch.OutOfMemoryError("stand-in card is full")
            return 100

        monkeypatch.setattr(recipe, "_trial_step", trial_step)
        monkeypatch.setattr(recipe, "_usable_memory", lambda: 1000)
        recipe._set_memory_policy(*[recipe._measure_memory_policy()[i] for i in (0, 2)])
        measured.timing = recipe.start_timing

    _run(config, demo_model, demo_rows, tmp_path / "b", before_train=measured)
    timing = measured.timing.as_dict()
    assert timing["trial_steps"] >= 2, timing
    assert f"({timing['trial_steps']} trial steps)" in measured.timing.summary()
    parts = [
        timing[k] for k in ("tokenisation_s", "model_load_s", "memory_policy_s", "first_step_s")
    ]
    assert all(seconds > 0 for seconds in parts), timing
    assert timing["total_s"] >= sum(parts)


@pytest.mark.parametrize(
    "in_training, where",
    [(True, "in a training step"), (False, "in the evaluation on the held-out rows")],
    ids=["training", "evaluation"],
)
def test_running_out_of_memory_says_where_in_the_job(
    demo_model, demo_rows, tmp_path, in_training, where
):
    """The job page's error names the part of the job that ran out of memory (a stand-in card
    that is full in the training step, or in the evaluation), and the worker's log keeps where
    in the code."""

    def full_card(recipe):
        def full(module, args):
            if module.training == in_training:
                raise torch.OutOfMemoryError("stand-in card is full")

        recipe._decoder_layers()[0].register_forward_pre_hook(full)

    config = _config(max_steps=2, eval_every=1, eval_fraction=0.2)
    with pytest.raises(OutOfMemory) as error:
        _run(config, demo_model, demo_rows, tmp_path, before_train=full_card)
    assert f"It happened {where}." in str(error.value)
    assert error.value.step == (0 if in_training else 1)


def test_the_starts_trial_steps_collect_garbage_without_walking_the_loaded_model(
    demo_model, demo_rows, tmp_path, monkeypatch
):
    """Each of `auto`'s trial steps ends with a full garbage collection. While the memory policy
    and the graphs' check run, what the libraries and the model made is set aside (gc.freeze),
    so a collection walks only what came since; once setup is done it is all back (a later
    collection can free the job's objects)."""
    import gc
    import time

    from tests.worker.conftest import lora_recipe
    from worker.training import memory_policy

    choose, seen = memory_policy.choose, []

    def timed_choose(recipe):
        start = time.perf_counter()
        gc.collect()
        seen.append((gc.get_freeze_count(), len(gc.get_objects()), time.perf_counter() - start))
        choose(recipe)

    monkeypatch.setattr(memory_policy, "choose", timed_choose)
    recipe = lora_recipe(demo_model, demo_rows, tmp_path)
    try:
        frozen, walked, seconds = seen[0]
        assert frozen > 100_000 and walked < frozen // 100
        assert gc.get_freeze_count() == 0
        start = time.perf_counter()
        gc.collect()
        print(
            f"\na collection: {seconds * 1e3:.1f} ms frozen, {(time.perf_counter() - start) * 1e3:.1f} ms not"
        )
    finally:
        recipe.cleanup()
