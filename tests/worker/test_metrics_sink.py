"""The worker's metric sink against a real SQLite file: every Metric column is stored, other keys
are not."""

from __future__ import annotations

from app import queue
from app.models import metric_columns
from devkit.simulated_run import metric_row, preference_values, start_running_job
from worker.job_io import DatabaseSink
from worker.metrics import process_rss_mib


def test_the_sink_stores_a_dpo_steps_rewards_and_drops_keys_that_are_no_column(db):
    claim = start_running_job(db, method="dpo")
    sink = DatabaseSink(db, claim.job_id, claim.attempt)
    row = metric_row(25) | preference_values(25) | {"tokens": 4096, "step_seconds": 0.2}
    sink.write(row)
    sink.flush()

    (stored,) = queue.metrics_after(db, claim.job_id)
    assert stored.reward_margin == row["reward_margin"]
    assert stored.eval_reward_accuracy == row["eval_reward_accuracy"]
    assert stored.rewards_rejected == row["rewards_rejected"] < 0
    assert stored.tokens == 4096  # the Run card sums them: tokens trained
    assert "step_seconds" not in metric_columns() and "steps" not in metric_columns()
    assert not sink.stale


def test_a_cpu_runs_rows_carry_the_process_memory_and_the_sink_stores_it(db):
    before = process_rss_mib()
    assert before is not None and before > 10  # a Python process with SQLModel loaded
    ballast = b"x" * (96 * 1024 * 1024)  # touched pages, so resident
    after = process_rss_mib()
    assert after is not None and after - before > 64
    del ballast

    claim = start_running_job(db)
    sink = DatabaseSink(db, claim.job_id, claim.attempt)
    sink.write({"step": 1, "loss": 2.0, "rss_mib": after})
    sink.flush()
    (stored,) = queue.metrics_after(db, claim.job_id)
    assert stored.rss_mib == after
