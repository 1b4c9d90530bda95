"""A dataset from the Hub through the Datasets page: the import form, the import's progress while
a real worker's side-work child loads it (`datasets.load_dataset`, offline, from a dataset cached
locally in the `datasets` cache layout), then the link to the new dataset, checked as an upload.
The page says that only cached datasets can be imported, and what went wrong for one that is not
cached."""

from __future__ import annotations

import re

from devkit.live_server import LiveServer
from tests.fakes.hub_cache import cache_hub_dataset
from tests.fakes.real_workers import RealWorkers, short_lease_settings

QA = {
    "question": ["Capital of France?", "2+2?", "Colour of the sky?"],
    "answer": ["Paris", "4", ""],  # row 3 has no answer: an error by line, as for an upload
}


def test_a_cached_hub_dataset_imports_through_the_page(browser, tmp_path):
    server = LiveServer(tmp_path / "data", TUNEBOARD_HF_OFFLINE="true").start()
    page = browser.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    workers = RealWorkers(short_lease_settings(server.data_dir, hf_offline=True), tmp_path)
    try:
        settings = short_lease_settings(server.data_dir)
        cache_hub_dataset(settings.layout.hf_datasets_cache, "acme/qa", {"train": QA})
        workers.start(TUNEBOARD_HF_OFFLINE="true")

        page.goto(server.url + "/datasets")
        assert "only datasets already in the cache can be imported" in page.inner_text(
            "#hub-import .hf-offline"
        )
        page.fill("#hub-id", "acme/qa")
        page.fill("#hub-name", "capitals")
        page.click("#hub-import details.advanced summary")
        page.fill("#hub-column-prompt", "question")
        page.fill("#hub-column-completion", "answer")
        page.click("form.hub-import-form button[type=submit]")
        # The import shows on the page, follows the worker, and ends with a link to the dataset.
        item = page.locator("li.hub-import").first
        item.locator("a.import-dataset").wait_for(timeout=90_000)
        assert "imported" in item.inner_text() and "(3 rows)" in item.inner_text()
        item.locator("a.import-dataset").click()
        page.wait_for_url(re.compile(r"/datasets/[0-9a-f]{32}$"))
        body = page.inner_text("main")
        assert "capitals" in body
        assert "Capital of France?" in body  # the preview of the normalised rows
        # The empty answer, reported by line and field as for an upload.
        error = page.locator("table.errors tbody tr").first
        assert error.locator("td").nth(0).inner_text() == "3"
        assert error.locator("td").nth(1).inner_text() == "answer"

        # An id that is not cached: the page says so, and what to do.
        page.goto(server.url + "/datasets")
        page.fill("#hub-id", "acme/elsewhere")
        page.click("form.hub-import-form button[type=submit]")
        failed = page.locator("li.hub-import[data-status=failed]").first
        failed.wait_for(timeout=60_000)
        assert "is not in the cache (TUNEBOARD_HF_OFFLINE is set" in failed.inner_text()
        assert "Import it once with the Hub reachable" in failed.inner_text()

        # A malformed id never reaches a worker: the form says what is wrong.
        page.fill("#hub-id", "../etc/passwd")
        page.click("form.hub-import-form button[type=submit]")
        assert "hub_id" in page.inner_text("[role=alert]")
        assert page.input_value("#hub-id") == "../etc/passwd"
        assert errors == []
    finally:
        workers.stop_all()
        page.close()
        server.stop()
