"""How long an attempt takes to start: from the claim to the end of its first optimizer step, in
parts (PERFORMANCE.md's target: no more than the model's load time + 10 s).

The recipe times its setup's parts (`part`), counts the memory policy's trial steps, and at the
end of the first optimizer step the whole goes on the job page (the job's `start_timing`, one
sentence) and to the benchmark (`as_dict`). What no part covers is the rest: the child process's
start and imports, reading the job, the Trainer's own setup.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class StartTiming:
    def __init__(self, began: float | None = None) -> None:
        self.began = time.time() if began is None else began  # the claim, or the setup's start
        self.from_claim = began is not None
        self.parts: dict[str, float] = {}  # in the order they ran, seconds
        self.trial_steps = 0
        self.first_step_s: float | None = None
        self.graph_capture_s: float | None = None  # worker.layer_graphs
        self.graph_capture_in = "first step"  # or the setup's part it ran in
        self._running: str | None = None
        self.total_s: float | None = None

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        start, self._running = time.perf_counter(), name
        try:
            yield
        finally:
            self._running = None
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def graphs_captured(self, seconds: float) -> None:
        self.graph_capture_s = seconds
        self.graph_capture_in = self._running or "first step"

    def first_step_done(self, step_seconds: float) -> None:
        self.first_step_s = step_seconds
        self.total_s = time.time() - self.began

    def summary(self) -> str:
        """e.g. "claim to first step 41.2 s: model load 30.1 s, memory policy 6.3 s (3 trial
        steps), tokenisation 1.2 s, first step 0.9 s, the rest 2.7 s"."""
        total = self.total_s or 0.0
        capture = None if self.graph_capture_s is None else f"capture {self.graph_capture_s:.1f} s"
        notes = {"memory policy": f"{self.trial_steps} trial steps", self.graph_capture_in: capture}
        first = self.first_step_s or 0.0
        named = [
            f"{name} {seconds:.1f} s" + (f" ({notes[name]})" if notes.get(name) else "")
            for name, seconds in [*self.parts.items(), ("first step", first)]
        ]
        rest = max(0.0, total - sum(self.parts.values()) - first)
        since = "claim" if self.from_claim else "setup"
        return f"{since} to first step {total:.1f} s: " + ", ".join(
            [*named, f"the rest {rest:.1f} s"]
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_s": self.total_s,
            "from": "claim" if self.from_claim else "setup",
            **{f"{name.replace(' ', '_')}_s": seconds for name, seconds in self.parts.items()},
            "trial_steps": self.trial_steps,
            "first_step_s": self.first_step_s,
            "graph_capture_s": self.graph_capture_s,
        }
