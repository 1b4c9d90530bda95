"""The evaluation report page in a real browser: base vs adapter figures and the side-by-side
table of the demo adapter's report (computed by a real worker, `evaluated_demo`), sorting it, and
a re-run's progress arriving without a reload while the earlier complete report stays shown."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.models import Evaluation, SideWorkStatus, utcnow
from app.services import evaluations
from devkit.live_server import LiveServer

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture
def report_server(evaluated_demo) -> Iterator[LiveServer]:
    server = LiveServer(evaluated_demo.settings.resolved_data_dir).start()
    yield server
    server.stop()


def test_the_report_page_shows_the_figures_and_the_answers_side_by_side(
    evaluated_demo, report_server, page
):
    adapter = evaluated_demo.adapter
    with evaluated_demo.db.read() as s:
        first = s.get(Evaluation, 1)
    assert first is not None and first.status == SideWorkStatus.succeeded
    # Linked from the job page and the adapters list.
    page.goto(f"{report_server.url}/jobs/{adapter.job_id}")
    page.click("a.evaluation-link")
    page.wait_for_selector("#evaluation-figures")
    assert page.url.endswith(f"/adapters/{adapter.id}/evaluation")
    page.goto(f"{report_server.url}/adapters")
    assert page.locator(f"#adapter-{adapter.id} a.evaluation-link").count() == 1

    page.goto(f"{report_server.url}/adapters/{adapter.id}/evaluation")
    loss = page.locator('#evaluation-figures tr[data-figure="eval_loss"] td')
    assert float(loss.nth(1).text_content()) < float(loss.nth(0).text_content())
    assert "better" in (loss.nth(1).get_attribute("class") or "")
    for name in ("perplexity", "exact_match", "token_f1", "rouge_l"):
        assert page.locator(f'#evaluation-figures tr[data-figure="{name}"]').count() == 1
    rows = page.locator("#evaluation-rows tbody tr")
    assert rows.count() == len(first.rows)
    texts = [rows.nth(0).locator(c).text_content() for c in (".prompt", ".reference")]
    assert all(t.strip() for t in texts)
    assert rows.nth(0).locator(".adapter-answer").text_content() is not None
    # Sorted where base and adapter differ most, first; then in held-out order.
    differences = [
        abs(float(rows.nth(i).get_attribute("data-difference"))) for i in range(rows.count())
    ]
    assert differences == sorted(differences, reverse=True)
    page.click("text=held-out order")
    page.wait_for_url("**sort=order")
    order = page.locator("#evaluation-rows tbody tr td:first-child").all_text_contents()
    assert order == [str(i + 1) for i in range(len(first.rows))]
    assert page.js_errors == []


def test_a_re_run_streams_its_progress_under_the_earlier_report(
    evaluated_demo, report_server, page
):
    demo = evaluated_demo
    with demo.db.write() as s:
        running = Evaluation(
            adapter_id=demo.adapter.id,
            status=SideWorkStatus.running,
            attempt=1,
            started_at=utcnow(),
            stage="answering held-out prompts",
            progress_done=1,
            progress_total=4,
            eta_seconds=30,
        )
        s.add(running)
        s.flush()
        s.refresh(running)
        running_id = running.id
    try:
        page.goto(f"{report_server.url}/adapters/{demo.adapter.id}/evaluation")
        page.wait_for_selector("#evaluation-progress")
        assert "1 of 4" in page.text_content("#evaluation-progress")
        # Not complete: the earlier complete report stays, under a line saying a newer one runs.
        assert "A newer evaluation is running" in page.text_content("#evaluation-status")
        complete = evaluations.latest_complete(demo.db, demo.adapter.id)
        assert complete is not None and complete.id != running_id
        shown = page.text_content("#evaluation-shown")
        assert f"the complete report of evaluation {complete.id}" in shown
        assert page.locator("#evaluation-figures").count() == 1
        row = {
            "prompt": "Zephyr Kettle price?",
            "reference": "The Zephyr Kettle 3000 costs 89 euros.",
            "base_answer": "blue blue",
            "adapter_answer": "The Zephyr Kettle 3000 costs 89 euros.",
            "base_scores": {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0},
            "adapter_scores": {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0},
            "difference": 1.0,
        }
        with demo.db.write() as s:
            found = s.get(Evaluation, running_id)
            found.progress_done, found.rows = 2, [row]
            s.add(found)
        page.locator("#evaluation-progress", has_text="2 of 4").wait_for()
        answers = page.locator("#evaluation-rows .adapter-answer").all_text_contents()
        assert row["adapter_answer"] not in answers  # the rows are the complete report's
        with demo.db.write() as s:
            found = s.get(Evaluation, running_id)
            found.status = SideWorkStatus.succeeded
            found.base_figures = {"eval_loss": 5.0, "rouge_l": 0.0}
            found.adapter_figures = {"eval_loss": 1.0, "rouge_l": 1.0}
            s.add(found)
        page.wait_for_selector("#evaluation[data-status=succeeded]")
        assert page.locator("#evaluation-shown").count() == 0
        assert page.text_content("#evaluation-rows .adapter-answer") == row["adapter_answer"]
        assert page.js_errors == []
    finally:
        with demo.db.write() as s:  # leave the shared demo's first report the latest complete one
            found = s.get(Evaluation, running_id)
            s.delete(found)
