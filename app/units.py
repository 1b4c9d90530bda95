"""Sizes and durations in the user's words, the same on the pages and in the messages a worker
writes (a side task stopped on a stall says how far it got)."""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def seconds_in_words(seconds: float) -> str:
    """`900` -> "15 minutes", `5400` -> "1.5 hours", `0.5` -> "0.5 seconds"."""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= 2 * size or seconds == size:
            amount = round(seconds / size, 1)
            return f"{amount:g} {unit}" + ("" if amount == 1 else "s")
    amount = round(seconds, 1)
    return f"{amount:g} second" + ("" if amount == 1 else "s")
