"""Evaluation reports in the web app, arranged in the database as a worker leaves them: a job that
succeeds queues one; the report page, the job page's link and the run-compare page's figures; a
deleted adapter's report is a clear 404; a queued one is cancelled at once."""

from __future__ import annotations

from sqlmodel import select

from app import queue
from app.models import Evaluation, JobStatus, SideWorkStatus
from tests.fakes.jobs import add_job


def succeed(db, settings, name: str, base_loss: float, adapter_loss: float) -> str:
    """A job run to success by hand (claim, finish with an adapter), and its report completed."""
    job = add_job(db, settings, name=name)
    claim = queue.claim_next_job(db, "w", 60)
    assert claim is not None and claim.job_id == job.id
    assert queue.finish(db, job.id, claim.attempt, JobStatus.succeeded, adapter={"size_bytes": 10})
    with db.write() as s:
        row = s.exec(select(Evaluation).where(Evaluation.adapter_id == f"job-{job.id}")).first()
        assert row is not None  # queued by the success, with no click
        assert row.status == SideWorkStatus.queued and row.method == "sft"
        row.status = SideWorkStatus.succeeded
        row.base_figures = {"eval_loss": base_loss, "rouge_l": 0.1, "prompts": 1}
        row.adapter_figures = {"eval_loss": adapter_loss, "rouge_l": 0.6, "prompts": 1}
        row.rows = [
            {
                "prompt": f"<b>{name}</b>?",
                "reference": "yes",
                "base_answer": "no",
                "adapter_answer": "yes",
                "base_scores": {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0},
                "adapter_scores": {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0},
                "difference": 1.0,
            }
        ]
        s.add(row)
    return f"job-{job.id}"


def test_a_succeeded_job_queues_its_report_and_the_pages_show_it(client, db, settings):
    first = succeed(db, settings, "first", 4.0, 1.5)
    second = succeed(db, settings, "second", 4.0, 2.5)
    job_page = client.get(f"/jobs/{first.removeprefix('job-')}").text
    assert f'href="/adapters/{first}/evaluation"' in job_page
    assert f'href="/adapters/{first}/evaluation"' in client.get("/adapters").text

    page = client.get(f"/adapters/{first}/evaluation")
    assert page.status_code == 200
    assert 'data-figure="eval_loss"' in page.text and "1.5" in page.text
    assert "&lt;b&gt;first&lt;/b&gt;?" in page.text and "<b>first</b>" not in page.text
    assert client.get(f"/adapters/{first}/evaluation?sort=sideways").status_code == 404

    compare = client.get(f"/jobs/compare?ids={first[4:]}&ids={second[4:]}").text
    assert 'id="compare-evaluation"' in compare
    assert "4 → 1.5" in compare and "4 → 2.5" in compare
    api = client.get(f"/api/jobs/compare?ids={first[4:]}&ids={second[4:]}").json()
    assert api["evaluations"][first[4:]]["adapter"]["eval_loss"] == 1.5


def test_a_queued_report_cancels_at_once_and_a_deleted_adapter_has_none(client, db, settings):
    adapter = succeed(db, settings, "gone", 4.0, 1.0)
    queued = client.post(f"/api/adapters/{adapter}/evaluation", json={"max_prompts": 3})
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    cancelled = client.delete(f"/api/adapters/{adapter}/evaluation").json()
    assert cancelled["status"] == "failed" and cancelled["error"]["kind"] == "cancelled"
    assert "no report" in cancelled["error"]["message"]
    bad_judge = client.post(
        f"/api/adapters/{adapter}/evaluation", json={"judge": {"url": "not a url", "model": "m"}}
    )
    assert bad_judge.status_code == 422
    assert client.delete(f"/api/jobs/{adapter[4:]}").status_code == 204
    for response in (
        client.get(f"/api/adapters/{adapter}/evaluation"),
        client.post(f"/api/adapters/{adapter}/evaluation"),
        client.get(f"/adapters/{adapter}/evaluation"),
    ):
        assert response.status_code == 404
        assert "no adapter" in response.text


def test_a_re_run_keeps_the_earlier_report_shown_while_it_runs_and_after_it_fails(
    client, db, settings
):
    adapter = succeed(db, settings, "kept", 4.0, 1.5)
    done = client.get(f"/api/adapters/{adapter}/evaluation").json()
    assert done["status"] == "succeeded" and done["report_evaluation_id"] == done["id"]

    rerun = client.post(f"/api/adapters/{adapter}/evaluation").json()
    assert rerun["id"] != done["id"] and rerun["report_evaluation_id"] == done["id"]
    with db.write() as s:  # a worker is partway through the re-run
        row = s.get(Evaluation, rerun["id"])
        assert row is not None
        row.status, row.stage = SideWorkStatus.running, "answering prompts"
        row.progress_done, row.progress_total = 3, 8
        s.add(row)
    running = client.get(f"/api/adapters/{adapter}/evaluation").json()
    assert (running["id"], running["status"], running["complete"]) == (
        rerun["id"],
        "running",
        False,
    )
    assert running["progress"] == {"done": 3, "total": 8, "eta_seconds": None}
    assert running["report_evaluation_id"] == done["id"]
    assert running["adapter"]["eval_loss"] == 1.5 and running["rows"] == done["rows"]
    assert set(running) == set(done)  # the same shape
    page = client.get(f"/adapters/{adapter}/evaluation").text
    assert "A newer evaluation is <strong>running</strong>: answering prompts" in page
    assert "3 of 8 steps" in page
    assert f"the complete report of evaluation {done['id']}" in page
    assert 'data-figure="eval_loss"' in page and "&lt;b&gt;kept&lt;/b&gt;?" in page

    with db.write() as s:  # the re-run fails
        row = s.get(Evaluation, rerun["id"])
        assert row is not None
        row.status, row.error_kind = SideWorkStatus.failed, "oom"
        row.error_message, row.error_hint = "The GPU ran out of memory.", "Evaluate fewer prompts."
        s.add(row)
    failed = client.get(f"/api/adapters/{adapter}/evaluation").json()
    assert failed["status"] == "failed" and failed["error"]["kind"] == "oom"
    assert failed["report_evaluation_id"] == done["id"] and failed["adapter"]["eval_loss"] == 1.5
    page = client.get(f"/partials/adapters/{adapter}/evaluation").text
    assert "A newer evaluation <strong>failed</strong>" in page
    assert "The GPU ran out of memory." in page and "Evaluate fewer prompts." in page
    assert 'data-figure="eval_loss"' in page and "Evaluate again" in page


def test_a_first_evaluation_still_running_shows_its_rows_so_far(client, db, settings):
    adapter = succeed(db, settings, "first-run", 4.0, 1.5)
    with db.write() as s:  # as if the first evaluation were still running
        row = s.exec(select(Evaluation).where(Evaluation.adapter_id == adapter)).one()
        row.status = SideWorkStatus.running
        s.add(row)
    running = client.get(f"/api/adapters/{adapter}/evaluation").json()
    assert running["report_evaluation_id"] == running["id"]
    assert running["adapter"] == {} and len(running["rows"]) == 1
    page = client.get(f"/adapters/{adapter}/evaluation").text
    assert "Not complete" in page and "A newer evaluation" not in page
