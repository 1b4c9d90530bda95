"""The ladder's tables for bench/RESULTS.md, from one or more bench/ladder.py JSON results (the
stages of one machine, merged; a later file's cell replaces an earlier one's).

    python bench/ladder_table.py OUT/ladder-first.json OUT/ladder-22.5.json > ladder.md

Three tables: Tuneboard's tokens/s as a ratio of Unsloth's and of the standard recipe's in each
(model, data, cap), with "does not fit" and the longest sequence that does; every cell's figures;
and which of Tuneboard's kernels each model family ran (from the recipe's compute mode and its
notice), so a family where one does not apply says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import train


def render(payloads: list[dict]) -> list[str]:
    cells = merged(payloads)
    meta = payloads[-1].get("meta", {}) if payloads else {}
    tables = (ratio_table(cells), detail_table(cells), kernel_table(cells), footer(meta))
    return [line for table in tables for line in [*table, ""]][:-1]


def merged(payloads: list[dict]) -> dict[tuple, dict]:
    """(shape, data, cap, arm) -> the cell's result; later payloads win."""
    cells: dict[tuple, dict] = {}
    for payload in payloads:
        for r in payload.get("results", []):
            cells[(r["shape"], r["data"], r.get("cap_gib"), r["arm"])] = r
    return cells


def ratio_table(cells: dict[tuple, dict]) -> list[str]:
    caps = sorted({cap for _, _, cap, _ in cells}, key=lambda c: c or 0)
    rows = sorted({(shape, data) for shape, data, _, _ in cells}, key=_order)
    head = "| model | data | " + " | ".join(f"{cap:g} GiB" for cap in caps) + " |"
    lines = [
        "Tuneboard's tokens/s over Unsloth's (U) and the standard recipe's (std), same run:",
        "",
        head,
        "|---|---|" + "---|" * len(caps),
    ]
    for shape, data in rows:
        row = [train.SHAPES[shape]["label"], data]
        for cap in caps:
            arms = {
                arm: r for (s, d, c, arm), r in cells.items() if (s, d, c) == (shape, data, cap)
            }
            row.append(ratio_cell(arms))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def ratio_cell(arms: dict[str, dict]) -> str:
    tb = arms.get("tuneboard")
    if tb is None:
        return "-"
    if not tb.get("ok"):
        return "Tuneboard " + not_ok(tb)
    parts = []
    for arm, short in (("unsloth", "U"), ("standard", "std")):
        other = arms.get(arm)
        if other is None:
            continue
        if other.get("ok"):
            parts.append(f"{tb['tokens_per_s'] / other['tokens_per_s']:.2f}x {short}")
        else:
            parts.append(f"{short} {not_ok(other)}")
    return "; ".join(parts) or f"{tb['tokens_per_s']:,.0f} tok/s"


def not_ok(r: dict) -> str:
    """ "does not fit (longest 1,024)", or why an arm has no figure."""
    if r.get("oom"):
        longest = r.get("fits_longest")
        if longest is None:
            return "does not fit"
        return f"does not fit (longest {longest:,})" if longest else "does not fit (nor 1 x 256)"
    if r.get("skipped"):
        return "skipped"
    return "error"


