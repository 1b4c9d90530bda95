"""worker/layer_graphs.py on the CPU, with a Python replay standing in for the CUDA graph
(`emulate=True`): the same recording, capture order, static buffers shared between layers,
autograd function and gradient accumulation as on the GPU, so a graphed pass gives the eager
pass's loss and LoRA gradients under every policy it serves. The CUDA capture itself runs in
tests/worker/test_gpu_recipe.py on the GPU machine."""

from __future__ import annotations

import gc
import json
import re
import weakref
from pathlib import Path

import pytest
import torch

from tests.worker.conftest import LAYERS
from tests.worker.test_recipe import lora_gradients
from worker import layer_graphs
from worker.layer_graphs import graph_layers, graphs_of, ungraph_layers


def _graphed(recipe, policy: str = "off"):
    """The recipe's longest batch, its decoder layers, and their graphs (the stand-in replay)."""
    batch = recipe._longest_batch()
    recipe._set_memory_policy(policy)
    layers = recipe._decoder_layers()
    graphs = graph_layers(layers, emulate=True)
    assert graphs is not None
    return batch, layers, graphs


def _broken_capture(self, *args):
    raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("policy", ["off", "on", "partial"])
def test_replayed_layers_give_the_eager_loss_and_gradients(recipe, policy):
    batch = recipe._longest_batch()
    recipe._set_memory_policy(policy, kept_layers=1)
    eager = lora_gradients(recipe, batch)
    layers = recipe._decoder_layers()
    graphs = graph_layers(layers, emulate=True)
    assert graphs is not None and graphs_of(layers) is graphs
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * LAYERS
    runs = [lora_gradients(recipe, batch) for _ in range(3)]  # recorded, captured, replayed
    assert graphs.failure is None
    assert graphs.replays == 2 * LAYERS  # the second and third passes replayed every layer
    for loss, grads in runs:
        assert loss == pytest.approx(eager[0], rel=1e-6)
        for name, grad in eager[1].items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    ungraph_layers(layers)
    assert type(layers[0]).__name__ == "LlamaDecoderLayer"
    assert not getattr(type(layers[0]), "_tuneboard_graphed", False)
    assert graphs_of(layers) is None


def test_gradients_accumulate_over_replayed_micro_batches(recipe):
    """Two micro-batches before the optimizer step: `.grad` holds their sum, and is not the
    replay's buffer, which the next replay overwrites."""
    _, once = lora_gradients(recipe, recipe._longest_batch())
    batch, layers, graphs = _graphed(recipe)
    for _ in range(2):  # recorded, then captured
        lora_gradients(recipe, batch)
    recipe.model.zero_grad(set_to_none=True)
    recipe.forward_backward(batch)
    recipe.forward_backward(batch)
    assert graphs.replays == 3 * LAYERS
    for name, p in recipe.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * once[name], rtol=1e-5, atol=1e-7, msg=name)
    ungraph_layers(layers)


def test_a_second_forward_pass_before_the_backward_runs_eagerly(recipe):
    """A graph replayed and not yet backpropagated holds that pass's activations: a second pass
    in the meantime must not replay it (it would overwrite them); it runs as before."""
    batch, layers, graphs = _graphed(recipe)
    _, once = lora_gradients(recipe, batch)  # recorded
    lora_gradients(recipe, batch)  # captured
    recipe.model.zero_grad(set_to_none=True)
    replays = graphs.replays
    first = recipe.batch_loss(recipe.model, batch)
    assert graphs.replays == replays + LAYERS
    second = recipe.batch_loss(recipe.model, batch)
    assert graphs.replays == replays + LAYERS  # the second pass ran eagerly
    (first + second).backward()
    for name, p in recipe.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * once[name], rtol=1e-5, atol=1e-7, msg=name)
    del first, second
    lora_gradients(recipe, batch)  # the backward pass ran: the graphs serve again
    assert graphs.replays == replays + 2 * LAYERS
    ungraph_layers(layers)


