"""`auto`'s search for the most decoder layers that keep their activations
(memory_policy.most_layers_kept), on a stand-in card with 7B/8B-sized layer counts: each trial
step is a second or more of a job's start, and one that runs out of memory costs the most."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from worker.training import memory_policy

GIB = 1024**3
LAYERS = 32


class StandInCard:
    """A recipe whose trial step peaks at `peak(kept)` and runs out of memory past `usable`."""

    def __init__(self, peak, usable: float) -> None:
        self.peak, self.usable, self.kept = peak, usable, 0
        self.start_timing = SimpleNamespace(trial_steps=0)
        self.policy_trial = memory_policy.PolicyTrial()
        self.model = SimpleNamespace(zero_grad=lambda set_to_none: None)
        self.tried: list[int] = []

    def _set_memory_policy(self, policy: str, kept: int = 0) -> None:
        assert policy == "partial"
        self.kept = kept

    def _trial_step(self, batch) -> int:
        self.tried.append(self.kept)
        peak = self.peak(self.kept)
        if peak > self.usable:
            raise torch.OutOfMemoryError("stand-in card is full")
        return int(peak)


def _search(card: StandInCard, peak_off: int | None, limit: float, monkeypatch):
    monkeypatch.setattr(memory_policy, "decoder_layers", lambda model: [None] * LAYERS)
    return memory_policy.most_layers_kept(card, {}, int(card.peak(0)), peak_off, limit)


def _best(peak, limit: float) -> int:
    return max(n for n in range(LAYERS) if peak(n) <= limit)


@pytest.mark.parametrize("off_measured", [False, True], ids=["off-ran-out", "off-measured"])
def test_a_linear_card_takes_two_or_three_trials(monkeypatch, off_measured):
    """8B under a 7.5 GiB cap (session 17): every layer checkpointed peaks at 6.0 GiB, each kept
    layer adds 0.3 GiB, a trial may use 6.75 GiB: 2 layers keep theirs. Where "off" ran out of
    memory, one kept layer gives the line: 1, 2, then 3, which does not fit. Halving from 32
    (16, 8, 4 out of memory) took seven trials here before."""

    def peak(kept):
        return 6.0 * GIB + kept * 0.3 * GIB

    card = StandInCard(peak, usable=7.5 * GIB)
    limit = 6.75 * GIB
    off = None if not off_measured else int(peak(LAYERS))
    kept, at = _search(card, off, limit, monkeypatch)
    assert kept == _best(peak, limit) == 2
    assert at == int(peak(2))
    assert card.tried == ([2, 3] if off_measured else [1, 2, 3])
    assert card.policy_trial.kept_layer_bytes == pytest.approx(0.3 * GIB, rel=1e-6)


@pytest.mark.parametrize("usable_gib", [7.5, 9.0, 11.0, 14.5])
@pytest.mark.parametrize(
    "extra",
    [
        lambda n: 0.0,
        lambda n: 0.05 * GIB * min(n, 4),  # the first kept layers cost more (the last layers')
        lambda n: 0.004 * GIB * n * n,  # each kept layer costs more than the one before
        lambda n: 0.15 * GIB * (n % 3 == 0 and n > 0),  # allocator rounding, now and then
    ],
    ids=["linear", "first-dearer", "growing", "lumpy"],
)
def test_the_search_finds_the_most_layers_that_fit_whatever_the_curve(
    monkeypatch, usable_gib, extra
):
    """Where a kept layer's memory is not one line, the search still ends on the most layers
    whose trial fits (a count that fits beside one that does not), in few trials."""

    def peak(kept):
        return 5.5 * GIB + kept * 0.25 * GIB + extra(kept)

    limit = 0.9 * usable_gib * GIB
    card = StandInCard(peak, usable=usable_gib * GIB)
    found = _search(card, None, limit, monkeypatch)
    best = _best(peak, limit)
    assert found is not None and found[0] == best, card.tried
    assert peak(best + 1) > limit  # the boundary, not a count short of it
    assert len(card.tried) <= 6, card.tried


def test_no_layer_kept_when_one_does_not_fit(monkeypatch):
    card = StandInCard(lambda kept: 6.6 * GIB + kept * 0.3 * GIB, usable=7.5 * GIB)
    assert _search(card, None, 6.75 * GIB, monkeypatch) is None
    assert card.tried == [1]
