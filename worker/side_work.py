"""Work a worker does beside training: dataset token reports and adapter merges.

It runs in a thread of the worker loop but does the work in a child Python (`python -m
worker.dataset_report --pending`), so the loop process never imports the ML stack and a report
never waits behind the training job on the same worker. (Merges load the base on the CPU.)
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import select

from app.db import Database
from app.models import DatasetReport, MergeRequest
from app.settings import Settings

log = logging.getLogger("tuneboard.worker.side")

SIDE_TASK_TIMEOUT_SECONDS = 30 * 60

# (what, how to tell there is some, the child that does it)
TASKS: list[tuple[str, Any, list[str]]] = [
    ("dataset reports", DatasetReport, ["-m", "worker.dataset_report", "--pending"]),
    ("adapter merges", MergeRequest, ["-m", "worker.merge", "--pending"]),
]


def pending(db: Database, table: Any) -> int:
    with db.read() as s:
        return int(
            s.exec(select(func.count()).select_from(table).where(table.status == "pending")).one()
        )


def run_side_work(
    settings: Settings, db: Database, stopping: threading.Event, env: dict[str, str], log_path: Path
) -> None:
    """Until `stopping`: whenever a task has pending rows, run its child to completion."""
    while not stopping.is_set():
        for what, table, args in TASKS:
            try:
                if not pending(db, table):
                    continue
            except Exception:
                log.exception("could not look for pending %s", what)
                continue
            with log_path.open("ab") as out:
                try:
                    subprocess.run(
                        [sys.executable, *args],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        timeout=SIDE_TASK_TIMEOUT_SECONDS,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    log.error("%s took longer than %s s; stopped", what, SIDE_TASK_TIMEOUT_SECONDS)
        stopping.wait(settings.poll_seconds)