def test_passes_without_gradients_and_new_shapes_run_eagerly(recipe, monkeypatch):
    batch, layers, graphs = _graphed(recipe)
    for _ in range(2):
        lora_gradients(recipe, batch)
    replays = graphs.replays
    with torch.no_grad():
        recipe.batch_loss(recipe.model, batch)
    assert graphs.replays == replays
    monkeypatch.setattr(layer_graphs, "MAX_SIGNATURES", 1)
    ids = batch["input_ids"][..., :-8]  # another signature: one plain sequence, shorter
    shorter = {"input_ids": ids, "labels": ids.clone()}
    loss, _ = lora_gradients(recipe, shorter)
    assert graphs.replays == replays and len(graphs.captured) == 1
    ungraph_layers(layers)
    assert loss > 0


def test_a_failed_capture_leaves_the_layers_eager(recipe, monkeypatch, caplog):
    """...and keeps nothing of the half-made graphs (on a card, their memory pool): the log,
    which a handler may keep (pytest's does), has the traceback as text, not its frames."""
    eager_loss, eager = lora_gradients(recipe, recipe._longest_batch())
    batch, layers, graphs = _graphed(recipe)
    monkeypatch.setattr(layer_graphs._LayerGraph, "capture_forward", _broken_capture)
    made, init = [], layer_graphs._LayerGraph.__init__

    def tracked(self, *args) -> None:
        init(self, *args)
        made.append(weakref.ref(self))

    monkeypatch.setattr(layer_graphs._LayerGraph, "__init__", tracked)
    for _ in range(3):
        loss, grads = lora_gradients(recipe, batch)
        assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert graphs.failure and "stream is capturing" in graphs.failure
    gc.collect()
    assert made and all(ref() is None for ref in made)
    assert "Traceback" in caplog.text and "_broken_capture" in caplog.text
    assert not graphs.enabled and graphs.replays == 0
    for name, grad in eager.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    ungraph_layers(layers)


def _fixed_length_rows(path, count: int = 12) -> Path:
    """Plain-text rows of one length: every packed micro-batch has the same shape."""
    text = "the quick brown fox jumps over the lazy dog " * 2  # 2 a micro-batch
    path.write_text("".join(json.dumps({"line": i + 1, "text": text}) + "\n" for i in range(count)))
    return path


def _train(demo_model, rows, output_dir, emulate: bool, stand_in=None, **overrides):
    from app.train_config import TrainConfig
    from worker.metrics import ListSink
    from worker.recipes.sft import LocalControl, SFTRecipe

    fields = dict(
        dataset_id="0" * 32, max_steps=4, micro_batch_size=2, grad_accum_steps=2,
        max_seq_len=64, lora_r=8, lora_alpha=16, lora_dropout=0.0, quantization="none",
        eval_fraction=0.0, save_every=1000, learning_rate=1e-2, seed=3,
    )  # fmt: skip
    config = TrainConfig(**{**fields, **overrides})
    sink, control = ListSink(), LocalControl()
    recipe = SFTRecipe(config, demo_model, output_dir, sink, control, rows_path=rows)
    layer_graphs.EMULATE = emulate
    if stand_in is not None:
        stand_in(recipe)
    try:
        recipe.setup()
        graphs = graphs_of(recipe._decoder_layers())
        one_shape = recipe._one_batch_shape()
        recipe.train()
        replays = graphs.replays if graphs else 0
    finally:
        layer_graphs.EMULATE = False
        recipe.cleanup()
    losses = [row["loss"] for row in sink.rows if row.get("loss") is not None]
    mode = f"{control.fields['compute_mode']}; start: {control.fields.get('start_timing')}"
    _train.tokens = sum(row.get("tokens") or 0 for row in sink.rows)  # real tokens trained
    _train.fields, _train.rows = control.fields, sink.rows
    return losses, replays, mode, one_shape


def test_a_run_on_fixed_length_data_replays_its_layers_and_trains_the_same(demo_model, tmp_path):
    """The recipe turns graphs on when every micro-batch has one shape (then the job page's
    compute mode says so): the run's losses, step by step over four optimizer steps of two
    micro-batches each, are the eager run's."""
    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    eager, none, mode, one_shape = _train(demo_model, rows, tmp_path / "eager", emulate=False)
    assert one_shape and none == 0 and "CUDA graphs" not in mode  # no CUDA here
    graphed, replays, mode, _ = _train(demo_model, rows, tmp_path / "graphed", emulate=True)
    assert "decoder layers replayed as CUDA graphs" in mode
    # The capture ran in the first optimizer step's second micro-batch: the job page says so.
    assert re.search(r"first step [0-9.]+ s \(capture [0-9.]+ s\)", mode), mode
    assert replays == (4 * 2 - 1) * LAYERS  # every pass but the first (recorded)
    assert len(graphed) == len(eager) == 4
    assert graphed == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("graphs_fit", [True, False])
