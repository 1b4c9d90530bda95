"""A GGUF export from the adapter page in a real Chromium: the user picks q4_K_M, sees the build's
progress while the worker's side-work child (`python -m worker.export`) merges, converts and
quantises, then the export listed with its size, quantisation, sha256 and the check's verdict, and
downloads the GGUF and the Ollama bundle with its Modelfile."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
from playwright.sync_api import expect

from tests.browser.test_playground import page  # noqa: F401  (the Chromium page fixture)
from tests.playground.conftest import (  # noqa: F401  (session fixtures shared with tests/playground)
    ADAPTER_ID,
    dataset_rows,
    inference_server,
    pg_db,
    pg_settings,
    trained,
    web_server,
)
from tests.playground.test_side_work import side_loop

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BUILD_MS = 300_000  # a generous bound on a busy machine, not a timing assertion


@pytest.fixture
def side_worker(pg_settings, pg_db, dataset_rows):  # noqa: F811
    """Starts the worker's side-work loop (a real `python -m worker.export` child per export)."""
    return lambda: side_loop(pg_settings, pg_db)


def test_a_q4_k_m_gguf_export_from_the_adapter_page(page, web_server, side_worker, tmp_path):  # noqa: F811
    page.goto(f"{web_server}/adapters/{ADAPTER_ID}")
    expect(page.locator("#export-list")).to_contain_text("No exports yet")
    page.select_option("#export-kind", "gguf")
    page.select_option("#export-quantization", "q4_K_M")
    page.click("#exports form button[type=submit]")
    row = page.locator("#export-list tbody tr[id^=export-]").first
    expect(row).to_contain_text("q4_K_M")
    expect(row).to_contain_text("waiting for a worker")

    with side_worker():
        # Progress: the stage and a progress bar while the worker builds it.
        running = page.locator("#export-list tr[data-status=running]")
        expect(running.locator("progress")).to_be_visible(timeout=BUILD_MS)
        expect(running).to_contain_text("running: ")
        done = page.locator("#export-list tr[data-status=succeeded]")
        expect(done).to_have_count(1, timeout=BUILD_MS)

    export_id = int((done.get_attribute("id") or "").removeprefix("export-"))
    export = page.request.get(f"{web_server}/api/exports/{export_id}").json()
    cells = done.locator("td")
    assert cells.nth(0).inner_text() == "gguf" and cells.nth(1).inner_text() == "q4_K_M"
    assert cells.nth(2).inner_text().strip() == "succeeded"
    assert export["size_bytes"] > 0 and cells.nth(3).inner_text().strip()  # the size, e.g. "7.4 MB"
    assert done.locator("code.sha256").get_attribute("title") == export["sha256"]
    assert export["sha256"][:12] in cells.nth(4).inner_text()
    # The check's verdict, as the worker recorded it: the GGUF's greedy answers to the held-out
    # prompts next to the adapter's.
    verdict = {"match": "answers match", "differs": "answers differ"}[export["check"]["status"]]
    assert verdict in done.locator("td.check").inner_text()
    done.locator("td.check details summary").click()
    prompts = done.locator("td.check li")
    expect(prompts).to_have_count(len(export["check"]["details"]["answers"]))
    assert "adapter: The Zephyr Kettle" in prompts.first.inner_text()

    with page.expect_download() as got:
        done.get_by_role("link", name="Download").click()
    gguf = tmp_path / got.value.suggested_filename
    got.value.save_as(gguf)
    assert gguf.name == f"{ADAPTER_ID}-q4_K_M.gguf"
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == export["sha256"]

    with page.expect_download() as got:
        done.get_by_role("link", name="Ollama bundle (.zip)").click()
    bundle = tmp_path / got.value.suggested_filename
    got.value.save_as(bundle)
    with zipfile.ZipFile(bundle) as archive:
        assert set(archive.namelist()) == {gguf.name, "Modelfile", "README.md"}
        modelfile = archive.read("Modelfile").decode()
        assert archive.read(gguf.name) == gguf.read_bytes()
    assert f"FROM ./{gguf.name}" in modelfile and "<|im_start|>" in modelfile

    assert page.request.delete(f"{web_server}/api/exports/{export_id}").status == 204
