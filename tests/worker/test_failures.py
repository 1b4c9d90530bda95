"""The OOM retry rule and the exit classification (pure functions)."""

from __future__ import annotations

import signal

from app.train_config import TrainConfig
from worker.failures import HINTS, classify_exit, hint_for, oom_retry


def _config(micro_batch_size: int, grad_accum_steps: int, **more) -> TrainConfig:
    return TrainConfig(
        dataset_id="0" * 32,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        **more,
    )


def test_oom_retry_halves_the_micro_batch_and_keeps_the_effective_batch():
    config, notice = oom_retry(_config(8, 2, max_seq_len=1024), step=7, seq_len=None)
    assert (config.micro_batch_size, config.grad_accum_steps) == (4, 4)
    assert config.model_dump(exclude={"micro_batch_size", "grad_accum_steps"}) == _config(
        8, 2, max_seq_len=1024
    ).model_dump(exclude={"micro_batch_size", "grad_accum_steps"})
    assert notice.startswith("Ran out of GPU memory at step 7 (micro-batch 8, sequence 1024)")


def test_oom_retry_of_an_odd_micro_batch_never_shrinks_the_effective_batch():
    config, _ = oom_retry(_config(3, 4), step=1, seq_len=512)
    assert (config.micro_batch_size, config.grad_accum_steps) == (1, 12)


def test_no_oom_retry_below_one_example_or_past_the_accumulation_bound():
    assert oom_retry(_config(1, 4), step=1, seq_len=512) is None
    # 2 x 600 would need accumulation 1200: past TrainConfig's bound on grad_accum_steps.
    assert oom_retry(_config(2, 600), step=1, seq_len=8) is None


def test_exits_without_a_result_are_classified():
    killed = classify_exit(-signal.SIGKILL, ["x"])
    assert (killed.status, killed.error_kind, killed.error_hint) == (
        "failed",
        "killed",
        HINTS["killed"],
    )
    other = classify_exit(1, ["line a", "line b"])
    assert other.error_kind == "unknown" and (other.error_message or "").endswith("line a\nline b")
    assert hint_for("no such kind") == HINTS["unknown"]