def test_graphs_are_captured_at_setup_and_stay_only_where_their_memory_fits(
    demo_model, tmp_path, graphs_fit
):
    """A card's stand-in: the eager step peaks at 6 GiB, the graphed one at 6.5, and a step may
    use 7 or 6.3 GiB. Two trial steps run with the layers graphed (the second captures): where
    the graphs fit, every training pass replays and the start timing puts the capture in setup;
    where they do not, the layers train eagerly and the compute mode says why. The same losses."""
    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    graphed_trials = []

    def stand_in(recipe) -> None:
        recipe.trial_limit = (7.0 if graphs_fit else 6.3) * 2**30

        def trial_step(batch) -> int:
            recipe.forward_backward(batch)
            recipe.model.zero_grad(set_to_none=True)
            graphed_trials.append(recipe.layer_graphs is not None)
            return int((6.5 if recipe.layer_graphs else 6.0) * 2**30)

        recipe._trial_step = trial_step

    eager, _, _, _ = _train(demo_model, rows, tmp_path / "eager", emulate=False)
    losses, replays, mode, _ = _train(
        demo_model, rows, tmp_path / "run", emulate=True, stand_in=stand_in
    )
    assert graphed_trials == [True, True]
    assert losses == pytest.approx(eager, rel=1e-5)
    if graphs_fit:
        assert replays == (1 + 4 * 2) * LAYERS  # the capturing trial step, then every pass
        assert "decoder layers replayed as CUDA graphs" in mode
        assert re.search(r"CUDA graphs [0-9.]+ s \(capture [0-9.]+ s\)", mode), mode
    else:
        assert replays == 0 and "replayed as CUDA graphs" not in mode
        assert (
            "CUDA graphs off (with them a step or an evaluation on the longest micro-batch would "
            "peak at 6.5 GiB, over the 6.3 GiB a step may use)"
        ) in mode


@pytest.mark.parametrize("evaluation_fits", [True, False])
def test_graphs_stay_only_where_an_evaluation_beside_their_pool_fits(
    demo_model, tmp_path, evaluation_fits
):
    """A job that evaluates runs its layers eagerly in the evaluation, on memory of its own beside
    the graphs' pool. A card's stand-in: the graphed step peaks at 6.5 GiB, a step may use 7, an
    evaluation's forward pass beside the pool peaks at 6.8 or 7.2 GiB: where it would not fit,
    the layers train eagerly and the compute mode says why; the job evaluates either way."""
    rows = _fixed_length_rows(tmp_path / "rows.jsonl", count=24)
    evaluations = []

    def stand_in(recipe) -> None:
        recipe.trial_limit = 7.0 * GIB

        def trial_step(batch) -> int:
            recipe.forward_backward(batch)
            recipe.model.zero_grad(set_to_none=True)
            return int((6.5 if recipe.layer_graphs else 6.0) * GIB)

        def evaluation_step(batch) -> int:
            evaluations.append(bool(recipe.layer_graphs and recipe.layer_graphs.captured))
            return int((6.8 if evaluation_fits else 7.2) * GIB)

        recipe._trial_step, recipe._evaluation_step = trial_step, evaluation_step

    _, replays, mode, _ = _train(
        demo_model, rows, tmp_path / "run", True, stand_in, eval_fraction=0.2, eval_every=2
    )
    assert evaluations == [True]  # once, beside the captured graphs
    assert [r["step"] for r in _train.rows if r.get("eval_loss") is not None] == [2, 4]
    if evaluation_fits:
        assert replays > 0 and "decoder layers replayed as CUDA graphs" in mode
    else:
        assert replays == 0 and "replayed as CUDA graphs" not in mode
        assert (
            "CUDA graphs off (with them a step or an evaluation on the longest micro-batch would "
            "peak at 7.2 GiB, over the 7.0 GiB a step may use)"
        ) in mode


