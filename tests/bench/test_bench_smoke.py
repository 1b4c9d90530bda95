"""The benchmark harness itself, on the CPU: a tiny Llama, every arm in its own process, one
table. The GPU numbers come from the same script on the GPU machine (bench/README.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_smoke_run_prints_one_row_per_arm(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OUT=str(tmp_path / "out"))
    proc = subprocess.run(
        [sys.executable, "bench/train.py", "--smoke", "--data", "fixed",
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = (tmp_path / "out" / "throughput.md").read_text()
    assert table.strip().splitlines()[0] in proc.stdout  # the printed table is the written one
    rows = {
        cells[4]: cells
        for line in table.splitlines()
        if line.startswith("| tiny-llama")
        for cells in [[c.strip() for c in line.split("|")]]
    }
    assert set(rows) == {"standard", "unsloth", "tuneboard"}
    assert rows["standard"][5] != "-"  # tokens/s measured
    assert float(rows["standard"][12]) > 0  # a step-0 loss for the parity check
    if importlib.util.find_spec("unsloth") is None:
        assert "import unsloth failed" in rows["unsloth"][13]

    results = json.loads((tmp_path / "out" / "throughput.json").read_text())["results"]
    tuneboard = next(r for r in results if r["arm"] == "tuneboard")
    if (REPO / "worker" / "recipes" / "sft.py").exists():
        assert tuneboard.get("ok"), tuneboard
        # Same random-init model, same token distribution: the first losses agree closely.
        standard = next(r for r in results if r["arm"] == "standard")
        assert abs(tuneboard["step0_loss"] - standard["step0_loss"]) < 0.2
    else:
        assert "worker" in tuneboard.get("error", ""), tuneboard


def test_the_step_profile_times_each_memory_policy_and_tables_its_operators(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "bench/profile_step.py", "--shape", "smoke", "--policies",
         "off,on,off:unfused,off:unfusedattn,off:fusedinside,off:denseattn,offload",
         "--timed", "2",
         "--out", str(tmp_path / "out"),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "out" / "profile-smoke.md").read_text()
    rows = {
        cells[1]: cells[2:]
        for line in report.splitlines()
        if line.startswith(("| off", "| on "))
        for cells in [[c.strip() for c in line.split("|")]]
    }
    assert set(rows) == {
        "off",
        "on",
        "off:unfused",
        "off:unfusedattn",
        "off:fusedinside",
        "off:denseattn",
        "offload",
    }
    assert all(float(cells[0]) > 0 for cells in rows.values())
    # The same batch under every policy and variant: the same loss and LoRA gradient norm.
    assert len({(cells[3], cells[4]) for cells in rows.values()}) == 1, rows
    assert "ms more per layer than off" in report
    assert "## on: top operators by self_cpu_time_total" in report
    assert "aten::mm" in report  # the projections, in the operator table


def test_the_dpo_benchmark_runs_trl_and_the_product_on_the_same_pairs(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "bench/preference.py", "--smoke", "--arms", "trl,unsloth,tuneboard",
         "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {
        r["arm"]: r
        for r in json.loads((tmp_path / "out" / "dpo-smoke.json").read_text())["results"]
    }
    for arm in ("trl", "tuneboard"):
        assert results[arm].get("ok"), results[arm]
        assert results[arm]["pairs_per_second"] > 0 and results[arm]["steps"] == 2
        # A new adapter is the base model: every pair's loss starts at log 2.
        assert abs(results[arm]["first_loss"] - 0.6931) < 1e-3
    if importlib.util.find_spec("unsloth") is None:
        assert "import unsloth failed" in results["unsloth"]["skipped"]
    assert "| tuneboard |" in (tmp_path / "out" / "dpo-smoke.md").read_text()
