"""The longest-sequence search (bench/train.py `longest`, the `longest` and `longest-caps` stages)
with scripted probes: only running out of memory is a failure; a probe cut by the deadline or
broken leaves the search unsettled and says so (session 21's 11 GiB table called a probe the
deadline cut the first failure)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def search(monkeypatch: pytest.MonkeyPatch, outcomes: dict[int, str], **options) -> tuple:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import train

    def probe(args, arm, shape, seq, model_path):
        return {
            "ok": {"ok": True},
            "oom": {"oom": "OutOfMemoryError"},
            "timeout": {"error": "child exited timeout, no result"},
            "late": {"skipped": "deadline: too little time left"},
        }[outcomes[seq]]

    monkeypatch.setattr(train, "probe", probe)
    args = argparse.Namespace(
        granule=4096, longest_start=8192, longest_max=65536, cap_gib=11.0, **options
    )
    result = train.longest(args, "tuneboard", "8b", Path("unused"))
    return result, train.longest_rows(args, [result])[2]


def test_a_probe_the_deadline_cut_is_no_failure(monkeypatch):
    outcomes = {8192: "ok", 16384: "ok", 32768: "ok", 65536: "oom", 49152: "oom", 40960: "ok"}
    result, row = search(monkeypatch, outcomes | {45056: "timeout"})
    assert result["longest"] == 40960 and result["first_fail"] == 49152
    assert result["note"] == "45,056 not settled (error)"
    assert "| 40,960 | 49,152; 45,056 not settled (error) |" in row


def test_a_cut_while_doubling_leaves_no_failure_and_keeps_what_fits(monkeypatch):
    result, row = search(monkeypatch, {8192: "ok", 16384: "timeout"})
    assert result["longest"] == 8192 and result["first_fail"] is None
    assert "| 8,192 | 16,384 not settled (error) |" in row
    result, row = search(monkeypatch, {8192: "ok", 16384: "late"})
    assert result["longest"] == 8192 and "16,384 not settled (skipped)" in row
    result, row = search(monkeypatch, {8192: "late"})
    assert "longest" not in result and result["skipped"].startswith("deadline")


def test_a_settled_search_ends_between_a_fit_and_a_failure_one_granule_apart(monkeypatch):
    outcomes = {8192: "ok", 16384: "ok", 32768: "oom", 24576: "oom", 20480: "oom"}
    result, row = search(monkeypatch, outcomes)
    assert (result["longest"], result["first_fail"]) == (16384, 20480)
    assert "note" not in result and "| 16,384 | 20,480 |" in row
    result, row = search(monkeypatch, dict.fromkeys((8192, 16384, 32768, 65536), "ok"))
    assert result["longest"] == 65536 and "no failure up to 65536" in row