def test_an_evaluation_out_of_memory_beside_the_graphs_drops_them_and_the_job_goes_on(
    demo_model, tmp_path, monkeypatch
):
    """Where an evaluation still runs out of memory beside the graphs' pool (the fit check ran
    before the optimizer had its state), the graphs go, the evaluation runs again, and training
    goes on eagerly with the same losses; the job page says why."""
    from worker import token_logps

    rows = _fixed_length_rows(tmp_path / "rows.jsonl", count=24)
    config = dict(eval_fraction=0.2, eval_every=2)
    eager, *_ = _train(demo_model, rows, tmp_path / "eager", False, **config)
    eager_evals = [r["eval_loss"] for r in _train.rows if r.get("eval_loss") is not None]
    recipes, mean_nll = [], token_logps.mean_nll

    def full_beside_the_graphs(model, batch):
        if recipes[0].layer_graphs is not None:
            raise torch.OutOfMemoryError("stand-in card is full")
        return mean_nll(model, batch)

    monkeypatch.setattr(token_logps, "mean_nll", full_beside_the_graphs)
    losses, replays, mode, _ = _train(
        demo_model, rows, tmp_path / "run", True, recipes.append, **config
    )
    evals = [r["eval_loss"] for r in _train.rows if r.get("eval_loss") is not None]
    assert replays == (2 * 2 - 1) * LAYERS  # the first two steps, then eager
    assert losses == pytest.approx(eager, rel=1e-5) and len(losses) == 4
    assert evals == pytest.approx(eager_evals, rel=1e-5) and len(evals) == 2
    assert "replayed as CUDA graphs" not in mode
    assert "CUDA graphs off (an evaluation ran out of memory beside their pool)" in mode


GIB = 2**30


def _near_the_limit(
    policy: str, kept: int, graphed_s: float, trials: list, timed: list, on_gib: float = 4.0
):
    """A stand-in card where `auto` chose `policy` with its step 0.1 GiB under the limit: the
    eager step peaks at 4 GiB plus 0.5 a kept layer (`on_gib` with every layer checkpointed),
    the graphs' pool adds 0.3 GiB; a timed step takes 0.3 s eager and `graphed_s` replayed.
    Under "partial" `auto`'s bisection measured a kept layer's 0.5 GiB and every layer
    checkpointed; under "off" nothing has yet."""
    from worker.training import memory_policy

    def choose(recipe) -> None:
        recipe.trial_limit = (4.1 + 0.5 * kept) * GIB
        per_layer = 0.5 * GIB if policy == "partial" else None
        peak_on = int(on_gib * GIB) if policy == "partial" else None
        recipe.policy_trial = memory_policy.PolicyTrial(
            int((4.0 + 0.5 * kept) * GIB), per_layer, peak_on
        )
        memory_policy.set_policy(recipe, policy, kept)
        recipe.memory_policy_reason = f"stand-in: {kept} of {LAYERS} layers kept"
        recipe.control.update(
            memory_policy=policy, memory_policy_reason=recipe.memory_policy_reason
        )

        def graphed() -> bool:
            return recipe.layer_graphs is not None and bool(recipe.layer_graphs.captured)

        def kept_now() -> int:
            return LAYERS if recipe.memory_policy == "off" else recipe.kept_layers

        def trial_step(batch) -> int:
            recipe.forward_backward(batch)
            recipe.model.zero_grad(set_to_none=True)
            trials.append(kept_now())
            eager = 4.0 + 0.5 * kept_now() if kept_now() else on_gib
            return int((eager + 0.3 * graphed()) * GIB)

        def timed_step(batch) -> float:
            for _ in range(2):
                recipe.forward_backward(batch)
                recipe.model.zero_grad(set_to_none=True)
            replayed = graphed() and recipe.layer_graphs.enabled
            timed.append((kept_now(), replayed))
            return graphed_s if replayed else 0.3

        recipe._trial_step, recipe._timed_step = trial_step, timed_step

    return choose


