"""Issue #18's journey in a real browser, over a real worker: upload a preference file, see it
detected as pairs with its pair report, queue a DPO job from the New job form, watch the reward
charts fill while the real training child trains the demo model on the CPU, then chat with the
DPO adapter in the Playground through the worker's own inference server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from app import queue
from app.db import Database
from app.models import JobStatus
from tests.browser.test_live_job_page import DRAWN
from tests.fakes.real_workers import MODEL, RealWorkers, add_demo, short_lease_settings
from tests.worker.test_loop import finished, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# LLaMA-Factory's alpaca-style preference shape (as its dpo_en_demo): instruction/input/chosen/rejected.
PAIRS = Path(__file__).resolve().parents[1] / "fixtures" / "datasets" / "lf_alpaca_preference.json"
# Small enough for about a minute on 2 CPU cores, long enough to see the charts move.
SETTINGS = {
    "max_steps": "6",
    "max_seq_len": "128",
    "micro_batch_size": "1",
    "grad_accum_steps": "1",
    "eval_every": "1000",
    "save_every": "1000",
    "learning_rate": "0.003",
}


def drawn(page) -> dict[str, list[int]]:
    """Per chart, per uPlot series: how many points it holds."""
    return page.evaluate(DRAWN)


def test_a_preference_file_uploaded_trains_a_dpo_adapter_that_answers_in_the_playground(
    live_server, server_db: Database, page, demo_build, tmp_path
):
    settings = short_lease_settings(live_server.data_dir)
    add_demo(server_db, settings, demo_build)  # the demo model, registered
    workers = RealWorkers(settings, tmp_path)
    try:
        # The worker computes the token report (its side work), trains, and serves the Playground.
        workers.start(TUNEBOARD_TEST_INFERENCE="1")

        # Upload through the file picker: the dataset page says what was detected.
        page.goto(live_server.url + "/datasets")
        with page.expect_file_chooser() as chooser:
            page.click(".dropzone")
        chooser.value.set_files(str(PAIRS))
        page.fill("#dataset-name", "preference pairs")
        page.click("form.upload button[type=submit]")
        page.wait_for_url(re.compile(r"/datasets/[0-9a-f]{32}$"), timeout=30_000)
        dataset_id = page.url.rsplit("/", 1)[1]
        assert page.text_content("dd.methods code:nth-of-type(1)") == "dpo"
        assert [c.inner_text() for c in page.locator("dd.methods code").all()] == ["dpo", "orpo"]
        assert "preference pairs: a chosen and a rejected answer" in page.inner_text("dd.methods")
        # The pair report, computed by the worker's side-work child, replaces the pending partial.
        page.wait_for_selector(
            "#dataset-report[data-report-status=succeeded] .pair-lengths", timeout=90_000
        )
        report = page.inner_text("#dataset-report")
        assert "training pairs" in report
        lengths = page.inner_text("#dataset-report .pair-lengths")
        assert all(part in lengths for part in ("prompt: median", "chosen:", "rejected:"))

        # New job: method dpo on this dataset, small settings; queued, and on its page.
        page.goto(live_server.url + "/jobs/new")
        page.select_option("form.job-form [name=method]", "dpo")
        page.select_option("form.job-form [name=base_model]", MODEL)
        page.select_option("form.job-form [name=dataset_id]", dataset_id)
        page.fill("form.job-form [name=name]", "dpo journey")
        page.click("form.job-form details summary")
        for name, value in SETTINGS.items():
            page.fill(f"form.job-form [name={name}]", value)
        page.click("form.job-form button[type=submit]")
        page.wait_for_url(re.compile(r"/jobs/\d+$"))
        job_id = int(page.url.rsplit("/", 1)[1])
        assert page.text_content("#job-header h1 .method-tag") == "DPO"
        assert queue.get_job(server_db, job_id).config["method"] == "dpo"

        # The live page: the reward margin and accuracy charts gain points as the child trains.
        first = wait_for(
            lambda: (d := drawn(page)).get("reward_margin", [0])[0] >= 1 and d, 150, "reward rows"
        )
        job = wait_for(lambda: finished(server_db, job_id), 150, "the DPO job")
        assert job.status == JobStatus.succeeded, (job.error_kind, job.error_message)
        charts = wait_for(
            lambda: (d := drawn(page))["reward_margin"][0] == 6 and d, 15, "all 6 rows"
        )
        assert first["reward_margin"][0] < 6  # the first points came while it ran
        assert charts["reward_accuracy"][0] == 6 and charts["rewards"][:2] == [6, 6]
        assert page.js_errors == []

        # The Playground lists the DPO adapter and answers with it.
        adapter_id = f"job-{job_id}"
        page.goto(live_server.url + "/playground")
        page.select_option("select[name=model_a]", adapter_id)
        page.click("#new-session button[type=submit]")
        page.wait_for_url(re.compile(r"/playground/sessions/\d+$"))
        page.click("details summary")
        page.fill("input[name=temperature]", "0")
        page.fill("input[name=max_new_tokens]", "24")
        page.fill("textarea[name=message]", "Is 2027 a leap year?")
        page.press("textarea[name=message]", "Enter")
        page.wait_for_selector(".msg-assistant", timeout=60_000)
        expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=120_000)
        answer = page.locator(".chat-pane .msg-assistant").first.inner_text().strip()
        assert answer and "error" not in answer.lower()
        assert page.js_errors == []
    finally:
        workers.stop_all()
