"""Steps that a resumed attempt trains again count once, the latest attempt's, in the Run card's
figures, the jobs list's loss sparkline and the compare curves: rows written by the queue calls the
worker makes, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from app import queue
from app.db import Database
from app.services import job_views
from devkit.simulated_run import finish, metric_row, resume, start_running_job, write_metrics

TOKENS = metric_row(1)["tokens"]  # a simulated row's real tokens


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")


def resumed_job(db: Database, *, end: bool = True) -> int:
    """Attempt 1 logs steps 1..55 and its worker dies; attempt 2 resumes from the checkpoint at
    step 40 and logs steps 41..60 again (other losses: other weights)."""
    claim = start_running_job(db, "resumed", total=60)
    write_metrics(db, claim, 1, 55)
    again = resume(db, claim)
    write_metrics(db, again, 41, 20, seed=1.0)
    if end:
        finish(db, again)
    return claim.job_id


def test_tokens_trained_counts_each_step_once_after_a_resume(any_db):
    job = queue.get_job(any_db, resumed_job(any_db))
    run = job_views.run_facts(any_db, job)
    assert run.tokens_trained == 60 * TOKENS  # steps 1..60 once (it said 75 steps' worth)
    assert run.tokens_trained_again == 15 * TOKENS  # steps 41..55, trained twice
    assert run.final_loss == pytest.approx(metric_row(60, seed=1.0)["loss"])
    assert run.final_eval_loss == pytest.approx(metric_row(50, seed=1.0)["eval_loss"])


def test_mid_resume_the_final_eval_loss_is_one_the_resumed_weights_went_through(any_db):
    """Attempt 2 is at step 45: attempt 1's eval at step 50 is of weights that are gone."""
    claim = start_running_job(any_db, "resuming", total=60)
    write_metrics(any_db, claim, 1, 55)
    again = resume(any_db, claim)
    write_metrics(any_db, again, 41, 5, seed=1.0)
    run = job_views.run_facts(any_db, queue.get_job(any_db, claim.job_id))
    assert run.tokens_trained == 45 * TOKENS
    assert run.final_eval_loss == pytest.approx(metric_row(25)["eval_loss"])


def test_a_retry_from_scratch_counts_its_own_steps_only(any_db):
    claim = start_running_job(any_db, "from scratch", total=60)
    write_metrics(any_db, claim, 1, 55)
    again = resume(any_db, claim)
    write_metrics(any_db, again, 1, 20, seed=1.0)
    job = queue.get_job(any_db, claim.job_id)
    assert job_views.run_facts(any_db, job).tokens_trained == 20 * TOKENS
    assert len(job_views.loss_sparkline(any_db, job)) == 20


def test_each_attempt_counts_up_to_the_step_the_next_one_resumed_from(any_db):
    """Three attempts: 1..55, then 41..50 (dies again), then 45..60."""
    claim = start_running_job(any_db, "resumed twice", total=60)
    write_metrics(any_db, claim, 1, 55)
    second = resume(any_db, claim)
    write_metrics(any_db, second, 41, 10, seed=1.0)
    third = resume(any_db, second)
    write_metrics(any_db, third, 45, 16, seed=2.0)
    job = queue.get_job(any_db, claim.job_id)
    run = job_views.run_facts(any_db, job)
    assert run.tokens_trained == 60 * TOKENS
    assert run.tokens_trained_again == (15 + 6) * TOKENS
    losses = job_views.loss_sparkline(any_db, job)
    expected = (
        [metric_row(step)["loss"] for step in range(1, 41)]
        + [metric_row(step, seed=1.0)["loss"] for step in range(41, 45)]
        + [metric_row(step, seed=2.0)["loss"] for step in range(45, 61)]
    )
    assert losses == [round(loss, 4) for loss in expected]


def test_the_loss_sparkline_and_compare_curves_draw_each_step_once(any_db):
    job_id = resumed_job(any_db)
    job = queue.get_job(any_db, job_id)
    losses = job_views.loss_sparkline(any_db, job)
    assert len(losses) == 60  # not 75: steps 41..55 once, attempt 2's
    assert losses[40:] == [round(metric_row(s, seed=1.0)["loss"], 4) for s in range(41, 61)]
    curves = job_views.compare(any_db, [job_id])[0]["metrics"]
    assert curves["step"] == list(range(1, 61))
    assert curves["loss"][40:] == [metric_row(s, seed=1.0)["loss"] for s in range(41, 61)]
    assert [v for v in curves["eval_loss"] if v is not None] == [
        metric_row(25)["eval_loss"],
        metric_row(50, seed=1.0)["eval_loss"],
    ]