@pytest.mark.parametrize("graphed_s", [0.2, 0.303, 0.33], ids=["faster", "as-fast", "slower"])
def test_graphs_take_a_kept_layers_room_unless_a_timed_step_says_they_are_slower(
    demo_model, tmp_path, monkeypatch, graphed_s
):
    """`auto` kept 3 of the 4 layers' activations with its step 0.1 GiB under the limit: the
    graphs' pool fits only with one layer more checkpointed. A timed eager step, then the graphs'
    two trial steps with 2 layers kept and a timed replay: the graphs stay unless measurably
    slower (a timed step leaves out the optimizer's host work, which replays overlap), and the
    job page says so. The same losses either way."""
    from worker.training import memory_policy

    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    eager, _, _, _ = _train(demo_model, rows, tmp_path / "eager", emulate=False)
    trials, timed, recipes = [], [], []
    monkeypatch.setattr(
        memory_policy, "choose", _near_the_limit("partial", 3, graphed_s, trials, timed)
    )
    losses, replays, mode, _ = _train(
        demo_model, rows, tmp_path / "run", emulate=True, stand_in=recipes.append
    )
    recipe, reason = recipes[0], _train.fields["memory_policy_reason"]
    assert trials == [2, 2]  # recorded, then captured and replayed, with a layer more checkpointed
    assert timed == [(3, False), (2, True)]
    assert losses == pytest.approx(eager, rel=1e-5)
    if graphed_s < 0.33:
        assert recipe.memory_policy == "partial" and recipe.kept_layers == 2
        assert replays == (2 + 1 + 4 * 2) * LAYERS  # the trial, both timed steps, every pass
        assert "decoder layers replayed as CUDA graphs" in mode
        assert reason == (
            f"stand-in: 3 of {LAYERS} layers kept; 1 layer more checkpointed to make room for the "
            f"layers' CUDA graphs ({graphed_s:.3f} s a step against 0.300 s without them)"
        )
    else:
        assert recipe.memory_policy == "partial" and recipe.kept_layers == 3
        assert replays == 0 and "replayed as CUDA graphs" not in mode  # ungraphed at setup
        assert (
            "CUDA graphs off (they fit with 1 layer more checkpointed: 0.330 s a step "
            "against 0.300 s)" in mode
        )
        assert reason == f"stand-in: 3 of {LAYERS} layers kept"


@pytest.mark.parametrize("on_gib", [4.0, 4.4], ids=["fits", "does-not-fit"])
def test_graphs_that_need_every_layer_checkpointed_are_tried_only_where_that_step_has_room(
    demo_model, tmp_path, monkeypatch, on_gib
):
    """`auto` kept 1 layer: the graphs' pool needs it checkpointed too, and the step with every
    layer checkpointed was measured by `auto` (no line through the kept layers guesses it). Where
    that step plus the pool's share is over the limit, no trial steps and no timed steps (the 8B
    at 7.5 GiB spent 5 s of its start on a capture that could not fit); else the trade is tried."""
    from worker.training import memory_policy

    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    trials, timed, recipes = [], [], []
    monkeypatch.setattr(
        memory_policy, "choose", _near_the_limit("partial", 1, 0.2, trials, timed, on_gib)
    )
    _, replays, mode, _ = _train(
        demo_model, rows, tmp_path / "run", emulate=True, stand_in=recipes.append
    )
    recipe = recipes[0]
    if on_gib == 4.0:  # 4.3 GiB with the pool, under the 4.6
        assert trials == [0, 0] and timed == [(1, False), (0, True)]
        assert recipe.memory_policy == "on" and replays > 0
        assert "decoder layers replayed as CUDA graphs" in mode
    else:  # 4.4 x 1.075 = 4.73 GiB: over
        assert trials == [] and timed == []
        assert recipe.memory_policy == "partial" and recipe.kept_layers == 1 and replays == 0
        assert "CUDA graphs off (with them a step on the longest micro-batch would need" in mode


def test_a_card_that_keeps_every_layer_checkpoints_one_to_make_room_for_the_graphs(
    demo_model, tmp_path, monkeypatch
):
    """`auto` kept every layer's activations with its step 0.1 GiB under the limit: one eager
    trial step with every layer checkpointed measures what a kept layer takes, then the graphs
    replace one kept layer where a timed step says they pay (1B at 11 GiB trained eagerly for
    want of their pool's 0.1 GiB: 1.12x Unsloth, 1.37x with graphs at 14.5 GiB)."""
    from worker.training import memory_policy

    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    trials, timed, recipes = [], [], []
    monkeypatch.setattr(memory_policy, "choose", _near_the_limit("off", LAYERS, 0.2, trials, timed))
    _, replays, mode, _ = _train(
        demo_model, rows, tmp_path / "run", emulate=True, stand_in=recipes.append
    )
    recipe, reason = recipes[0], _train.fields["memory_policy_reason"]
    assert trials == [0, LAYERS - 1, LAYERS - 1]  # every layer checkpointed, then the graphs'
    assert timed == [(LAYERS, False), (LAYERS - 1, True)]
    assert recipe.memory_policy == "partial" and recipe.kept_layers == LAYERS - 1
    assert "decoder layers replayed as CUDA graphs" in mode and replays > 0
    assert reason.endswith(
        "; 1 layer checkpointed to make room for the layers' CUDA graphs (0.200 s a step "
        "against 0.300 s without them)"
    )


