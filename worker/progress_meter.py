"""Progress from the steps of a side task that report none of their own.

The side loop stops a child whose task reports nothing new for TUNEBOARD_SIDE_TASK_STALL_SECONDS
(worker/side_work.py). Most steps count what they do (rows, steps, bytes saved), but a few run
inside a library that says nothing until it returns: `from_pretrained` (a download, then the
weights read), `save_pretrained`, llama.cpp's converter and quantiser, `datasets.load_dataset`.
`metered` runs such a step beside a thread that measures its work (bytes written to its output,
bytes this process has read) and writes it each time it passes its highest value so far, for the
watchdog and for the page. So a step that works is never taken for a stall, and one that hangs
is: a measure that counts only new highs cannot keep moving while the step gets nowhere.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from app.units import human_bytes

log = logging.getLogger("tuneboard.worker.progress")

POLL_SECONDS = 0.5
PROC_IO = Path("/proc/self/io")

# What a step tells how far it got: the task's progress fields (`side_queue.update_progress`'s).
WriteProgress = Callable[..., Any]


def nothing_said(**fields: Any) -> None:
    """The progress of a step run outside a side task (a test, a tool): heard by no one."""


def bytes_in(path: Path) -> int:
    """The size of a file, or of the files in a folder; 0 while it does not exist."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:  # a file renamed or removed while counted: the next look counts again
        return 0


def bytes_read() -> int:
    """The bytes this process has read so far: through read calls, from files and sockets (a
    download; `rchar`), and from the disk through mapped files (`read_bytes`: how safetensors
    weights are read). 0 where the system keeps no such counts."""
    try:
        counts = dict(line.split(": ") for line in PROC_IO.read_text().splitlines())
    except (OSError, ValueError):
        return 0
    return int(counts.get("rchar", 0)) + int(counts.get("read_bytes", 0))


def read_from_now() -> Callable[[], int]:
    """A measure of the bytes this process reads from now on."""
    start = bytes_read()
    return lambda: bytes_read() - start


def in_words(stage: str, verb: str, total: int = 0) -> Callable[[int], dict[str, Any]]:
    """The fields that say a metered amount in the stage: "converting to GGUF: 3.2 GB of about
    8.1 GB written"."""

    def fields(amount: int) -> dict[str, Any]:
        of = f" of about {human_bytes(total)}" if total else ""
        return {"stage": f"{stage}: {human_bytes(amount)}{of} {verb}"}

    return fields


@contextlib.contextmanager
def metered(
    progress: WriteProgress,
    measure: Callable[[], int],
    fields: Callable[[int], dict[str, Any]],
    every: float = POLL_SECONDS,
) -> Iterator[None]:
    """Run the block while a thread calls `progress(**fields(amount))` each time `measure()`
    passes its highest value so far. A write that fails (the claim went stale) ends the
    metering, never the step: the step's own next write says so."""
    done = threading.Event()

    def report() -> None:
        highest = 0
        while not done.wait(every):
            amount = measure()
            if amount > highest:
                highest = amount
                try:
                    progress(**fields(amount))
                except Exception as exc:  # e.g. the claim went stale, the user cancelled
                    log.info("progress not written (%s); metering stopped", type(exc).__name__)
                    return

    reporter = threading.Thread(target=report, name="progress-meter", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def reading(progress: WriteProgress, stage: str) -> contextlib.AbstractContextManager[None]:
    """Meter a step that reads (a model loaded, a dataset downloaded) by the bytes this process
    reads: "loading: 1.2 GB read"."""
    return metered(progress, read_from_now(), in_words(stage, "read"))


def writing(
    progress: WriteProgress, stage: str, path: Path, total: int = 0
) -> contextlib.AbstractContextManager[None]:
    """Meter a step that writes `path` (a file or a folder) by its size: "quantizing: 3.2 GB of
    about 8.1 GB written" (`total`: the size expected, 0 if unknown)."""
    return metered(progress, lambda: bytes_in(path), in_words(stage, "written", total))
