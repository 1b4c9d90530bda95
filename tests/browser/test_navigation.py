"""Every page in the nav, reached by clicking, in a real browser; screenshots for the README."""

from __future__ import annotations

import os
import uuid

import pytest

from app import queue
from app.db import Database
from app.models import BaseModelEntry, Dataset, DatasetStatus, JobStatus, Worker
from app.train_config import TrainConfig
from devkit.simulated_run import metric_row

pytestmark = pytest.mark.browser

# nav link -> the page's heading
PAGES = {
    "Datasets": "Datasets",
    "Jobs": "Jobs",
    "Adapters": "Adapters",
    "Playground": "Playground",
    "Models": "Base models",
    "System": "System",
}


def record(db: Database, claim: queue.Claim, *, steps: int, total: int) -> None:
    """The metric rows and progress of `steps` training steps, in two writes."""
    rows = [metric_row(step) for step in range(1, steps + 1)]
    assert queue.record_metrics(db, claim.job_id, claim.attempt, rows)
    queue.update_progress(
        db, claim.job_id, claim.attempt, progress_step=steps, progress_total=total
    )


def arrange_a_busy_day(db: Database) -> None:
    """What a user has after the demo: its model and dataset, one finished job, one training,
    two waiting, and a worker."""
    with db.write() as s:
        s.add(
            BaseModelEntry(
                name="demo-tiny-llama",
                source="/data/models/demo-tiny-llama",
                is_local=True,
                family="llama",
                parameters=4_300_000,
                has_chat_template=True,
                is_demo=True,
            )
        )
        dataset = Dataset(
            id=uuid.uuid4().hex,
            name="demo-chat",
            status=DatasetStatus.ready,
            rows=480,
            valid_rows=480,
            is_demo=True,
        )
        s.add(dataset)
    queue.register_worker(db, Worker(id="localhost-worker", host="localhost", pid=os.getpid()))

    def job(name: str) -> None:
        queue.enqueue(
            db, TrainConfig(name=name, base_model="demo-tiny-llama", dataset_id=dataset.id)
        )

    job("kettle facts, quick test")
    first = queue.claim_next_job(db, "localhost-worker", lease_seconds=3600)
    assert first is not None
    record(db, first, steps=120, total=120)
    assert queue.finish(db, first.job_id, first.attempt, JobStatus.succeeded)

    job("kettle facts, 3 epochs")
    running = queue.claim_next_job(db, "localhost-worker", lease_seconds=3600)
    assert running is not None
    record(db, running, steps=140, total=360)
    job("kettle facts, rank 32")
    job("kettle facts, lr 1e-4")


def test_every_nav_page_opens_from_the_dashboard(
    live_server, server_db, page, dialogs, screenshots
):
    arrange_a_busy_day(server_db)
    page.goto(live_server.url + "/")
    assert page.text_content("h1") == "Dashboard"
    assert "demo-tiny-llama" in page.text_content("main")
    page.screenshot(path=str(screenshots / "dashboard.png"))

    for link, heading in PAGES.items():
        page.click("a.brand")
        page.wait_for_url(live_server.url + "/")
        page.click(f"nav.nav ul a:text-is('{link}')")
        page.wait_for_selector(f"h1:has-text('{heading}')")
        assert page.text_content("h1").strip().startswith(heading), link
        assert page.get_attribute(f"nav a:text-is('{link}')", "aria-current") == "page"
        if link == "Jobs":
            page.wait_for_selector("#job-queue tr[data-status=running]")
            page.screenshot(path=str(screenshots / "jobs-page.png"))

    assert page.js_errors == []
    assert dialogs == []