def test_no_trial_for_graphs_where_the_step_leaves_no_room_for_their_pool(
    demo_model, tmp_path, monkeypatch
):
    """Every layer checkpointed, the step 0.1 GiB under the limit: the graphs' pool cannot fit
    and no kept layer can make room, so no trial step runs for them (the job starts sooner)."""
    from worker.training import memory_policy

    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    trials, timed = [], []
    monkeypatch.setattr(memory_policy, "choose", _near_the_limit("on", 0, 0.2, trials, timed))
    _, replays, mode, _ = _train(demo_model, rows, tmp_path / "run", emulate=True)
    assert trials == timed == [] and replays == 0
    assert (
        "CUDA graphs off (with them a step on the longest micro-batch would need about 4.3 GiB "
        "(their pool on a 4.0 GiB step), over the 4.1 GiB a step may use)"
    ) in mode


def test_a_run_whose_capture_fails_trains_eagerly_and_says_why(demo_model, tmp_path, monkeypatch):
    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    eager, *_ = _train(demo_model, rows, tmp_path / "eager", emulate=False)
    monkeypatch.setattr(layer_graphs._LayerGraph, "capture_forward", _broken_capture)
    losses, replays, mode, _ = _train(demo_model, rows, tmp_path / "broken", emulate=True)
    assert replays == 0 and losses == pytest.approx(eager, rel=1e-5)
    assert "replayed as CUDA graphs" not in mode
    assert "CUDA graphs off (their capture failed: RuntimeError: operation not permitted" in mode


def test_variable_length_packed_data_is_padded_to_one_shape_and_trains_the_same(
    demo_model, demo_rows, tmp_path
):
    """The demo's conversations, packed: every micro-batch padded to the fullest one's shape
    (worker.batch_shape), so the layers replay; the losses are the unpadded eager run's, and the
    tokens the job counts are the real ones, not the padding."""
    eager, none, mode, one_shape = _train(demo_model, demo_rows, tmp_path / "eager", False)
    eager_tokens = _train.tokens
    assert one_shape and none == 0 and "CUDA graphs" not in mode
    graphed, replays, mode, _ = _train(demo_model, demo_rows, tmp_path / "graphed", True)
    assert "decoder layers replayed as CUDA graphs" in mode
    assert replays == (4 * 2 - 1) * LAYERS
    assert graphed == pytest.approx(eager, rel=1e-5)
    assert _train.tokens == eager_tokens > 0


def test_unpacked_variable_length_data_and_dropout_keep_the_eager_path(
    demo_model, demo_rows, tmp_path
):
    _, replays, mode, one_shape = _train(
        demo_model, demo_rows, tmp_path / "unpacked", True, packing=False
    )
    assert not one_shape and replays == 0 and "CUDA graphs" not in mode
    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    _, replays, mode, _ = _train(demo_model, rows, tmp_path / "dropout", True, lora_dropout=0.1)
    assert replays == 0 and "CUDA graphs" not in mode


def test_the_setting_turns_graphs_off(demo_model, tmp_path, monkeypatch):
    """TUNEBOARD_CUDA_GRAPHS=false: the worker's job runner sets the switch from it."""
    from app.settings import Settings

    monkeypatch.setenv("TUNEBOARD_CUDA_GRAPHS", "false")
    monkeypatch.setattr(layer_graphs, "ENABLED", Settings().cuda_graphs)
    rows = _fixed_length_rows(tmp_path / "rows.jsonl")
    _, replays, mode, one_shape = _train(demo_model, rows, tmp_path / "off", True)
    assert one_shape and replays == 0 and "CUDA graphs" not in mode
