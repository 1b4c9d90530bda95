"""Health and machine facts for /healthz and the System page: database, workers, GPUs, disk."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import col, select

from app import faults
from app.db import Database
from app.models import Worker
from app.services.judge_check import judge_setup
from app.settings import Settings


@dataclass
class WorkerView:
    worker: Worker
    heartbeat_age_seconds: float
    alive: bool


def workers(db: Database, settings: Settings) -> list[WorkerView]:
    """Workers seen recently (stopped ones hidden after a lease period), newest heartbeat first."""
    now = datetime.now(UTC)
    with db.read() as s:
        rows = list(s.exec(select(Worker).order_by(col(Worker.heartbeat_at).desc())))
    views = []
    for w in rows:
        beat = w.heartbeat_at if w.heartbeat_at.tzinfo else w.heartbeat_at.replace(tzinfo=UTC)
        age = (now - beat).total_seconds()
        alive = not w.stopped and age < settings.lease_seconds
        if alive or age < 3600:
            views.append(WorkerView(worker=w, heartbeat_age_seconds=age, alive=alive))
    return views


def database_problem(db: Database, settings: Settings) -> dict[str, str] | None:
    """Why the database cannot be written now (code, message, hint), or None when a write probe
    commits. Run on every health check, so it waits at most a second for a busy write lock."""
    try:
        db.probe_write()
    except Exception as exc:
        fault = faults.classify(exc, settings)
        if fault is None:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            return {"code": "unreachable", "message": first_line, "hint": ""}
        return fault.to_json()["error"]
    return None


def health(db: Database, settings: Settings) -> dict[str, object]:
    problem = database_problem(db, settings)
    try:
        live = [w for w in workers(db, settings) if w.alive]
    except Exception:  # a database that cannot even be read: health still answers, degraded
        live = []
    state = "ok" if problem is None else "not writable"
    if problem is not None and problem["code"] in ("unreachable", "database_unreachable"):
        state = "unreachable"
    return {
        "status": "ok" if problem is None else "degraded",
        "database": state,
        "database_writable": problem is None,
        "database_problem": problem,
        "workers": len(live),
        "worker_heartbeat_age_seconds": (
            round(min(w.heartbeat_age_seconds for w in live), 1) if live else None
        ),
    }


def disk(settings: Settings) -> dict[str, int]:
    usage = shutil.disk_usage(settings.resolved_data_dir)
    return {"total_bytes": usage.total, "free_bytes": usage.free, "used_bytes": usage.used}


def facts(settings: Settings) -> dict[str, str]:
    url = settings.resolved_database_url
    shown = url.split("@")[-1] if "@" in url else url
    return {
        "python": platform.python_version(),
        "data_dir": str(settings.resolved_data_dir),
        "database": shown,
        "judge": judge_fact(settings),
    }


def judge_fact(settings: Settings) -> str:
    """The evaluation report's judge in one line (/api/system): its model and endpoint host,
    never its key, only whether one is set."""
    judge = judge_setup(settings)
    if not judge.configured:
        return "none (set TUNEBOARD_JUDGE_URL and TUNEBOARD_JUDGE_MODEL, or name one on a re-run)"
    key = "key set" if judge.key_set else "no key"
    return f"{judge.model} at {judge.host or 'a URL that is not http(s)'} ({key})"
