"""Browser tests: the system Chromium through Playwright, against a real server subprocess.

`live_server` is a `tests.live_server.LiveServer` on a free port over a tmp data dir (SIGKILL and
restart it with `.kill()` / `.start()`); `page` is a fresh Chromium page. No browser is downloaded:
without /usr/bin/chromium (or TUNEBOARD_CHROMIUM) the tests skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db import Database
from tests.live_server import LiveServer

CHROMIUM = os.environ.get("TUNEBOARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Module scope, not session: sync Playwright keeps an event loop running in this thread, which
# breaks later tests that run their own (TestClient, anyio).
@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "data", TUNEBOARD_SSE_KEEPALIVE_SECONDS="2").start()
    yield server
    server.stop()


@pytest.fixture
def server_db(live_server: LiveServer) -> Iterator[Database]:
    """The live server's database, opened the way a worker opens it."""
    database = Database(live_server.database_url)
    yield database
    database.dispose()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.js_errors = errors
    yield tab
    context.close()
