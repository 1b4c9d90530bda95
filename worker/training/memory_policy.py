"""The memory policy: how much of a step's activations the card keeps.

"off" keeps everything (fastest); "partial" checkpoints all but the last `kept` decoder layers;
"on" checkpoints every layer; "offload" also moves what a step saves outside the layers (their
inputs) to pinned host memory (worker.offload); "tiled" is "offload" with every MLP run a slice of
tokens at a time (worker.tiled_mlp), for sequences "offload" cannot fit. `auto` chooses by trial
forward+backward steps on the recipe's longest micro-batch, cheapest policy first. Where the card
cannot keep everything, an untied input embedding table goes to host memory first
(worker.host_embeddings: about 1 GiB at 7B/8B, which then keeps activations on the card).

The functions take the recipe (`LoRARecipe`): its model, device, config, control, its longest
batch and its `forward_backward`, so every training method gets the same policy. They reach the
trial step, the usable memory, the optimizer's state (its size, and memory held as much) and the
policy setter through the recipe's methods of those names, which a test may replace with a
stand-in card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from worker import host_embeddings
from worker.errors import OutOfMemory
from worker.offload import ActivationOffload
from worker.tiled_mlp import tile_mlps, untile_mlps

if TYPE_CHECKING:
    from worker.training.recipe import LoRARecipe

# A trial step must leave this share of the card free for optimizer state and fragmentation,
TRIAL_HEADROOM = 0.90
# and at least the optimizer's state itself beside this share for the allocator's slack: a LoRA of
# high rank keeps more state than the share above leaves (8B, rank 64: 1.24 GiB of AdamW state;
# 10% of a 7.5 GiB cap is 0.75). Slack measured: 1.8-2.6% of the cap (bench/RESULTS.md, session 20).
ALLOCATOR_SLACK = 0.05
GIB = 1024**3
# The decoder layers' CUDA graphs hold a memory pool of their own beside the step: measured +6.5%
# (1B) and +7.5% (8B) of the eager step's peak (bench/RESULTS.md, session 14); the larger, so a
# trade that cannot fit is not tried. A step closer to the limit than this cannot keep them
# unless checkpointing more layers makes room (graphs_overflow).
GRAPH_POOL_SHARE = 0.075
# Graphs that cost kept layers stay unless a timed step says they are slower by more than this: a
# timed step leaves out the optimizer's host work, which replayed layers overlap with the card's
# (1B at 11 GiB, session 16: timed 0.126 s against 0.127 s eager; trained 0.131 against 0.156).
GRAPHS_SLOWER_BY = 0.02


@dataclasses.dataclass
class PolicyTrial:
    """What `auto`'s trial steps measured for the policy it chose: the step's peak, the peak with
    every layer checkpointed and, under "partial", the memory one kept layer adds (the graphs'
    check trades kept layers for their pool)."""

    peak: int | None = None
    kept_layer_bytes: float | None = None
    peak_on: int | None = None


def choose(recipe: LoRARecipe) -> None:
    """Set the policy the job asked for, or the one `auto` measures, and say why on the job."""
    requested = str(recipe.config.gradient_checkpointing)
    kept = 0
    if requested == "offload" and recipe.device.type != "cuda":
        policy, reason = "on", "offload asked for, but a CPU run has no device memory to free"
    elif requested == "tiled" and recipe.distributed:
        policy, reason = "on", "tiled is for one GPU; FSDP checkpoints every layer"
    elif requested != "auto":
        policy, reason = requested, "set in the job config"
        if recipe.device.type == "cuda" and not recipe.distributed:
            set_trial_limit(recipe)  # for the graphs' check (graphs_overflow)
    elif recipe.device.type != "cuda":
        policy, reason = "off", "CPU run: activations live in host memory"
    elif recipe.distributed:
        # A trial step here would run the unsharded model on one GPU and measure the wrong
        # thing; checkpointing is the safe default for a model big enough to need FSDP.
        policy, reason = "on", f"FSDP over {recipe.world_size} GPUs: checkpointing by default"
    else:
        policy, reason, kept = measure(recipe)
    if policy in ("offload", "tiled"):  # set in the config: the most memory for activations
        embeddings_to_host(recipe)
    set_policy(recipe, policy, kept)
    recipe.memory_policy_reason = reason
    recipe.control.update(
        memory_policy=policy, memory_policy_reason=reason, compute_mode=recipe.compute_mode
    )


def set_policy(recipe: LoRARecipe, policy: str, kept_layers: int = 0) -> None:
    recipe.memory_policy = policy
    recipe.kept_layers = kept_layers if policy == "partial" else 0
    base = recipe.model.get_base_model()
    layers = decoder_layers(recipe.model)
    if policy == "tiled":
        tile_mlps(layers, recipe._tile_tokens())
    else:
        untile_mlps(layers)
    if policy == "off":
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
    elif hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.20
        base.activation_checkpointing_enable(checkpoint_kwargs(recipe.distributed))
    else:
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpoint_kwargs(recipe.distributed)
        )
    if policy == "partial":
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < len(layers) - kept_layers


def tile_tokens(model: Any) -> int:
    """MLP slices as long as the model is wide (ALST's choice): at 8B, 4,096 tokens, whose
    intermediates take about 0.7 GB."""
    return int(getattr(model.config, "hidden_size", 0) or 4096)


def checkpoint_kwargs(distributed: bool) -> dict[str, Any]:
    """Reentrant checkpointing on one GPU: a checkpointed layer's forward runs without autograd,
    and its backward reruns it and backpropagates through it as one piece. The non-reentrant kind
    runs Python hooks for every tensor each layer saves, twice, and the GPU waited for them
    (bench/RESULTS.md, session 4). FSDP keeps the non-reentrant kind, the one the 2-GPU test
    verifies. Transformers makes the embeddings' output want a gradient, as reentrant needs."""
    return {"use_reentrant": not distributed}


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers that checkpointing wraps (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model()
    return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def checkpointing_paused(model: Any) -> Any:
    """No checkpointing inside (a forward pass without gradients, e.g. a reference model's):
    nothing to recompute, and reentrant checkpointing would warn that no input wants a gradient."""
    layers = decoder_layers(model)
    states = [layer.gradient_checkpointing for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, state in zip(layers, states, strict=True):
            layer.gradient_checkpointing = state


def activation_offload(recipe: LoRARecipe) -> Any:
    """The context a forward pass runs in: what it saves for the backward pass goes to pinned
    host memory, or nothing happens."""
    if recipe.memory_policy not in ("offload", "tiled") or recipe.device.type != "cuda":
        return contextlib.nullcontext()
    if recipe.offload_stream is None:
        recipe.offload_stream = torch.cuda.Stream(recipe.device)
    return ActivationOffload(recipe.offload_stream)


def measure(recipe: LoRARecipe) -> tuple[str, str, int]:
    """Trial forward+backward steps on the longest micro-batch, cheapest policy first: no
    checkpointing; else, with the input embeddings in host memory where they can go, no
    checkpointing again if the GiB they free makes it fit, else checkpointing of as few layers
    as the card needs (the rest keep their activations); else every layer; else every layer
    offloaded to host memory; else that with the MLPs in slices."""
    batch = recipe._longest_batch()
    tokens = int(batch["input_ids"].numel())
    limit = set_trial_limit(recipe)

    def fits(how: str, peak: int, *, last_resort: bool = False) -> str:
        """The chosen policy's reason (its peak kept). A last resort's bound is the card itself,
        its trial step run beside the optimizer's state."""
        recipe.policy_trial.peak = peak
        of = (
            f"of the card's {recipe._usable_memory() / GIB:.1f} GiB"
            if last_resort
            else f"of {limit / GIB:.1f} GiB usable"
        )
        beside = ", beside the optimizer's state" if last_resort else ""
        return (
            f"a trial step on the longest micro-batch ({tokens} tokens) fits {how}{beside}: peak "
            f"{peak / GIB:.1f} GiB {of}"
        )

    peak_off = try_policy(recipe, batch, "off")
    if peak_off is not None and peak_off <= limit:
        return "off", fits("without checkpointing", peak_off), 0
    freed = embeddings_to_host(recipe)
    if freed and peak_off is not None:
        peak_off -= freed  # what "off" would take now (the guess for partial checkpointing)
        if peak_off <= limit:
            peak_off = try_policy(recipe, batch, "off")
            if peak_off is not None and peak_off <= limit:
                return "off", fits("without checkpointing", peak_off), 0
    peak_on = recipe.policy_trial.peak_on = try_policy(recipe, batch, "on")
    if peak_on is not None and peak_on <= limit:
        partial = most_layers_kept(recipe, batch, peak_on, peak_off, limit)
        if partial is None:
            return "on", fits("with checkpointing", peak_on), 0
        kept, peak = partial
        total = len(decoder_layers(recipe.model))
        how = (
            f"with {total - kept} of {total} layers checkpointed "
            f"(the other {kept} keep their activations: less recompute)"
        )
        return "partial", fits(how, peak), kept
    # The last resorts have no headroom to keep: one is taken where its trial step runs on the
    # card at all, so that step carries the optimizer's state, as every step after the first does
    # (without it, 8B at 7.5 GiB passed at 7.4 GiB with 0.3 GiB of state still to come:
    # bench/RESULTS.md, session 20).
    peak_offload = try_policy(recipe, batch, "offload", with_optimizer_state=True)
    if peak_offload is not None:
        how = "with activations offloaded to CPU memory"
        return "offload", fits(how, peak_offload, last_resort=True), 0
    peak_tiled = try_policy(recipe, batch, "tiled", with_optimizer_state=True)
    if peak_tiled is not None:
        how = "with activations offloaded and each MLP run in slices of tokens"
        return "tiled", fits(how, peak_tiled, last_resort=True), 0
    state = recipe._optimizer_state_bytes()
    raise OutOfMemory(
        step=0,
        micro_batch_size=recipe.config.micro_batch_size,
        seq_len=tokens,
        detail="Even offloaded checkpointing with sliced MLPs does not fit one micro-batch "
        f"beside the optimizer's state ({state / GIB:.2f} GiB).",
    )


def set_trial_limit(recipe: LoRARecipe) -> float:
    """What a trial step may peak at on this card: the rest holds the optimizer's state (made at
    the end of the first step) and the allocator's slack."""
    usable = recipe._usable_memory()
    beside_the_state = (1 - ALLOCATOR_SLACK) * usable - recipe._optimizer_state_bytes()
    recipe.trial_limit = min(TRIAL_HEADROOM * usable, beside_the_state)
    return recipe.trial_limit


def graphs_overflow(recipe: LoRARecipe) -> str | None:
    """With the decoder layers graphed (worker.layer_graphs), two trial steps on the longest
    micro-batch, padded to the run's one shape: the first records, the second captures and
    replays (the first training step then replays). A graph's memory pool comes on top of the
    eager step the policy was measured on: None where the peak stays within what a trial step
    may use on this card, else why the graphs must go. Where `auto`'s step is already within the
    pool's share of the limit, no trial: under "off" or "partial", checkpointing layers may make
    room, and a timed step each way decides (graphs_with_fewer_kept); else the graphs go.
    Nothing to check without a card."""
    limit = recipe.trial_limit
    if limit is None:
        return None
    batch = recipe._longest_batch()
    eager_peak = recipe.policy_trial.peak
    if eager_peak is not None and (need := eager_peak * (1 + GRAPH_POOL_SHARE)) > limit:
        kept = kept_for_graphs(recipe, batch, need - limit)
        if kept is not None:
            return graphs_with_fewer_kept(recipe, batch, kept)
        return (
            f"with them a step on the longest micro-batch would need about {need / GIB:.1f} GiB "
            f"(their pool on a {eager_peak / GIB:.1f} GiB step), over the {limit / GIB:.1f} GiB "
            "a step may use"
        )
    peak = graphed_peak(recipe, batch)
    if peak is not None and peak <= limit:
        return None
    return (
        f"with them a step or an evaluation on the longest micro-batch would {_peak_at(peak)}, "
        f"over the {limit / GIB:.1f} GiB a step may use"
    )


def graphed_peak(recipe: LoRARecipe, batch: dict[str, torch.Tensor]) -> int | None:
    """The peak of the graphs' two trial steps (record, then capture and replay), or None; where
    the job evaluates, also of an evaluation's forward pass beside their pool. An evaluation runs
    the layers eagerly, on memory of its own while the pool stays held: a job on a small card
    whose steps fit ran out of memory in its evaluation (bench/RESULTS.md, session 16)."""
    peak = peak_or_none(recipe, batch)  # records
    if peak is not None:
        peak = peak_or_none(recipe, batch)  # captures and replays
    if peak is not None and recipe.eval_batches:
        evaluation = peak_or_none(recipe, batch, recipe._evaluation_step)
        peak = None if evaluation is None else max(peak, evaluation)
    return peak


def _peak_at(peak: int | None) -> str:
    return "run out of memory" if peak is None else f"peak at {peak / GIB:.1f} GiB"


def kept_for_graphs(
    recipe: LoRARecipe, batch: dict[str, torch.Tensor], excess: float
) -> int | None:
    """Under "off" or "partial", how many layers may keep their activations with `excess` bytes
    given to the graphs' pool, by the memory a kept layer adds; None where none can be spared.
    `auto`'s bisection measured that under "partial"; under "off", one eager trial step with
    every layer checkpointed measures it here."""
    policy, trial = recipe.memory_policy, recipe.policy_trial
    if policy not in ("off", "partial"):
        return None
    total = len(recipe._decoder_layers())
    if policy == "off" and trial.kept_layer_bytes is None and trial.peak is not None and total:
        assert recipe.layer_graphs is not None
        recipe.layer_graphs.enabled = False  # an eager step, not recorded
        trial.peak_on = try_policy(recipe, batch, "on")
        recipe.layer_graphs.enabled = True
        set_policy(recipe, "off")
        if trial.peak_on is not None:
            trial.kept_layer_bytes = max(1.0, (trial.peak - trial.peak_on) / total)
    if not trial.kept_layer_bytes:
        return None
    kept_now = total if policy == "off" else recipe.kept_layers
    kept = kept_now - math.ceil(excess / trial.kept_layer_bytes)
    if kept == 0 and trial.peak_on is not None:  # every layer checkpointed: measured, no guess
        assert recipe.trial_limit is not None
        if trial.peak_on * (1 + GRAPH_POOL_SHARE) > recipe.trial_limit:
            return None
    return kept if kept >= 0 else None


def graphs_with_fewer_kept(
    recipe: LoRARecipe, batch: dict[str, torch.Tensor], kept: int
) -> str | None:
    """Graphs in place of some kept layers: a timed eager step under the policy `auto` chose,
    then the graphs' trial steps with `kept` layers kept (0: every layer checkpointed) and a
    timed replay. The graphs stay unless measurably slower (GRAPHS_SLOWER_BY); the job page says
    which and why. None where the graphs stay."""
    graphs, limit = recipe.layer_graphs, recipe.trial_limit
    assert graphs is not None and limit is not None
    policy, before = recipe.memory_policy, recipe.kept_layers
    kept_before = before if policy == "partial" else len(recipe._decoder_layers())
    graphs.enabled = False  # the eager step, not recorded
    eager_s = recipe._timed_step(batch)
    graphs.enabled = True
    set_policy(recipe, "partial" if kept else "on", kept)
    peak = graphed_peak(recipe, batch)
    more = "more " if policy == "partial" else ""
    spared = f"{kept_before - kept} layer{'s' * (kept_before - kept > 1)} {more}checkpointed"
    if peak is None or peak > limit or graphs.failure is not None:
        set_policy(recipe, policy, before)
        return (
            f"with them and {spared}, a step or an evaluation on the longest micro-batch would "
            f"{_peak_at(peak)}, over the {limit / GIB:.1f} GiB a step may use"
        )
    graphed_s = recipe._timed_step(batch)
    timed = f"{graphed_s:.3f} s a step against {eager_s:.3f} s"
    if graphed_s > eager_s * (1 + GRAPHS_SLOWER_BY):
        set_policy(recipe, policy, before)
        return f"they fit with {spared}: {timed}"
    recipe.memory_policy_reason += (
        f"; {spared} to make room for the layers' CUDA graphs ({timed} without them)"
    )
    recipe.control.update(
        memory_policy=recipe.memory_policy, memory_policy_reason=recipe.memory_policy_reason
    )
    return None


def embeddings_to_host(recipe: LoRARecipe) -> int:
    """Where the card must checkpoint, an untied input embedding table goes to host memory first
    (worker.host_embeddings): its GiB then keeps activations on the card. Returns the bytes freed;
    the job page's compute mode says so."""
    if recipe.distributed or recipe.device.type != "cuda":
        return 0
    freed = host_embeddings.move_to_host(recipe.model)
    if freed:
        amount = f"{freed / GIB:.2f} GiB" if freed >= GIB / 10 else f"{freed / 2**20:.0f} MiB"
        recipe.compute_mode += f", input embeddings in host memory ({amount} freed)"
        free_cuda()
    return freed


def most_layers_kept(
    recipe: LoRARecipe,
    batch: dict[str, torch.Tensor],
    peak_on: int,
    peak_off: int | None,
    limit: float,
) -> tuple[int, int] | None:
    """The most layers that can keep their activations (the rest are checkpointed) with a trial
    step within `limit`, and that step's peak: each layer kept is recompute saved. A kept layer
    adds about as much memory as the next, so the next count to try comes from the peaks
    measured: between the most layers that fitted and the fewest that did not, where the line
    through their peaks crosses the limit (from "off"'s peak, or from one kept layer's where
    "off" ran out of memory); halfway after a trial that ran out of memory (no peak). Where the
    line holds that is two trials: the count, then one more, which does not fit."""
    total = len(decoder_layers(recipe.model))
    if total < 2:
        return None
    good, good_peak = 0, peak_on  # none kept is "on", which fits
    bad, bad_peak = total, peak_off  # all kept is "off", which does not
    if peak_off is None:  # "off" ran out of memory: start from one kept layer
        peak = try_policy(recipe, batch, "partial", 1)
        if peak is None:
            return None
        if peak > limit:
            bad, bad_peak = 1, peak
        else:
            good, good_peak, bad_peak = 1, peak, None
    ran_out = False
    for _ in range(6):
        if bad - good <= 1:
            break
        if bad_peak is not None:  # the line between the two ends
            guess = good + int((limit - good_peak) * (bad - good) / (bad_peak - good_peak))
        elif ran_out:
            guess = (good + bad) // 2
        else:  # the line from every layer checkpointed through the most that fitted
            guess = int((limit - peak_on) * good / max(1, good_peak - peak_on))
        count = min(max(guess, good + 1), bad - 1)
        peak = try_policy(recipe, batch, "partial", count)
        ran_out = peak is None
        if peak is not None and peak <= limit:
            good, good_peak = count, peak
        else:
            bad, bad_peak = count, peak
    for count, peak in ((good, good_peak), (bad, bad_peak)):  # the graphs' trade reads it
        if count and peak is not None:
            recipe.policy_trial.kept_layer_bytes = max(1.0, (peak - peak_on) / count)
            break
    return (good, good_peak) if good else None


def try_policy(
    recipe: LoRARecipe,
    batch: dict[str, torch.Tensor],
    policy: str,
    kept: int = 0,
    *,
    with_optimizer_state: bool = False,
) -> int | None:
    """Peak memory of one trial step under a policy, or None when it ran out of memory; with
    `with_optimizer_state`, the step runs beside as much memory as the optimizer's state will
    take from the first step on (counted in the peak)."""
    recipe._set_memory_policy(policy, kept)
    recipe.start_timing.trial_steps += 1  # the job page's start timing counts them
    if not with_optimizer_state:
        return peak_or_none(recipe, batch)

    def step_beside_the_state(batch: dict[str, torch.Tensor]) -> int:
        with recipe._optimizer_state_held():
            return recipe._trial_step(batch)

    return peak_or_none(recipe, batch, step_beside_the_state)


def optimizer_state_bytes(model: Any) -> int:
    """What AdamW keeps from its first step on: two moments per trainable weight, each in the
    weight's dtype (the LoRA weights are fp32: 0.31 GiB at 8B, rank 16 on every projection)."""
    return sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def optimizer_state_held(recipe: LoRARecipe) -> Any:
    """As much memory as the optimizer's state, taken on the recipe's device while inside."""
    held = torch.empty(recipe._optimizer_state_bytes(), dtype=torch.uint8, device=recipe.device)
    try:
        yield
    finally:
        del held


def peak_or_none(
    recipe: LoRARecipe, batch: dict[str, torch.Tensor], step: Any = None
) -> int | None:
    """Peak memory of one trial step (or of `step`, e.g. an evaluation's), or None when it ran
    out of memory."""
    try:
        return (step or recipe._trial_step)(batch)
    except torch.OutOfMemoryError:
        recipe.model.zero_grad(set_to_none=True)
        free_cuda()
        return None


def trial_step(recipe: LoRARecipe, batch: dict[str, torch.Tensor]) -> int:
    free_cuda()
    torch.cuda.reset_peak_memory_stats(recipe.device)
    recipe.forward_backward(batch)
    peak = torch.cuda.max_memory_allocated(recipe.device)
    recipe.model.zero_grad(set_to_none=True)
    free_cuda()
    return peak


def evaluation_step(recipe: LoRARecipe, batch: dict[str, torch.Tensor]) -> int:
    """Peak memory of an evaluation's forward pass on `batch`: the model in eval mode, no
    gradients, bf16 autocast, the recipe's own loss."""
    free_cuda()
    torch.cuda.reset_peak_memory_stats(recipe.device)
    recipe.model.eval()
    try:
        with torch.no_grad(), torch.autocast(recipe.device.type, torch.bfloat16):
            recipe.batch_loss(recipe.model, batch)
    finally:
        recipe.model.train()
    peak = torch.cuda.max_memory_allocated(recipe.device)
    free_cuda()
    return peak


def timed_step(recipe: LoRARecipe, batch: dict[str, torch.Tensor]) -> float:
    """Seconds of one forward+backward step on the card, after an untimed one (the allocator's
    blocks back in its cache; graphs captured)."""
    recipe.forward_backward(batch)
    recipe.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(recipe.device)
    start = time.perf_counter()
    recipe.forward_backward(batch)
    torch.cuda.synchronize(recipe.device)
    seconds = time.perf_counter() - start
    recipe.model.zero_grad(set_to_none=True)
    free_cuda()
    return seconds


def usable_memory(device: torch.device) -> int:
    """The card's memory, or the share this process is capped at (a small card's stand-in)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    try:
        fraction = torch.cuda.get_per_process_memory_fraction(index)
    except (AttributeError, RuntimeError, ValueError):  # an older torch without the getter
        fraction = 1.0
    return int(total * min(1.0, fraction))


@contextlib.contextmanager
def objects_frozen() -> Any:
    """Inside, garbage collection walks only the objects made since (gc.freeze): each trial step
    frees the card's memory with a full collection (free_cuda), which otherwise walks every
    object the libraries and the model made, half a million of them, about 0.3 s a walk on this
    project's dev machine, and a start takes a dozen or more. Collected once first, so no garbage
    from before is set aside with them."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
