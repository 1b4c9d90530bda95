"""The queue page in a real browser: reorder and cancel queued jobs with its buttons (no worker
runs, so every job stays queued until the user acts)."""

from __future__ import annotations

import time

import pytest

from app import queue
from app.models import JobStatus
from app.services import jobs
from app.settings import Settings
from app.train_config import TrainConfig
from tests.fakes.jobs import MODEL, add_dataset

pytestmark = pytest.mark.browser

QUEUED_ROWS = "#job-queue section:has(h2:has-text('Queued')) tbody tr"


def page_order(page) -> list[int]:
    return [
        int(row.get_attribute("id").removeprefix("job-"))
        for row in page.query_selector_all(QUEUED_ROWS)
    ]


def db_order(db) -> list[int]:
    return [j.id for j in queue.list_jobs(db, [JobStatus.queued])]


def wait_for_order(page, db, expected: list[int], timeout: float = 10.0) -> None:
    """Poll from Python (the page's CSP forbids wait_for_function strings)."""
    deadline = time.monotonic() + timeout
    while page_order(page) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"page shows {page_order(page)}, expected {expected}")
        page.wait_for_timeout(100)
    assert db_order(db) == expected


def press(page, job_id: int, label: str) -> None:
    page.click(f"#job-{job_id} button:has-text('{label}')")


def test_queued_jobs_move_and_cancel_from_the_queue_page(live_server, server_db, page, dialogs):
    settings = Settings(data_dir=live_server.data_dir, database_url="")
    dataset_id = add_dataset(server_db, settings)
    a, b, c, d = (
        jobs.create_job(
            server_db,
            settings,
            TrainConfig(name=f"job {n}", base_model=MODEL, dataset_id=dataset_id),
        ).id
        for n in "abcd"
    )
    page.goto(live_server.url + "/jobs")
    assert page_order(page) == [a, b, c, d]

    press(page, c, "top")
    wait_for_order(page, server_db, [c, a, b, d])
    press(page, b, "↑")
    wait_for_order(page, server_db, [c, b, a, d])
    press(page, c, "↓")
    wait_for_order(page, server_db, [b, c, a, d])

    # Cancel asks first: saying no leaves the job queued.
    press(page, a, "Cancel")
    assert dialogs == [f"confirm: Cancel job {a}?"]
    page.wait_for_timeout(500)
    assert page_order(page) == [b, c, a, d]
    assert queue.get_job(server_db, a).status == JobStatus.queued

    page.accept_dialogs = True
    press(page, a, "Cancel")
    wait_for_order(page, server_db, [b, c, d])
    assert queue.get_job(server_db, a).status == JobStatus.cancelled
    finished = page.locator(f"#job-queue section:has(h2:has-text('Finished')) #job-{a}")
    assert finished.get_attribute("data-status") == "cancelled"
    assert dialogs == [f"confirm: Cancel job {a}?"] * 2
    assert page.js_errors == []
