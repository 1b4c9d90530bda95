"""The consumer ladder (issue 24): each model family at the memory of the cards people own, with
the standard recipe, Unsloth and Tuneboard side by side, one JSON result per cell.

A cell is (shape, data, cap, arm): one arm in its own process under a memory cap, through
bench/train.py's `launch` (same models, data, arms and timing as the throughput table). An arm
that runs out of memory gets a quick search for the longest single sequence (batch 1) that trains
two steps (the second with the optimizer's state) under the same cap: halving from --seq, at most
--fit-probes probes, the last of them a bisection between the longest that fitted and the
shortest that did not. The table says "does not fit" with that length.

    python bench/ladder.py --shapes qwen7b,gemma9b --caps 7.5,11 --arms unsloth,tuneboard
    python bench/ladder_table.py bench/out/ladder-*.json    # the tables for RESULTS.md, merged

`bash bench/gpu.sh ladder-first` (and `ladder-<cap>`) is the device command; bench/README.md says
which stages exist and what each costs. The standard recipe and Unsloth checkpoint every layer
whatever the card (their memory does not depend on the cap), so each runs first under the largest
cap, and its peak decides the smaller caps (`--cap-free-arms`; `from_the_top`): a cap that holds
its reserved peak takes that figure (the note says where it was measured), one under its allocated
peak gets only the short does-not-fit search, and only a cap in between runs the arm again.
Results are written after every cell, and `--reuse` takes a cell's earlier result from --work, so
a stage cut short by the device's time limit resumes where it stopped on the same machine.
`--repeat N` runs each cell N times, each in its own process, and keeps the median (session 11
saw two identical cells 25% apart on one host). `--smoke` runs tiny models of two families on the
CPU, where a cap stands for a token budget (train.SMOKE_TOKENS_PER_GIB), so tests/bench proves
the harness.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import ladder_table
import train

CAPS = (7.5, 11.0, 14.5, 22.5)  # GiB: 8, 12, 16 and 24 GB cards less what the driver keeps


def run_cell(args, shape: str, data: str, cap: float, arm: str, model_path: Path) -> dict:
    """One arm under one cap; when it runs out of memory, the longest sequence that fits."""
    run = under(args, cap)
    spec = train.SHAPES[shape]
    padded = spec["batch"] if data == "fixed" else spec["var_batch"]
    batch = spec["batch"] if arm.startswith("tuneboard") else padded
    n = train.pool_size(data, args.seq, [spec["batch"], padded], args.warmup + args.steps)
    tag = f"{shape}-{data}-{arm}-cap{cap:g}"
    runs: list[dict] = []
    for i in range(args.repeat):  # each run a process of its own: a host's spread shows
        runs.append(train.launch(
            run, arm, shape, data, args.seq, batch, args.steps, args.warmup, model_path,
            tag if i == 0 else f"{tag}-run{i + 1}", n_examples=n,
        ))  # fmt: skip
        if not runs[-1].get("ok"):
            break
    res = median_run(runs)
    res["cap_gib"] = cap
    if res.get("oom") and args.fit_probes:
        res.update(longest_fit(run, arm, shape, model_path))
    return res


def from_the_top(
    args, shape: str, data: str, cap: float, arm: str, top: dict, model_path: Path
) -> dict | None:
    """A cap-free arm's cell under a smaller cap, from its run under the largest (`top`), or None
    where only a run under this cap can tell. Its memory does not depend on the cap, so: a cap that
    holds the run's reserved peak (the allocator never had to hand memory back) takes its figure;
    under its allocated peak, or below a cap it ran out of memory under, it does not fit, and only
    the short search for the longest sequence that does runs. No peak (CPU smoke runs): None."""
    reserved, allocated = top.get("peak_reserved_gib"), top.get("peak_alloc_gib")
    if top.get("ok") and reserved is not None and reserved <= cap:
        return top | {"cap_gib": cap, "measured_at_gib": top["cap_gib"]}
    if top.get("ok") and allocated is not None and allocated > cap:
        why = f"its peak under {top['cap_gib']:g} GiB, {allocated:.2f} GiB, is over this cap"
    elif top.get("oom"):
        why = f"it ran out of memory under {top['cap_gib']:g} GiB already"
    else:
        return None
    keys = ("arm", "shape", "data", "seq", "batch")
    cell = {k: top[k] for k in keys if k in top} | {"cap_gib": cap, "oom": f"not run: {why}"}
    if args.fit_probes:
        cell.update(longest_fit(under(args, cap), arm, shape, model_path))
    return cell


def under(args: argparse.Namespace, cap: float) -> argparse.Namespace:
    """The arguments of a run under `cap`."""
    return argparse.Namespace(**{**vars(args), "cap_gib": cap})


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s of those that measured (the lower of the middle two for
    an even count), with every run's tokens/s; the first run when none measured."""
    measured = sorted((r for r in runs if r.get("ok")), key=lambda r: r["tokens_per_s"])
    if not measured:
        return runs[0]
    middle = dict(measured[(len(measured) - 1) // 2])
    if len(measured) > 1:
        middle["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs if r.get("ok")]
    return middle


def longest_fit(run: argparse.Namespace, arm: str, shape: str, model_path: Path) -> dict:
    """The longest single sequence that trains two steps under the cap (the second with the
    optimizer's state), in --fit-probes probes: halving from --seq until one fits, then one
    bisection probe if any are left."""
    granule = run.fit_granule
    longest, probes = 0, []
    first_fail: int | None = None  # at batch 1; None when --seq itself fits one sequence

    def probe(seq: int) -> str:
        tag = f"fit-{shape}-{arm}-cap{run.cap_gib:g}-{seq}"
        res = train.launch(run, arm, shape, "fixed", seq, 1, 1, 1, model_path, tag)  # 2 steps
        probes.append((seq, train.outcome(res)))
        return probes[-1][1]

    seq = run.seq
    while len(probes) < run.fit_probes and seq >= granule:
        result = probe(seq)
        if result == "ok":
            longest = seq
        if result != "oom":  # it fits; or the search was cut short (deadline) or broke
            break
        first_fail, seq = seq, seq // 2
    middle = (longest + (first_fail or 0)) // 2 // granule * granule
    if first_fail and longest and len(probes) < run.fit_probes and longest < middle < first_fail:
        result = probe(middle)
        if result == "ok":
            longest = middle
        elif result == "oom":
            first_fail = middle
    searched = longest or all(outcome == "oom" for _, outcome in probes)
    return {
        "fits_longest": longest if searched else None,  # None: the search did not finish
        "fit_first_fail": first_fail,
        "fit_probes": probes,
    }


def main(argv: list[str]) -> None:
    args = parse(argv)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, **train.versions()}
    meta |= {"seq": args.seq, "steps": args.steps, "warmup": args.warmup, "seed": args.seed}
    results: list[dict] = []

    def write() -> None:
        payload = {"meta": meta, "results": results}
        lines = ladder_table.render([payload])
        train.write_outputs(args, args.name, lines, payload)

    largest = max(args.caps)
    for shape in args.shapes:
        model_path = train.ensure_model(args, shape)
        for data in args.data:
            top = {  # a cap-free arm's result under the largest cap: it decides the smaller ones
                arm: run_cell(args, shape, data, largest, arm, model_path)
                for arm in args.arms
                if arm in args.cap_free_arms
            }
            for cap in sorted(args.caps):
                for arm in args.arms:
                    if arm not in top:
                        results.append(run_cell(args, shape, data, cap, arm, model_path))
                    elif cap == largest:
                        results.append(top[arm])
                    else:
                        results.append(
                            from_the_top(args, shape, data, cap, arm, top[arm], model_path)
                            or run_cell(args, shape, data, cap, arm, model_path)
                        )
                    write()
    write()
    print("\n" + (args.out / f"{args.name}.md").read_text(), flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny Llama and Gemma-2, no 4-bit")
    p.add_argument("--shapes", default=None, help="comma list of " + ",".join(train.SHAPES))
    p.add_argument("--caps", default=None, help="GiB, comma list (default 7.5,11,14.5,22.5)")
    p.add_argument("--data", default="fixed", help="comma list of fixed,variable")
    p.add_argument("--arms", default=",".join(train.ARMS), help="comma list of arms")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--fit-probes", type=int, default=3, help="probes of a does-not-fit search")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per cell, each its own process: the median"
    )
    p.add_argument("--fit-granule", type=int, default=None, help="shortest probe (default 256)")
    p.add_argument("--tb-checkpointing", default="auto", help="Tuneboard gradient_checkpointing")
    p.add_argument("--site", default=None, help="site dir for standard/tuneboard (PYTHONPATH)")
    p.add_argument("--unsloth-site", default=None, help="site dir for the unsloth arm only")
    p.add_argument("--cache", type=Path, default=None, help="model cache dir")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT or bench/out")
    p.add_argument("--work", type=Path, default=None, help="per-cell results and logs")
    p.add_argument("--name", default="ladder", help="output file stem")
    p.add_argument("--arm-timeout", type=float, default=600, help="seconds per arm process")
    p.add_argument("--deadline", type=float, default=None, help="unix time; see train.py")
    p.add_argument("--min-arm-s", type=float, default=40, help="see --deadline")
    p.add_argument("--reuse", action="store_true", help="take cells already in --work")
    p.add_argument(
        "--cap-free-arms",
        default="standard,unsloth",
        help="arms whose memory use does not depend on the cap (their checkpointing is fixed): "
        "run under the largest cap, their peak decides the smaller caps (from_the_top)",
    )
    p.add_argument("--quiet-children", action="store_true", help="arm output to WORK/<tag>.log")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.shapes = (args.shapes or ("smoke,smoke-gemma2" if smoke else "1b,3b,8b,qwen7b,"
                   "mistral7b,gemma9b")).split(",")  # fmt: skip
    args.caps = [
        float(c) for c in (args.caps or ("2,8" if smoke else ",".join(map(str, CAPS)))).split(",")
    ]
    args.data = args.data.split(",")
    args.arms = args.arms.split(",")
    args.cap_free_arms = [a for a in args.cap_free_arms.split(",") if a]
    for name, value in (("shapes", train.SHAPES), ("arms", train.ARMS + train.TUNEBOARD_VARIANTS)):
        unknown = [x for x in getattr(args, name) if x not in value]
        if unknown:
            p.error(f"unknown {name} {unknown}: choose from {', '.join(value)}")
    for name, smoke_default, gpu_default in (("seq", 128, 2048), ("steps", 2, 5), ("warmup", 1, 2)):
        if getattr(args, name) is None:
            setattr(args, name, smoke_default if smoke else gpu_default)
    args.fit_granule = args.fit_granule or (32 if smoke else 256)
    args.out = Path(args.out or os.environ.get("OUT") or train.REPO_ROOT / "bench" / "out")
    args.cache = Path(args.cache or "/tmp/tuneboard-bench-cache")
    args.work = Path(args.work or args.out / "work")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    return args


if __name__ == "__main__":
    main(sys.argv[1:])
