"""A merge or export child killed mid-way (as the OOM killer or a timeout would) is never left
"running": the worker's side-work loop requeues it and runs it again, or fails it clearly after its
last attempt, and a half-built export leaves no file offered. The real loop, the real children
(`python -m worker.merge`, `python -m worker.export`), the real demo adapter."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.playground.conftest import ADAPTER_ID

pytestmark = pytest.mark.slow

WAIT_SECONDS = 300  # a generous bound on a busy machine, not a timing assertion


@pytest.fixture
def web(pg_settings, pg_db, trained) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app(pg_settings), base_url="http://127.0.0.1") as client:
        yield client


@contextlib.contextmanager
def side_loop(pg_settings, pg_db) -> Iterator[None]:
    """The worker's side-work thread, as `tuneboard worker` runs it (CPU only)."""
    from worker.loop import child_environment
    from worker.side_work import run_side_work

    settings = pg_settings.model_copy(update={"poll_seconds": 0.1})
    stopping = threading.Event()
    env = child_environment(settings, "")
    log_path = settings.resolved_data_dir / "worker-side.log"
    thread = threading.Thread(
        target=run_side_work, args=(settings, pg_db, stopping, env, log_path), daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join(timeout=WAIT_SECONDS)


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    while not (found := check()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
    return found


def side_child(module: bytes = b"worker.merge") -> int | None:
    """The pid of this process's `python -m <module>` child, if it runs."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and module in cmdline:
            return int(proc.name)
    return None


MERGE_URL = f"/api/adapters/{ADAPTER_ID}/merge"


def kill_the_merge_mid_way(web: TestClient, asked: dict[str, Any]) -> dict[str, Any]:
    """SIGKILL the merge's child while the merge is running, and return the merge once it has
    finished (or fail the test if it stays unfinished)."""
    wait_for("the merge to run", lambda: web.get(MERGE_URL).json()["status"] == "running")
    os.kill(wait_for("the merge child", side_child), signal.SIGKILL)

    def finished() -> dict[str, Any] | None:
        merge = web.get(MERGE_URL).json()
        assert merge["id"] == asked["id"]
        return merge if merge["status"] in ("succeeded", "failed") else None

    return wait_for("the killed merge to be run again or failed (stuck at running?)", finished)


def test_a_killed_merge_child_is_requeued_and_the_merge_then_succeeds(web, pg_settings, pg_db):
    asked = web.post(MERGE_URL).json()
    with side_loop(pg_settings, pg_db):
        merge = kill_the_merge_mid_way(web, asked)
    assert merge["status"] == "succeeded", merge
    assert merge["attempt"] == 2
    assert "Attempt 1 was killed (SIGKILL" in merge["notice"]
    assert merge["output_dir"] and merge["progress_done"] == merge["progress_total"] > 0


def test_a_merge_killed_on_its_last_attempt_fails_with_the_reason_and_a_hint(
    web, pg_settings, pg_db
):
    from app.models import MergeRequest

    asked = web.post(MERGE_URL).json()
    with pg_db.write() as s:
        row = s.get(MergeRequest, asked["id"])
        row.max_attempts = 1
        s.add(row)
    with side_loop(pg_settings, pg_db):
        merge = kill_the_merge_mid_way(web, asked)
    assert merge["status"] == "failed" and merge["attempt"] == 1, merge
    assert merge["error_kind"] == "lost_worker"
    assert "was killed (SIGKILL" in merge["error_message"]
    assert "out of RAM" in merge["error_hint"]
    page = web.get(f"/partials/adapters/{ADAPTER_ID}/merge").text
    assert "was killed" in page and "Merge again" in page


EXPORTS_URL = f"/api/adapters/{ADAPTER_ID}/exports"
# The stages after the merge: a GGUF is being written or checked in the staging folder.
BUILDING = ("converting to GGUF", "quantizing", "checking the answers")


def kill_the_export_mid_build(web: TestClient, asked: dict[str, Any]) -> dict[str, Any]:
    """SIGKILL the export's child once it writes the GGUF, and return the export once it has
    finished (or fail the test if it stays "running")."""
    url = f"/api/exports/{asked['id']}"
    wait_for("the GGUF to be built", lambda: web.get(url).json()["stage"].startswith(BUILDING))
    os.kill(wait_for("the export child", lambda: side_child(b"worker.export")), signal.SIGKILL)

    def finished() -> dict[str, Any] | None:
        export = web.get(url).json()
        return export if export["status"] in ("succeeded", "failed") else None

    return wait_for("the killed export to be run again or failed (stuck at running?)", finished)


def test_a_killed_export_child_is_requeued_and_the_export_then_succeeds(web, pg_settings, pg_db):
    asked = web.post(EXPORTS_URL, json={"kind": "gguf", "quantization": "q8_0"}).json()
    with side_loop(pg_settings, pg_db):
        export = kill_the_export_mid_build(web, asked)
    assert export["status"] == "succeeded", export
    assert export["attempt"] == 2
    assert "Attempt 1 was killed (SIGKILL" in export["notice"]
    assert export["size_bytes"] > 0 and export["sha256"]
    download = web.get(f"/api/exports/{export['id']}/download")
    assert download.status_code == 200 and len(download.content) == export["size_bytes"]
    exports_dir = pg_settings.layout.exports_dir(1)
    assert not pg_settings.layout.export_staging(1, export["id"]).exists()
    assert [p.name for p in exports_dir.glob(f"{export['id']}-*")] == [
        f"{export['id']}-{ADAPTER_ID}-q8_0.gguf"
    ]
    assert web.delete(f"/api/exports/{export['id']}").status_code == 204


def test_an_export_killed_on_its_last_attempt_fails_and_offers_no_file(web, pg_settings, pg_db):
    from app.models import ModelExport

    asked = web.post(EXPORTS_URL, json={"kind": "gguf", "quantization": "f16"}).json()
    with pg_db.write() as s:
        row = s.get(ModelExport, asked["id"])
        row.max_attempts = 1
        s.add(row)
    with side_loop(pg_settings, pg_db):
        export = kill_the_export_mid_build(web, asked)
    assert export["status"] == "failed", export
    assert export["error"]["kind"] == "lost_worker"
    assert "was killed (SIGKILL" in export["error"]["message"]
    assert export["error"]["hint"]
    assert export["size_bytes"] == 0 and export["sha256"] is None
    assert web.get(f"/api/exports/{export['id']}/download").status_code == 404
    assert web.get(f"/api/exports/{export['id']}/ollama").status_code == 404
    # Neither a finished-looking file nor the half-built one is left in the exports folder.
    assert list(pg_settings.layout.exports_dir(1).glob(f"*{export['id']}*")) == []
    page = web.get(f"/partials/adapters/{ADAPTER_ID}/exports").text
    assert f'id="export-{export["id"]}"' in page and "was killed" in page
    assert f"/api/exports/{export['id']}/download" not in page
    assert web.delete(f"/api/exports/{export['id']}").status_code == 204
