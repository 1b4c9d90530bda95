"""A web process ingesting a Hub import holds it by a lease it renews, on a real SQLite file and
on PostgreSQL: an ingest slower than many leases keeps it, one whose process died is taken back
within a lease, and one that lost its claim (stopped past its lease) leaves the import and the
datasets as the process that took over left them.

The ingesting process is a real one (`tests/fakes/hooked_hub_ingest.py`, paused inside the real
ingest until the test lets it go); the worker's download is stood in for by the rows file and the
`side_queue` end it records, as `worker/hub_import.py` leaves them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from app import side_queue
from app.db import Database
from app.migrate import upgrade
from app.models import Dataset, HubImport, SideWorkStatus, utcnow
from app.services.datasets import hub
from app.settings import Settings
from tests.conftest import POSTGRES_URL
from tests.fakes.hooked_hub_ingest import GO, PAUSED

ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 0.6  # renewed every 0.2 s
ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def settings(request, tmp_path) -> Settings:
    s = Settings(
        data_dir=tmp_path / "data",
        database_url="" if request.param == "sqlite" else POSTGRES_URL,
        hf_offline=True,
        hub_import_ingest_lease_seconds=LEASE_SECONDS,
        hub_import_settle_seconds=0.05,
    )
    s.ensure_dirs()
    return s


@pytest.fixture
def db(request, settings) -> Iterator[Database]:
    if settings.database_url:
        yield request.getfixturevalue("pg_db")
        return
    upgrade(settings.resolved_database_url)
    database = Database(settings.resolved_database_url)
    yield database
    database.dispose()


def downloaded(db: Database, settings: Settings) -> int:
    """An import whose worker has written the rows and succeeded, as worker/hub_import.py ends."""
    import_id = hub.request_import(db, hub.HubImportRequest(hub_id="acme/alpaca-mini")).id
    assert import_id is not None
    claim = side_queue.claim_next(db, "hub_import", "test-worker", 60, import_id)
    assert claim is not None
    rows = settings.layout.hub_import_rows(import_id)
    rows.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert side_queue.finish(
        db,
        claim,
        SideWorkStatus.succeeded,
        stage="downloaded",
        progress_done=len(ROWS),
        progress_total=len(ROWS),
        rows_file=str(rows.relative_to(settings.layout.root)),
    )
    return import_id


class Ingesting:
    """A web process (a real child) ingesting the import, paused inside the ingest."""

    def __init__(self, settings: Settings, import_id: int, log: Path) -> None:
        self.root = settings.layout.root
        self.log = log
        env = {
            **os.environ,
            "TUNEBOARD_DATA_DIR": str(self.root),
            "TUNEBOARD_DATABASE_URL": settings.resolved_database_url,
            "TUNEBOARD_HUB_IMPORT_INGEST_LEASE_SECONDS": str(LEASE_SECONDS),
        }
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.fakes.hooked_hub_ingest", str(import_id)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: (self.root / PAUSED).exists() or self.process.poll() is not None)
        assert self.process.poll() is None, self.output()

    def go(self) -> None:
        (self.root / GO).touch()

    def finished(self) -> int:
        return self.process.wait(timeout=60)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return result


def the_import(db: Database, import_id: int) -> HubImport:
    with db.read() as session:
        task = session.get(HubImport, import_id)
    assert task is not None
    return task


def ended(db: Database, import_id: int) -> HubImport | None:
    task = the_import(db, import_id)
    return task if task.stage in ("done", "refused") else None


def dataset_ids(db: Database) -> list[str]:
    with db.read() as session:
        return list(session.exec(select(Dataset.id)))


def dataset_folders(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.datasets_dir.iterdir())


@pytest.fixture
def ingesting(settings, tmp_path) -> Iterator[Callable[[int], Ingesting]]:
    started: list[Ingesting] = []

    def start(import_id: int) -> Ingesting:
        started.append(Ingesting(settings, import_id, tmp_path / f"ingest-{len(started)}.log"))
        return started[-1]

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.send_signal(signal.SIGCONT)
            process.stop()


def test_an_ingest_slower_than_many_leases_keeps_its_import_and_makes_one_dataset(
    settings, db, ingesting
):
    from app.main import create_app

    import_id = downloaded(db, settings)
    first = ingesting(import_id)
    # Another web process: its settle task runs every 50 ms, and a page reads the import.
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        several_leases = time.monotonic() + 5 * LEASE_SECONDS
        while time.monotonic() < several_leases:
            assert hub.settle_waiting(db, settings) == []
            shown = client.get(f"/api/datasets/imports/{import_id}").json()
            assert shown["stage"] == "ingesting", shown
            time.sleep(LEASE_SECONDS / 4)
        first.go()
        assert first.finished() == 0, first.output()
        shown = client.get(f"/api/datasets/imports/{import_id}").json()
    assert shown["stage"] == "done", shown
    assert shown["url"] == f"/datasets/{shown['dataset_id']}"
    assert dataset_ids(db) == dataset_folders(settings) == [shown["dataset_id"]]
    assert not settings.layout.hub_import_rows(import_id).exists()
    assert the_import(db, import_id).lease_expires_at is None


def test_an_ingest_whose_web_process_died_is_taken_back_and_finishes(settings, db, ingesting):
    from app.main import create_app

    import_id = downloaded(db, settings)
    ingesting(import_id).stop()  # kill -9, inside the ingest: its lease stays in the row
    assert the_import(db, import_id).stage == "ingesting"
    # The restarted web server sweeps the dead one's half-made folder and, once the lease has
    # run out, takes the import back.
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        task = wait_for(lambda: ended(db, import_id))
        shown = client.get(f"/api/datasets/imports/{import_id}").json()
    assert task.stage == "done", task.ingest_error
    assert shown["url"] == f"/datasets/{task.dataset_id}"
    assert dataset_ids(db) == dataset_folders(settings) == [task.dataset_id]
    assert not settings.layout.hub_import_rows(import_id).exists()
    assert task.ingest_attempt == 2


def test_an_ingest_that_lost_its_claim_leaves_the_new_holders_outcome(settings, db, ingesting):
    import_id = downloaded(db, settings)
    first = ingesting(import_id)
    # Stop it just after a renewal (not inside a write), and wait until its lease runs out.
    leases = {the_import(db, import_id).lease_expires_at}
    wait_for(lambda: the_import(db, import_id).lease_expires_at not in leases, timeout=5)
    first.process.send_signal(signal.SIGSTOP)
    lease = the_import(db, import_id).lease_expires_at
    assert lease is not None
    wait_for(lambda: utcnow() > lease + timedelta(seconds=0.05))

    assert hub.settle_waiting(db, settings) == [import_id]  # this process takes it over
    taken = the_import(db, import_id)
    assert taken.stage == "done", taken.ingest_error
    assert taken.ingest_attempt == 2

    first.go()
    first.process.send_signal(signal.SIGCONT)
    assert first.finished() == 0, first.output()
    assert f"Hub import {import_id}: lost its claim" in first.output()
    after = the_import(db, import_id)
    assert (after.stage, after.dataset_id, after.ingest_error) == ("done", taken.dataset_id, None)
    assert dataset_ids(db) == dataset_folders(settings) == [taken.dataset_id]
    assert not settings.layout.hub_import_rows(import_id).exists()


def test_an_ingest_cut_short_again_and_again_is_refused_with_the_reason(settings, db):
    import_id = downloaded(db, settings)
    with db.write() as session:  # as web processes killed inside its every ingest leave it
        task = session.get(HubImport, import_id)
        assert task is not None
        task.stage, task.ingest_attempt = "ingesting", hub.INGEST_MAX_ATTEMPTS
        task.lease_expires_at = utcnow() - timedelta(seconds=1)
        session.add(task)
    assert hub.settle_waiting(db, settings) == [import_id]
    task = the_import(db, import_id)
    assert (task.stage, task.dataset_id) == ("refused", None)
    assert task.ingest_error == (
        "Ingesting the imported rows was cut short 3 times (the web server ingesting them stopped)."
    )
    assert "ran out of memory" in (task.ingest_hint or "")
    assert dataset_ids(db) == dataset_folders(settings) == []
    assert not settings.layout.hub_import_rows(import_id).exists()