def detail_table(cells: dict[tuple, dict]) -> list[str]:
    lines = [
        "| model | data | cap GiB | arm | seq x batch | tokens/s (real) | median step s "
        "| peak alloc GiB | load s | step-0 loss | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, data, cap, arm), r in sorted(cells.items(), key=_cell_order):
        cells_ = [train.SHAPES[shape]["label"], data, f"{cap:g}" if cap else "-", arm]
        cells_.append(f"{r.get('seq', '-')} x {r.get('batch', '-')}")
        if r.get("ok"):
            cells_ += [
                f"{r['tokens_per_s']:,.0f}",
                f"{r['median_step_s']:.3f}",
                train.fmt_gib(r.get("peak_alloc_gib")),
                f"{r['load_s']:.1f}",
                f"{r['step0_loss']:.4f}" if r.get("step0_loss") is not None else "-",
                note(r),
            ]
        else:
            cells_ += ["-"] * 5 + [note(r)]
        lines.append("| " + " | ".join(cells_) + " |")
    return lines


def note(r: dict) -> str:
    if not r.get("ok"):
        text = not_ok(r)
        probes = ", ".join(f"{seq}:{outcome}" for seq, outcome in r.get("fit_probes", []))
        detail = r.get("oom") or r.get("skipped") or r.get("error") or ""
        text += f"; probes {probes}" if probes else ""
        return _clean(f"{text}; {detail}")[:200]
    parts = []
    if r.get("runs_tokens_per_s"):
        runs = r["runs_tokens_per_s"]
        parts.append(f"median of {len(runs)} runs ({min(runs):,.0f}-{max(runs):,.0f} tok/s)")
    if r.get("measured_at_gib"):
        parts.append(
            f"measured at {r['measured_at_gib']:g} GiB (its reserved peak, "
            f"{train.fmt_gib(r.get('peak_reserved_gib'))} GiB, fits this cap)"
        )
    if r.get("memory_policy"):
        parts.append(f"checkpointing {r['memory_policy']}")
    if r.get("start") and r["start"].get("total_s") is not None:
        parts.append(train.start_note(r))
    if r.get("alloc_retries"):
        parts.append(f"{r['alloc_retries']} allocator retries")
    return _clean(", ".join(parts))


def kernel_table(cells: dict[tuple, dict]) -> list[str]:
    """Per model, what Tuneboard's recipe ran: its compute mode and the attention it fell back to."""
    lines = ["| model | Tuneboard ran | fallback notice |", "|---|---|---|"]
    seen: dict[str, dict] = {}
    for (shape, _data, _cap, arm), r in sorted(cells.items(), key=_cell_order):
        if arm.startswith("tuneboard") and r.get("compute_mode") and shape not in seen:
            seen[shape] = r
    for shape, r in seen.items():
        mode = r["compute_mode"]
        missing = [k for k in ("fused LoRA MLPs", "Liger kernels") if k not in mode]
        ran = mode + (f" (no {' or '.join(missing)})" if missing else "")
        lines.append(
            f"| {train.SHAPES[shape]['label']} | {_clean(ran)} | {_clean(r.get('notice') or '-')} |"
        )
    return lines


def footer(meta: dict) -> list[str]:
    versions = ", ".join(
        f"{k} {meta[k]}" for k in ("gpu", "torch", "transformers", "peft", "bitsandbytes",
                                   "liger-kernel", "unsloth") if meta.get(k)
    )  # fmt: skip
    return [
        f"Seq {meta.get('seq', '-')}, warm-up {meta.get('warmup', '-')} then {meta.get('steps', '-')} "
        "timed steps; a cap is torch.cuda.set_per_process_memory_fraction of the arm's process. "
        '"does not fit (longest N)": the arm ran out of memory at seq x batch; N is the longest '
        "single sequence that trained two steps under the same cap (a short search).",
        f"Versions: {versions or '-'}.",
    ]


def _clean(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _order(key: tuple) -> tuple:
    shapes = list(train.SHAPES)
    return (shapes.index(key[0]) if key[0] in shapes else len(shapes), key[1])


def _cell_order(item: tuple) -> tuple:
    (shape, data, cap, arm), _ = item
    arms = list(train.ARMS) + list(train.TUNEBOARD_VARIANTS)
    return (*_order((shape, data)), cap or 0, arms.index(arm) if arm in arms else len(arms))


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python bench/ladder_table.py LADDER.json [MORE.json ...]")
    payloads = [json.loads(Path(path).read_text()) for path in argv]
    print("\n".join(render(payloads)))


if __name__ == "__main__":
    main(sys.argv[1:])
