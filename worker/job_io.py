"""How a training child talks to the queue: its stop signal, its metric rows, its result file.

The queue-backed implementations of worker/control.py's `RunControl` and worker/metrics.py's
`MetricsSink` (the interfaces sit there with their in-process implementations):

- `DatabaseControl` is the recipe's RunControl: `should_stop()` says "cancel" (the user asked),
  "lease_lost" (another attempt owns the job now), "shutdown" (SIGTERM, or the worker died) or
  None; `update(**fields)` sets the job's progress fields. It polls the database at most once a
  `poll_seconds`, so a recipe may call it every step.
- `DatabaseSink` is the recipe's MetricsSink: rows are batched and written together at most every
  `flush_seconds` (or every `max_rows`), one short write transaction per batch.
- The result file (`DataLayout.attempt_result`) is how the child tells the worker loop how
  the attempt ended; the loop records it with the fenced queue operations.

Every write is fenced by the attempt: once one is refused, the attempt is stale and stops.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app import queue
from app.attempt_result import AttemptResult
from app.db import Database

log = logging.getLogger(__name__)

# Fields that change every step: coalesced and written at most once a `progress_seconds`.
FREQUENT_FIELDS = frozenset(
    {"progress_step", "progress_total", "epoch", "download_done_bytes", "download_total_bytes"}
)


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (0: not watched, True)."""
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_result(path: Path, result: AttemptResult) -> None:
    """Write the attempt's result atomically: the loop sees a whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(result.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_result(path: Path) -> AttemptResult | None:
    """The attempt's result, or None when there is none (or it is not one)."""
    try:
        return AttemptResult.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


class _ShutdownWatch:
    """SIGTERM (the worker is stopping), SIGINT or a dead worker: finish the step, checkpoint,
    exit. The part of a RunControl that every rank of a job has."""

    def __init__(self) -> None:
        self._shutdown = False
        # Under torchrun the parent is the launcher; the worker loop names itself instead.
        self._worker_pid = int(os.environ.get("TUNEBOARD_WORKER_PID") or 0)
        self._last_poll = -math.inf

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.request_shutdown())

    def request_shutdown(self) -> None:
        self._shutdown = True


class DatabaseControl(_ShutdownWatch):
    """RunControl backed by the queue: cancel and lease checks, progress fields, SIGTERM."""

    def __init__(
        self,
        db: Database,
        job_id: int,
        attempt: int,
        *,
        poll_seconds: float = 1.0,
        progress_seconds: float = 1.0,
    ) -> None:
        super().__init__()
        self.db, self.job_id, self.attempt = db, job_id, attempt
        self.poll_seconds = poll_seconds
        self.progress_seconds = progress_seconds
        self._reason: str | None = None  # "cancel" or "lease_lost": sticky once seen
        self._parent_pid = os.getppid()
        self._last_update = -math.inf
        self._pending: dict[str, Any] = {}

    def lose_lease(self) -> None:
        self._reason = "lease_lost"

    def should_stop(self) -> str | None:
        if self._reason is not None:
            return self._reason
        if self._shutdown:
            return "shutdown"
        now = time.monotonic()
        if now - self._last_poll < self.poll_seconds:
            return None
        self._last_poll = now
        if os.getppid() != self._parent_pid or not _alive(self._worker_pid):
            # The worker died (we were re-parented): nobody renews the lease any more. Checkpoint
            # and exit, so the GPU is free when the job is requeued.
            self._shutdown = True
            return "shutdown"
        try:
            self._reason = queue.stop_reason(self.db, self.job_id, self.attempt)
        except SQLAlchemyError:
            log.exception("could not read the job's stop flag; going on")
        return self._reason or ("shutdown" if self._shutdown else None)

    def update(self, **fields: Any) -> None:
        """Set progress fields. Per-step counters are coalesced; anything else is written now."""
        self._pending.update(fields)
        rare = set(fields) - FREQUENT_FIELDS
        if rare or time.monotonic() - self._last_update >= self.progress_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self._reason == "lease_lost":
            self._pending.clear()
            return
        fields, self._pending = self._pending, {}
        self._last_update = time.monotonic()
        try:
            if not queue.update_progress(self.db, self.job_id, self.attempt, **fields):
                self.lose_lease()
        except SQLAlchemyError:
            log.exception("could not write the job's progress; going on")


class DatabaseSink:
    """MetricsSink that writes rows in batches; a refused batch means the attempt is stale."""

    def __init__(
        self,
        db: Database,
        job_id: int,
        attempt: int,
        *,
        on_stale: Callable[[], None] | None = None,
        flush_seconds: float = 0.5,
        max_rows: int = 200,
    ) -> None:
        self.db, self.job_id, self.attempt = db, job_id, attempt
        self.on_stale = on_stale
        self.flush_seconds = flush_seconds
        self.max_rows = max_rows
        self.stale = False
        self.last_eval_loss: float | None = None
        self._rows: list[dict[str, Any]] = []
        self._last_flush = -math.inf

    def write(self, row: dict[str, Any]) -> None:
        if self.stale:
            return
        self._rows.append(dict(row))
        if row.get("eval_loss") is not None:
            self.last_eval_loss = float(row["eval_loss"])
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if due or len(self._rows) >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if self.stale or not self._rows:
            return
        self._last_flush = time.monotonic()
        try:
            ok = queue.record_metrics(self.db, self.job_id, self.attempt, self._rows)
        except SQLAlchemyError:
            # Keep the rows and try again with the next batch; the lease decides staleness.
            log.exception("could not write %d metric rows; will retry", len(self._rows))
            return
        if ok:
            self._rows = []
            return
        self._rows = []
        self.stale = True
        if self.on_stale is not None:
            self.on_stale()


class OtherRankControl(_ShutdownWatch):
    """The RunControl of ranks 1..N-1 of a multi-GPU job: it reads and writes nothing.

    Rank 0 talks to the queue; the recipe shares its stop decision with every rank each step.
    This control only reports SIGTERM (and a dead worker) as "shutdown".
    """

    def lose_lease(self) -> None:
        pass

    def should_stop(self) -> str | None:
        now = time.monotonic()
        if not self._shutdown and now - self._last_poll >= 1.0:
            self._last_poll = now
            self._shutdown = not _alive(self._worker_pid)
        return "shutdown" if self._shutdown else None

    def update(self, **fields: Any) -> None:
        pass

    def flush(self) -> None:
        pass


class OtherRankSink:
    """The MetricsSink of ranks 1..N-1: rank 0 writes the (already averaged) rows."""

    last_eval_loss: float | None = None

    def write(self, row: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass
