"""The ladder harness (bench/ladder.py, bench/ladder_table.py) on the CPU: a tiny Gemma-2, each arm
in its own process under two caps (on the CPU a cap stands for a token budget), a does-not-fit
search, and the tables for RESULTS.md. The GPU figures come from the same scripts
(bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("torch")
pytest.importorskip("peft")


def test_the_ladder_measures_each_cap_and_finds_the_longest_sequence_that_fits(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "bench/ladder.py", "--smoke", "--shapes", "smoke-gemma2",
         "--caps", "1,8", "--arms", "standard,unsloth,tuneboard", "--fit-probes", "3",
         "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet-children"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cells = {
        (r["arm"], r["cap_gib"]): r
        for r in json.loads((out / "ladder.json").read_text())["results"]
    }
    # 8 "GiB" (512 tokens): a step of 128 x 2 fits; both arms measured on the same model.
    for arm in ("standard", "tuneboard"):
        assert cells[(arm, 8.0)].get("ok"), cells[(arm, 8.0)]
        assert cells[(arm, 8.0)]["tokens_per_s"] > 0
    assert "import unsloth failed" in cells[("unsloth", 8.0)]["skipped"]
    # A cap-free arm runs under the largest cap first; on the CPU it has no peak to decide the
    # smaller caps with, so it runs again there (tests/bench: test_a_cap_free_arm_s_peak_...).
    assert "import unsloth failed" in cells[("unsloth", 1.0)]["skipped"]
    for arm, cap in (("unsloth", 1.0), ("standard", 1.0), ("standard", 8.0), ("tuneboard", 8.0)):
        assert "measured_at_gib" not in cells[(arm, cap)]
    start = cells[("tuneboard", 8.0)]["start"]  # setup to first step, itemised
    assert start["total_s"] >= start["model_load_s"] + start["first_step_s"] > 0
    # 1 "GiB" (64 tokens): 128 x 2 does not fit; halving finds 64, bisection rules out 96.
    tuneboard = cells[("tuneboard", 1.0)]
    assert tuneboard["oom"] and tuneboard["fits_longest"] == 64
    assert tuneboard["fit_first_fail"] == 96
    assert [tuple(p) for p in tuneboard["fit_probes"]] == [(128, "oom"), (64, "ok"), (96, "oom")]

    table = (out / "ladder.md").read_text()
    assert table.strip() in proc.stdout  # the printed tables are the written ones
    row = next(
        line for line in table.splitlines() if line.startswith("| tiny-gemma2 (smoke) | fixed")
    )
    one_gib, eight_gib = [c.strip() for c in row.split("|")][3:5]
    assert one_gib == "Tuneboard does not fit (longest 64)"
    assert eight_gib.startswith("U skipped; ") and eight_gib.endswith("x std")
    # Gemma-2: its GeGLU MLP is fused; its soft-capped attention runs in blocks; the table says so.
    kernels = next(
        line for line in table.splitlines() if line.startswith("| tiny-gemma2 (smoke) | fp32")
    )
    assert "no fused LoRA MLPs" not in kernels and "fused LoRA MLPs" in kernels
    assert "soft-capped attention per example, in blocks" in kernels
    assert "start " in next(line for line in table.splitlines() if "| 8 | tuneboard |" in line)

    # The stages of one machine merge into one table; a later file's cell wins.
    later = json.loads((out / "ladder.json").read_text())
    later["results"] = [r | {"tokens_per_s": 1.0} for r in later["results"] if r.get("ok")]
    (tmp_path / "later.json").write_text(json.dumps(later))
    merged = subprocess.run(
        [sys.executable, "bench/ladder_table.py", str(out / "ladder.json"),
         str(tmp_path / "later.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    assert "| 1.00x std |" in merged.stdout.replace("U skipped; ", "")
    assert "Tuneboard does not fit (longest 64)" in merged.stdout


def test_an_unknown_shape_is_refused_with_the_choices() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/ladder.py", "--smoke", "--shapes", "gemma3"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown shapes ['gemma3']: choose from" in proc.stderr and "gemma9b" in proc.stderr


def test_a_cap_free_arm_s_peak_under_the_largest_cap_decides_the_smaller_caps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard arm runs under 22.5 GiB first (peak 9.0 allocated, 9.6 reserved): 7.5 GiB
    gets only its does-not-fit search (no run that would run out of memory first), 14.5 takes
    the 22.5 figure, and 9.3, between the two peaks, runs the arm. Tuneboard runs at every cap.
    An arm that ran out of memory under the largest cap gets only the search below it."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import ladder
    import ladder_table

    launched: list[str] = []

    def launch(run, arm, shape, data, seq, batch, steps, warmup, model_path, tag, **kw):
        launched.append(tag)
        cell = {"arm": arm, "shape": shape, "data": data, "seq": seq, "batch": batch}
        if tag.startswith("fit-"):  # the does-not-fit search: 1,024 fits, 2,048 does not
            return cell | ({"ok": True, "tokens_per_s": 1.0} if seq <= 1024 else {"oom": "x"})
        if arm == "unsloth":
            return cell | {"oom": "OutOfMemoryError"}
        return cell | {
            "ok": True, "tokens_per_s": 100.0, "median_step_s": 1.0, "load_s": 1.0,
            "peak_alloc_gib": 9.0, "peak_reserved_gib": 9.6,
        }  # fmt: skip

    monkeypatch.setattr(ladder.train, "launch", launch)
    monkeypatch.setattr(ladder.train, "ensure_model", lambda args, shape: tmp_path)
    ladder.main([
        "--smoke", "--shapes", "smoke", "--caps", "7.5,9.3,14.5,22.5", "--seq", "2048",
        "--arms", "standard,unsloth,tuneboard", "--fit-probes", "2", "--out", str(tmp_path),
    ])  # fmt: skip
    cells = {
        (r["arm"], r["cap_gib"]): r
        for r in json.loads((tmp_path / "ladder.json").read_text())["results"]
    }
    standard = [t for t in launched if "standard" in t]
    assert standard == [
        "smoke-fixed-standard-cap22.5",
        "fit-smoke-standard-cap7.5-2048",
        "fit-smoke-standard-cap7.5-1024",
        "smoke-fixed-standard-cap9.3",
    ]
    assert cells[("standard", 7.5)]["oom"].startswith("not run: its peak under 22.5 GiB, 9.00")
    assert cells[("standard", 7.5)]["fits_longest"] == 1024
    assert cells[("standard", 14.5)]["measured_at_gib"] == 22.5
    assert "measured_at_gib" not in cells[("standard", 9.3)]
    note = ladder_table.note(cells[("standard", 14.5)])
    assert "measured at 22.5 GiB (its reserved peak, 9.60 GiB, fits this cap)" in note
    unsloth = [t for t in launched if "unsloth" in t and not t.startswith("fit-")]
    assert unsloth == ["smoke-fixed-unsloth-cap22.5"]
    assert all(cells[("unsloth", cap)].get("oom") for cap in (7.5, 9.3, 14.5, 22.5))
    assert cells[("unsloth", 9.3)]["fits_longest"] == 1024
    tuneboard = [t for t in launched if "tuneboard" in t]
    assert len(tuneboard) == 4 and "does not fit" in ladder_table.not_ok(cells[("standard", 7.5)])


def test_a_repeated_cell_runs_each_time_in_a_process_of_its_own_and_keeps_the_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--repeat 3`: three launches with their own tags, the median run kept with every run's
    tokens/s, and the table's note says how far they spread. A run that fails ends the repeats."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import ladder
    import ladder_table

    args = ladder.parse(["--smoke", "--repeat", "3", "--out", str(tmp_path)])
    scripted = iter([120.0, 90.0, 100.0])
    tags: list[str] = []

    def launch(run, arm, shape, data, seq, batch, steps, warmup, model_path, tag, **kw):
        tags.append(tag)
        return {"ok": True, "tokens_per_s": next(scripted), "median_step_s": 1.0, "tag": tag}

    monkeypatch.setattr(ladder.train, "launch", launch)
    cell = ladder.run_cell(args, "smoke", "fixed", 8.0, "tuneboard", tmp_path)
    base = "smoke-fixed-tuneboard-cap8"
    assert tags == [base, f"{base}-run2", f"{base}-run3"]
    assert cell["tag"] == f"{base}-run3" and cell["tokens_per_s"] == 100.0
    assert cell["runs_tokens_per_s"] == [120.0, 90.0, 100.0] and cell["cap_gib"] == 8.0
    assert "median of 3 runs (90-120 tok/s)" in ladder_table.note(cell)

    outcomes = iter([{"ok": True, "tokens_per_s": 50.0}, {"ok": False, "error": "crashed"}])
    monkeypatch.setattr(ladder.train, "launch", lambda *a, **kw: next(outcomes))
    cell = ladder.run_cell(args, "smoke", "fixed", 8.0, "tuneboard", tmp_path)
    assert cell["tokens_per_s"] == 50.0 and "runs_tokens_per_s" not in cell  # one run measured
