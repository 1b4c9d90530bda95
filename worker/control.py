"""How a training run talks to whoever started it: stop requests in, job fields out.

The split: the interfaces a recipe sees live here (`RunControl`) and in worker/metrics.py
(`MetricsSink`), each with its in-process implementation for tests, the benchmark and scripts
(`LocalControl`, `ListSink`). The implementations a job runs with, backed by the queue, are in
worker/job_io.py (`DatabaseControl`, `DatabaseSink`, and the silent ones of ranks 1..N-1).
"""

from __future__ import annotations

from typing import Any, Protocol


class RunControl(Protocol):
    def should_stop(self) -> str | None:
        """ "cancel", "lease_lost" or "shutdown" to stop (after a checkpoint); None to go on."""
        ...

    def update(self, **fields: Any) -> None:
        """Job fields for the page: progress_step, progress_total, epoch, memory_policy,
        memory_policy_reason, compute_mode, notice."""
        ...


class LocalControl:
    """A RunControl for tests, the benchmark and scripts: keeps the fields, stops on request
    or once `stop_at_step` is reached."""

    def __init__(self, stop_at_step: int | None = None, reason: str = "cancel") -> None:
        self.fields: dict[str, Any] = {}
        self.stop_at_step = stop_at_step
        self.reason = reason
        self._stop: str | None = None

    def request_stop(self, reason: str = "cancel") -> None:
        self._stop = reason

    def should_stop(self) -> str | None:
        step = self.fields.get("progress_step")
        if self.stop_at_step is not None and step is not None and step >= self.stop_at_step:
            return self.reason
        return self._stop

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
