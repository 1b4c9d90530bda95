"""One worker per GPU on a host: an exclusive lock file per GPU index that a worker holds while it
lives, and that the children it starts (training, inference) hold with it. And one computation per
GPU: a second lock per GPU (`role="compute"`) that a training attempt holds while it runs, and an
evaluation report (worker/evaluation.py) while it runs, so the two never share a card.

The lock is `flock` on `<folder>/tuneboard-gpu-<index>.lock`, a folder every worker on the host
shares (the system temp folder unless `TUNEBOARD_GPU_LOCK_DIR` says otherwise). The kernel drops
it when the last process holding the open file is gone, so a SIGKILLed worker never leaves a stale
lock, and a training child that outlives its worker for a few seconds still holds it: a second
worker cannot start a job on the card until the first one's child has exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def lock_path(folder: Path | None, index: int, role: str = "") -> Path:
    name = f"tuneboard-gpu-{index}{'-' + role if role else ''}.lock"
    return (folder or Path(tempfile.gettempdir())) / name


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:  # another user's lock file: flock needs only a readable descriptor
        return os.open(path, os.O_RDONLY)


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@dataclass
class GpuLocks:
    """The locks of one worker's GPUs, taken in index order (two workers never deadlock)."""

    indices: list[int]
    folder: Path | None = None
    role: str = ""  # "": the worker's lock; "compute": the one computation's
    fds: list[int] = field(default_factory=list)

    def try_acquire(self) -> bool:
        """Take every lock now, or none (False) when another process holds one."""
        for index in sorted(set(self.indices)):
            path = lock_path(self.folder, index, self.role)
            fd = _open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.release()
                return False
            self._mark(fd)
        return True

    def acquire(
        self, stopping: threading.Event, on_wait: Callable[[int, Path, str], None] | None = None
    ) -> bool:
        """Take every lock, waiting while another worker holds one; False if `stopping` was set
        first. `on_wait(index, path, owner)` is called once per GPU it has to wait for."""
        for index in sorted(set(self.indices)):
            path = lock_path(self.folder, index, self.role)
            fd = _open(path)
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not told and on_wait is not None:
                        on_wait(index, path, _owner(path))
                        told = True
                    if stopping.wait(0.5):
                        os.close(fd)
                        self.release()
                        return False
            self._mark(fd)
        return True

    def _mark(self, fd: int) -> None:
        self.fds.append(fd)
        with contextlib.suppress(OSError):  # a read-only descriptor keeps the old owner line
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.role or 'worker'} pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
