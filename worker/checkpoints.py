"""Checkpoints that are either complete or ignored.

The Trainer writes `checkpoint-<step>/`; once every file is on disk (fsync) we write a completion
marker last (fsync, then fsync the folder). Resume only ever picks a folder with its marker, so a
crash or a full disk mid-save can never hand a half-written checkpoint to the next attempt.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path

COMPLETE_MARKER = "tuneboard_complete.json"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# safetensors (Rust) keeps only the text of the OS error; torch.save's writer not even that.
DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
MIN_CHECKPOINT_BYTES = 1024 * 1024
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(checkpoint: Path, step: int, eval_loss: float | None) -> None:
    """fsync every file of `checkpoint`, then write its completion marker (last)."""
    for file in sorted(checkpoint.rglob("*")):
        if file.is_file():
            _fsync_path(file)
    marker = checkpoint / COMPLETE_MARKER
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump({"step": step, "eval_loss": eval_loss}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, marker)
    _fsync_path(checkpoint)


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(folder: Path) -> list[tuple[int, Path, float | None]]:
    """(step, path, eval loss) of every complete checkpoint, oldest first."""
    found: list[tuple[int, Path, float | None]] = []
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        step = checkpoint_step(path)
        marker = path / COMPLETE_MARKER
        if step is None or not marker.is_file():
            continue
        try:
            eval_loss = json.loads(marker.read_text(encoding="utf-8")).get("eval_loss")
        except (OSError, ValueError):
            continue
        found.append((step, path, eval_loss))
    return sorted(found, key=lambda item: item[0])


def newest_complete_checkpoint(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1][1] if found else None


def prune_checkpoints(folder: Path, keep_last: int = 2) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best by eval loss; remove the
    rest, and any incomplete folder older than the newest complete one."""
    found = complete_checkpoints(folder)
    keep = {path for _, path, _ in found[-keep_last:]}
    scored = [(loss, step, path) for step, path, loss in found if _finite(loss)]
    if scored:
        keep.add(min(scored)[2])
    newest = found[-1][0] if found else None
    for path in folder.iterdir() if folder.is_dir() else []:
        step = checkpoint_step(path)
        if step is None or path in keep:
            continue
        complete = (path / COMPLETE_MARKER).is_file()
        if complete or (newest is not None and step <= newest):
            shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(folder: Path) -> None:
    for path in folder.iterdir() if folder.is_dir() else []:
        if checkpoint_step(path) is not None and not (path / COMPLETE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a save into `folder` failed because its file system is full.

    An OSError carries ENOSPC/EDQUOT; safetensors raises its own error with only the OS message;
    torch.save's zip writer raises a RuntimeError with neither ("unexpected pos", "file write
    failed"), so for anything else ask the disk: full when less is free than one more checkpoint
    (the size of the newest complete one) needs.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen).lower() for text in DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    newest = newest_complete_checkpoint(folder)
    needed = max(folder_size(newest) if newest else 0, MIN_CHECKPOINT_BYTES)
    probe = folder if folder.exists() else folder.parent
    try:
        return shutil.disk_usage(probe).free < needed
    except OSError:
        return False
