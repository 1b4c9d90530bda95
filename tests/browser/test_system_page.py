"""The System page in a real browser at a laptop's width."""

from __future__ import annotations

import os

import pytest

from app import queue
from app.models import Worker
from devkit.live_server import LiveServer
from tests.fakes.judge import serving

pytestmark = pytest.mark.browser


def test_the_workers_table_fits_its_card_at_1400_pixels(live_server, server_db, page):
    queue.register_worker(
        server_db,
        Worker(
            id="gpu-box-with-a-long-hostname-worker",
            host="gpu-box-with-a-long-hostname.internal.example.org",
            pid=os.getpid(),
            gpus="0",
            gpu_name="NVIDIA H100 80GB HBM3",
            vram_total_mib=81_559,
            vram_used_mib=40_120,
            gpu_utilization=97,
            gpu_temperature=61,
        ),
    )
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(live_server.url + "/system")
    page.wait_for_selector("#workers")
    card = page.locator("#workers").locator("xpath=ancestor::div[contains(@class,'card')][1]")
    card_box = card.bounding_box()
    # The Heartbeat column, the table's last, is inside the card and visible.
    heartbeat = page.locator("#workers thead th").last
    assert heartbeat.text_content() == "Heartbeat"
    cell_box = heartbeat.bounding_box()
    assert cell_box["x"] + cell_box["width"] <= card_box["x"] + card_box["width"]
    table_box = page.locator("#workers").bounding_box()
    assert table_box["x"] + table_box["width"] <= card_box["x"] + card_box["width"]
    # Nothing else (the Disk card) sits over the table.
    right = cell_box["x"] + cell_box["width"] / 2, cell_box["y"] + cell_box["height"] / 2
    assert page.evaluate(
        "([x, y]) => document.elementFromPoint(x, y).closest('#workers') !== null", list(right)
    )
    assert page.js_errors == []


def test_check_the_judge_says_in_the_page_whether_it_answered(tmp_path, page, screenshots):
    """A judge that answers, then the same judge refusing the key: each click replaces the
    result, and the key is nowhere in the page."""
    key = "sk-judge-secret-0123456789"
    with serving() as judge:
        judge.key = key
        server = LiveServer(
            tmp_path / "data",
            TUNEBOARD_JUDGE_URL=judge.url,
            TUNEBOARD_JUDGE_MODEL="qwen2.5-7b-instruct",
            TUNEBOARD_JUDGE_API_KEY=key,
            TUNEBOARD_JUDGE_TIMEOUT_SECONDS="5",
        ).start()
        try:
            page.goto(server.url + "/system")
            page.click("text=Check the judge")
            answered = page.wait_for_selector("#judge-check .judge-answered")
            assert answered.text_content().startswith("The judge answered in ")
            page.locator("#judge").screenshot(path=str(screenshots / "system-judge.png"))
            judge.key = "another-key"
            page.click("text=Check the judge")
            refused = page.wait_for_selector("#judge-check .error-message")
            assert refused.text_content().startswith("The judge refused the key (HTTP 401)")
            assert page.locator("#judge-check .judge-answered").count() == 0
            assert key not in page.content()
        finally:
            server.stop()
    assert page.js_errors == []
