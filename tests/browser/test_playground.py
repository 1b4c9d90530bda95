"""The playground in a real Chromium: compare an adapter with its base, tokens stream in."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.playground.conftest import (  # noqa: F401  (session fixtures shared with tests/playground)
    ADAPTER_ID,
    BASE,
    QUESTION,
    TRAINED_ANSWER,
    inference_server,
    pg_db,
    pg_settings,
    trained,
    web_server,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        assert dialogs == [] and errors == []
        browser.close()


def test_chat_through_the_page_in_compare_mode(page, web_server):  # noqa: F811
    page.goto(f"{web_server}/playground")
    page.select_option("select[name=model_a]", ADAPTER_ID)
    page.select_option("select[name=model_b]", BASE)
    page.click("#new-session button[type=submit]")
    page.wait_for_url(re.compile(r"/playground/sessions/\d+$"))

    page.click("details summary")
    page.fill("input[name=temperature]", "0")
    page.fill("input[name=max_new_tokens]", "200")
    page.fill("textarea[name=message]", QUESTION)
    page.press("textarea[name=message]", "Enter")

    panes = page.locator(".chat-pane")
    adapter_pane, base_pane = panes.nth(0), panes.nth(1)
    # Streaming: the assistant bubble exists (marked .streaming) before the answer is complete.
    page.wait_for_selector(".msg-assistant.streaming", timeout=60_000)
    # (No wait_for_function: the page's CSP forbids evaluating strings.)
    expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=120_000)
    assert adapter_pane.locator(".msg-assistant").inner_text().strip() == TRAINED_ANSWER
    base_text = base_pane.locator(".msg-assistant").inner_text()
    assert base_text.strip() and TRAINED_ANSWER not in base_text
    stats = base_pane.locator(".chat-stats").inner_text()
    match = re.search(r"first token (\d+) ms · ([\d.]+) tokens/s · (\d+) tokens", stats)
    assert match, stats
    assert int(match.group(3)) > 5  # tokens arrived one chunk at a time

    # A reload shows the kept conversation (continuable: the server holds the history).
    page.reload()
    assert TRAINED_ANSWER in adapter_pane.locator(".chat-output").inner_text()
