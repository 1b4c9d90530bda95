"""One worker per GPU on a host: an exclusive lock file per GPU index that a worker holds while it
lives, and that the children it starts (training, inference) hold with it.

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


def lock_path(folder: Path | None, index: int) -> Path:
    return (folder or Path(tempfile.gettempdir())) / f"tuneboard-gpu-{index}.lock"


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
    fds: list[int] = field(default_factory=list)

    def acquire(
        self, stopping: threading.Event, on_wait: Callable[[int, Path, str], None] | None = None
    ) -> bool:
        """Take every lock, waiting while another worker holds one; False if `stopping` was set
        first. `on_wait(index, path, owner)` is called once per GPU it has to wait for."""
        for index in sorted(set(self.indices)):
            path = lock_path(self.folder, index)
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
            self.fds.append(fd)
            with contextlib.suppress(OSError):  # a read-only descriptor keeps the old owner line
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"worker pid {os.getpid()}\n".encode(), 0)
        return True

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
