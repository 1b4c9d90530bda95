"""The side loop stops a side task on a stall, never on a fixed time: a child that keeps making
progress runs as long as it needs, and one that stops (with what it started) is killed after
TUNEBOARD_SIDE_TASK_STALL_SECONDS, its task failed saying how far it got and what to do.

Real child processes, run by the real `run_in_child` on a real SQLite file and PostgreSQL: the
token report's kind runs `tests/fakes/side_child.py`, which reports progress through the real
`side_queue` as each test says. The windows are seconds; nothing here asserts a speed."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app import side_queue
from app.db import Database
from app.main import create_app
from app.models import DatasetReport, SideWorkStatus
from app.settings import Settings
from tests.fakes.jobs import MODEL, add_dataset
from tests.fakes.side_child import GRANDCHILD_PID
from worker import side_work
from worker.loop import child_environment

# Longer than a child's start (a Python that imports the app) on a busy machine: before its first
# write a child reports nothing, as a real one does while it imports the ML stack.
STALL_SECONDS = 4.0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")


@pytest.fixture
def side(settings: Settings, any_db: Database, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The worker's settings (a quick renewal, a stall window of seconds), and the token report's
    kind run by the fake child."""
    monkeypatch.setitem(side_work.CHILDREN, "dataset_report", "tests.fakes.side_child")
    return settings.model_copy(
        update={
            "database_url": any_db.url,
            "heartbeat_seconds": 0.05,
            "side_task_stall_seconds": STALL_SECONDS,
        }
    )


def run_claimed_report(side: Settings, db: Database, child: str) -> DatasetReport:
    """Queue a token report, claim it as the side loop does and run it in the fake child (told
    `child`, see tests/fakes/side_child.py) until `run_in_child` returns; the report then."""
    dataset_id = add_dataset(db, side)
    with db.write() as s:
        s.add(DatasetReport(dataset_id=dataset_id, base_model=MODEL, max_seq_len=64))
    claim = side_queue.claim_next(db, "dataset_report", "test-worker", side.lease_seconds)
    assert claim is not None
    env = {**child_environment(side, ""), "FAKE_SIDE_CHILD": child}
    log_path = side.layout.side_work_log
    side_work.run_in_child(side, db, claim, env, log_path, threading.Event())
    with db.read() as s:
        found = s.get(DatasetReport, claim.task_id)
    assert found is not None
    return found


def test_a_child_that_keeps_making_progress_past_the_stall_window_finishes(side, any_db):
    # 40 steps, one every 0.2 s: twice the stall window in all, never a stall.
    report = run_claimed_report(side, any_db, "steps:40:0.2")
    assert (report.status, report.error_kind) == (SideWorkStatus.succeeded, None), report
    assert report.progress_done == report.progress_total == 40
    assert report.result == {"rows": 40}


def test_a_child_that_stops_making_progress_is_killed_and_its_task_fails_saying_so(side, any_db):
    started = time.monotonic()
    report = run_claimed_report(side, any_db, "stall:3")
    assert time.monotonic() - started >= STALL_SECONDS  # not before the window
    assert (report.status, report.error_kind) == (SideWorkStatus.failed, "stalled"), report
    assert report.error_message == (
        "The token report made no progress for 4 seconds (last: 3 of 3 rows tokenised) and was "
        "stopped."
    )
    assert "worker-side.log" in (report.error_hint or "")
    assert "raise TUNEBOARD_SIDE_TASK_STALL_SECONDS on the worker (now 4)" in (
        report.error_hint or ""
    )
    # The hung child is gone, and so is what it started.
    grandchild = int((side.layout.root / GRANDCHILD_PID).read_text())
    assert wait_until(lambda: not alive(grandchild)), "the child's own child still runs"
    # Not requeued: a stall is the task's, not the worker's, and another attempt would hang too.
    assert report.attempt == 1 and report.notice is None
    # The dataset page shows why, in those words.
    with TestClient(create_app(side), base_url="http://127.0.0.1") as web:
        page = web.get(f"/partials/datasets/{report.dataset_id}/report").text
    assert "made no progress for 4 seconds (last: 3 of 3 rows tokenised)" in page
    assert "TUNEBOARD_SIDE_TASK_STALL_SECONDS" in page


class FastClock:
    """The `time` the side loop reads, its monotonic clock running `speed` times faster than the
    real one (its sleeps are real)."""

    def __init__(self, speed: float) -> None:
        self.speed, self.start = speed, time.monotonic()

    def monotonic(self) -> float:
        return self.start + (time.monotonic() - self.start) * self.speed

    sleep = staticmethod(time.sleep)


def test_a_child_that_makes_progress_runs_past_the_old_thirty_minute_limit(
    side, any_db, monkeypatch
):
    """The side loop once stopped every task after 30 minutes. Its clock here runs 500 times
    faster: a child that makes progress for 6 seconds works for 50 minutes as the loop counts,
    and finishes."""
    monkeypatch.setattr(side_work, "time", FastClock(500))
    slow = side.model_copy(update={"side_task_stall_seconds": 2 * 3600.0})
    report = run_claimed_report(slow, any_db, "steps:30:0.2")
    assert (report.status, report.error_kind) == (SideWorkStatus.succeeded, None), report
    assert report.progress_done == 30


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds  # a bound for a busy machine, not a timing assertion
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(autouse=True)
def _no_stray_grandchild(side: Settings) -> Iterator[None]:
    """A failing test leaves no `sleep` behind."""
    yield
    pid_file = side.layout.root / GRANDCHILD_PID
    if pid_file.exists() and alive(pid := int(pid_file.read_text())):
        os.kill(pid, 9)
