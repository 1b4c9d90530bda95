"""Keeps one worker process alive beside `tuneboard serve`, restarting it if it dies."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger("tuneboard.supervisor")


class WorkerSupervisor:
    def __init__(self, command: list[str], log_path: Path, *, stop_timeout: float = 90.0) -> None:
        self.command = command
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            with self.log_path.open("ab") as out:
                self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
                code = self.process.wait()
            if self._stopping.is_set():
                return
            # A worker that ran for a while gets restarted at once; one that keeps dying backs off.
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 60.0)
            log.warning(
                "worker exited with %s; restarting in %.0f s (see %s)", code, backoff, self.log_path
            )
            self._stopping.wait(backoff)

    def stop(self) -> None:
        """SIGTERM the worker (its job checkpoints and goes back to the queue), then wait."""
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout=5)
