"""Browser fixtures: the system Chromium driven by Playwright (never a downloaded browser; without
/usr/bin/chromium or TUNEBOARD_CHROMIUM the tests skip), against real uvicorn servers on free ports.

- `app_server`: one server for the session, with a side thread computing dataset reports as a
  worker would (`.url`, `.settings`, `.db`).
- `live_server`: a fresh `devkit.live_server.LiveServer` per test, which can be SIGKILLed and
  restarted (`.kill()` / `.start()`); `server_db` is its database.
- `screenshots`: the folder a test saves screenshots in (docs/ under `make screenshots`).
- `page`: a fresh page; `dialogs` lists every alert/confirm/prompt it opened (each dismissed, or
  accepted once a test sets `page.accept_dialogs = True`) and `page.js_errors` every uncaught
  script error.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.db import Database
from app.migrate import upgrade
from app.settings import Settings
from devkit.live_server import LiveServer

CHROMIUM = os.environ.get("TUNEBOARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT_POLL_SECONDS = 0.3
UVICORN = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
UVICORN += ["--host", "127.0.0.1", "--log-level", "warning"]


@dataclass
class AppServer:
    url: str  # e.g. http://127.0.0.1:41234
    settings: Settings  # the server's settings (its data dir is a temp folder)
    db: Database  # the server's database, for arranging and checking state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not answer at {url} within {timeout} s")


def _report_loop(settings: Settings, stop: threading.Event) -> None:
    from worker.dataset_report import run_pending_reports

    while not stop.is_set():
        run_pending_reports(settings, worker_id="browser-tests")
        stop.wait(REPORT_POLL_SECONDS)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """One server for a whole session: `uvicorn` serving create_app() on 127.0.0.1:<free port>, plus the dataset-report thread."""
    data_dir = tmp_path_factory.mktemp("live") / "data"
    port = _free_port()
    settings = Settings(data_dir=data_dir, database_url="", port=port)
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url)
    env = {**os.environ, "TUNEBOARD_DATA_DIR": str(data_dir), "TUNEBOARD_PORT": str(port)}
    env.pop("TUNEBOARD_DATABASE_URL", None)
    env.pop("DATABASE_URL", None)
    log = (data_dir / "server.log").open("wb")
    server = subprocess.Popen(
        [*UVICORN, "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    reports = threading.Thread(target=_report_loop, args=(settings, stop), daemon=True)
    db = Database(settings.resolved_database_url)
    try:
        _wait_until_up(url, server)
        reports.start()
        yield AppServer(url=url, settings=settings, db=db)
    finally:
        stop.set()
        if reports.is_alive():
            reports.join(timeout=30)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        db.dispose()


# Module scope, not session: Playwright's sync API keeps an asyncio loop running in this thread
# while it is open, and anyio/async tests collected after the browser tests cannot start their own.
@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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
def screenshots(tmp_path: Path) -> Path:
    """Where a test saves its screenshots: docs/, which the README shows, when
    TUNEBOARD_UPDATE_SCREENSHOTS=1 (`make screenshots`); else a temporary folder, so that a test
    run leaves the checkout clean."""
    if os.environ.get("TUNEBOARD_UPDATE_SCREENSHOTS") == "1":
        return REPO_ROOT / "docs"
    return tmp_path


@pytest.fixture
def dialogs() -> list[str]:
    """The messages of every dialog (alert, confirm, prompt) the `page` opened."""
    return []


@pytest.fixture
def page(browser, dialogs: list[str]) -> Iterator:
    """A fresh page in its own context; dialogs are recorded and dismissed (accepted while
    `page.accept_dialogs` is true), script errors kept in `page.js_errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.js_errors = errors
    tab.accept_dialogs = False

    def on_dialog(dialog) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        if tab.accept_dialogs:
            dialog.accept()
        else:
            dialog.dismiss()

    tab.on("dialog", on_dialog)
    yield tab
    context.close()
