"""Where a training step's time goes under each memory policy: the product's recipe (the code the
worker runs) on the benchmark's model, one forward + backward per step, timed and then profiled
with torch.profiler. Issue 9's open question is why a checkpointed 8B layer costs more than a
whole layer without checkpointing; the tables say which operators grow.

    python bench/profile_step.py --shape 8b --policies off,on,offload --out $OUT   # GPU machine
    python bench/profile_step.py --shape smoke --policies off,on                   # CPU: checks it

A policy may name a variant after a colon, to try a change before it goes into the recipe:
`on:nonreentrant` (the non-reentrant kind the recipe used before), `on:norng` (non-reentrant
without RNG stashing or the determinism check), `off:compiled` / `on:compiled` (each decoder
layer under torch.compile), `off:unfused` / `on:unfused` (peft's own path through the MLPs, as
before worker/fused_mlp.py), `off:fusedinside` (the fused MLP with its forward pass inside the
autograd function, session 5's form A), `off:unfusedattn` / `on:unfusedattn` (peft's own path
through the attention projections, as before worker/fused_attention.py), `on:bnbdequant`
(bitsandbytes' own three-kernel dequantisation instead of worker/nf4.py's one), `on:recomputedown`
(a checkpointed layer's recompute computes the MLP's down product too, as before session 11),
`off:nocastcache` (each LoRA weight cast to the compute dtype at every read, as before session 11),
`off:graphed` / `on:graphed` (the decoder layers replayed as CUDA graphs, worker/layer_graphs.py;
CUDA only), `on:hostembed` (the input embeddings in pinned host memory, worker/host_embeddings.py,
as `auto` does where the card must checkpoint; it stays for the rows after it, so
`on,on:graphed,on:hostembed,on:graphed` measures both with and without), `off:flatabsmax` (each
4-bit weight's block scales kept dequantised: one kernel per dequantisation instead of three, for
about 330 MB at 8B; it stays for the rows after it: list `off:flatabsmax,on:flatabsmax` last;
CUDA 4-bit only), `off:denseattn` (transformers' own attention over the packed row's dense mask,
`eager` for Gemma-2 as before session 18's worker/softcap_attention.py, `sdpa` for the others,
instead of worker/attention.py's per-example path). The loss and LoRA gradient norm of one step
on the same batch are printed per policy: a variant must not change them. The step's CPU time
(all threads) beside its wall time says whether the GPU waits for the CPU.

Writes profile-<shape>.md (step times, the per-layer cost of recompute, each policy's top
operators by self device time and by self CPU time) to --out, and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path

import worker  # noqa: F401  (the GPU-process settings, before CUDA starts, as in the worker)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as bench  # the benchmark's shapes, data and recipe setup


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8b", choices=sorted(bench.SHAPES))
    p.add_argument("--policies", default="off,on,offload", help="memory policies, comma list")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; smoke 128)")
    p.add_argument("--timed", type=int, default=5, help="timed steps per policy")
    p.add_argument("--rows", type=int, default=20, help="operators per table")
    p.add_argument("--tables", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache", type=Path, default=Path("/tmp/tuneboard-bench-cache"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = p.parse_args(argv)
    import torch

    from worker.layer_graphs import graphs_of

    cuda = torch.cuda.is_available()
    smoke = args.shape == "smoke"
    seq = args.seq or (128 if smoke else 2048)
    shape = bench.SHAPES[args.shape]
    model_path = bench.build_model_dir(args.shape, args.cache, args.seed)
    examples = bench.make_examples("fixed", shape["batch"] * 2, seq, shape["vocab_size"], args.seed)
    policies = args.policies.split(",")
    recipe, _, _ = bench.tuneboard_recipe(
        model_path,
        args.out / "profile.run",
        examples,
        seq=seq,
        batch=shape["batch"],
        steps=1,
        checkpointing=policies[0].partition(":")[0],
        seed=args.seed,
        quantize=cuda and not smoke,
    )
    recipe.setup()
    batch = recipe._longest_batch()
    layers = len(recipe._decoder_layers())
    tokens = int(batch["input_ids"].numel())
    lines = [
        f"# Profile: {shape['label']}, {tokens} tokens a step, {layers} layers, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if cuda else 'CPU'}, torch {torch.__version__}",
        "",
        "| policy | step ms (median of timed) | CPU ms a step (all threads) | peak alloc GiB "
        "| peak reserved GiB | loss | LoRA grad norm |",
        "|---|---|---|---|---|---|---|",
    ]
    tables: list[str] = []
    times: dict[str, float] = {}
    try:
        for policy in policies:
            try:
                set_policy(recipe, policy)
            except Exception as error:  # a variant this stack cannot do: say so, go on
                lines.append(f"| {policy} | failed: {type(error).__name__}: {error} | | | | | |")
                continue

            def step() -> None:
                recipe.forward_backward(batch)
                recipe.model.zero_grad(set_to_none=True)

            try:
                for _ in range(2):  # warm-up: kernels chosen, allocator filled, graphs compiled
                    step()
            except Exception as error:
                lines.append(f"| {policy} | failed: {type(error).__name__}: {error} | | | | | |")
                recipe.model.zero_grad(set_to_none=True)
                continue
            graphs = graphs_of(recipe._decoder_layers())
            if graphs is not None and graphs.failure:
                lines.append(f"| {policy} | capture failed: {graphs.failure} | | | | | |")
                continue
            loss, norm = check_step(recipe, batch)  # the same batch: every row should agree
            if cuda:  # the reserved peak: this row's, not the cache an earlier row left
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            samples, cpu = [], 0.0
            for _ in range(args.timed):
                bench.sync(recipe.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                bench.sync(recipe.device)
                samples.append(time.perf_counter() - start)
                cpu += time.process_time() - cpu_start
            times[policy] = sorted(samples)[len(samples) // 2]
            peak = torch.cuda.max_memory_allocated() / bench.GIB if cuda else float("nan")
            # A CUDA graph's pool is reserved, not allocated, between its replays.
            reserved = torch.cuda.max_memory_reserved() / bench.GIB if cuda else float("nan")
            lines.append(
                f"| {policy} | {times[policy] * 1000:.1f} | {cpu / args.timed * 1000:.1f} "
                f"| {peak:.2f} | {reserved:.2f} | {loss:.4f} | {norm:.4f} |"
            )
            if args.tables:
                tables += profile_tables(torch, step, policy, cuda, args.rows)
    finally:
        recipe.cleanup()
    if "off" in times:
        for policy in times:
            if policy != "off":
                extra = (times[policy] - times["off"]) / layers * 1000
                lines.append(
                    f"\n{policy}: {extra:.2f} ms more per layer than off; a whole layer without "
                    f"checkpointing is {times['off'] / layers * 1000:.2f} ms (step / layers)."
                )
    text = "\n".join([*lines, "", *tables]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile-{args.shape}.md").write_text(text)
    print(text, flush=True)


def check_step(recipe, batch) -> tuple[float, float]:
    """One step's loss and the norm of every LoRA gradient (a variant must not change them)."""
    import torch

    loss = recipe.forward_backward(batch).item()
    grads = [p.grad.float() for p in recipe.model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    recipe.model.zero_grad(set_to_none=True)
    return loss, norm.item()


# Variants set above by a switch or by what is fused, not by a change after the policy.
VARIANTS_OF_THE_RECIPE = {
    "unfused", "fusedinside", "unfusedattn", "bnbdequant", "recomputedown", "nocastcache",
    "denseattn",
}  # fmt: skip


def set_policy(recipe, spec: str) -> None:
    """A memory policy as the recipe sets it, then the variant after the colon, if any."""
    import torch

    from worker import attention, fused_mlp, lora_projection, nf4
    from worker.fused_attention import fuse_attention, unfuse_attention
    from worker.fused_mlp import fuse_mlps, unfuse_mlps
    from worker.host_embeddings import move_to_host
    from worker.layer_graphs import graph_layers, ungraph_layers

    policy, _, variant = spec.partition(":")
    nf4.FUSED = variant != "bnbdequant"  # bitsandbytes' three-kernel dequantisation
    fused_mlp.SKIP_UNREAD_OUTPUT = variant != "recomputedown"  # the down product in recomputes
    lora_projection.CACHE_CASTS = variant != "nocastcache"  # each LoRA weight cast at every read
    recipe._set_memory_policy("off")  # untiled, so that the MLPs' forwards can be swapped
    unfuse_mlps(recipe.model)
    if variant == "unfusedattn":  # peft's path through the attention projections
        unfuse_attention(recipe.model)
    else:
        fuse_attention(recipe.model)
    if variant == "fusedinside":  # form A: the forward pass inside the autograd function
        if not fuse_mlps(recipe.model, forward_inside=True):
            raise ValueError("no fused MLP to run in form A")
    elif variant != "unfused":
        fuse_mlps(recipe.model)  # as the recipe does
    recipe._set_memory_policy(policy)
    base = recipe.model.get_base_model()
    dense = attention.dense_implementation(base.config)  # the packed row's dense mask
    base.set_attn_implementation(dense if variant == "denseattn" else attention.register())
    layers = recipe._decoder_layers()
    ungraph_layers(layers)
    for layer in layers:  # undo an earlier variant's compile
        layer._compiled_call_impl = None
    if variant == "nonreentrant":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif variant == "norng":
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={
                "use_reentrant": False,
                "preserve_rng_state": False,
                "determinism_check": "none",
            }
        )
    elif variant == "compiled":
        torch._dynamo.config.cache_size_limit = 64
        for layer in layers:
            layer.compile()
    elif variant == "graphed":  # the layers replayed as CUDA graphs (worker/layer_graphs.py)
        if graph_layers(layers) is None:
            raise ValueError("CUDA graphs need the model on a CUDA GPU")
    elif variant == "hostembed":  # lasts: the input embeddings in host memory for later rows
        if not move_to_host(recipe.model):
            raise ValueError("the input embeddings cannot move (tied, or already moved)")
    elif variant == "flatabsmax":  # lasts: later rows keep it (list it last)
        if not flatten_absmax(recipe.model):
            raise ValueError("no 4-bit weights to flatten (a 4-bit model on CUDA only)")
    elif variant in VARIANTS_OF_THE_RECIPE:
        pass
    elif variant:
        raise ValueError(f"unknown variant {variant!r}")


def flatten_absmax(model) -> int:
    """Undo bitsandbytes' double quantisation after loading: each 4-bit weight keeps its block
    scales (absmax) dequantised, in float32, so a dequantisation is one kernel, not three (the
    nested absmax's dequantisation, the offset's add, the weight's). Costs 3 bytes per 64 weights
    (about 330 MB at 8B). Returns how many 4-bit weights the model has (each flat now)."""
    import bitsandbytes.functional as bnb_functional

    count = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        if state.nested:
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
            state.absmax = (absmax + state.offset).float()
            state.state2, state.offset, state.nested = None, None, False
        count += 1
    return count


def profile_tables(torch, step, policy: str, cuda: bool, rows: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    out = []
    sorts = (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]
    for sort in sorts:
        with contextlib.suppress(Exception):  # a sort key this torch's profiler lacks
            table = averages.table(sort_by=sort, row_limit=rows, max_name_column_width=60)
            out += [f"## {policy}: top operators by {sort} (2 steps)", "", "```", table, "```", ""]
    return out


if __name__ == "__main__":
    main()
