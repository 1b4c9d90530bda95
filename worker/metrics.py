"""Metric rows and where they go. One row per logging step, keys as in `app.models.Metric`."""

from __future__ import annotations

import sys
from typing import Any, Protocol

from worker import gpu

# A row's keys are `app.models.metric_columns()` (step, loss, ..., the preference rewards): a
# recipe sets those it measures, by those names. Extra keys ride along for the benchmark and the
# logs (the database sink keeps the Metric columns only, `tokens` among them):
# `tokens` real (non-padding) tokens and `step_seconds` time spent in optimizer steps since the
# previous row, `peak_vram_allocated_mib` since the previous row.
TIMING_KEYS = ("tokens", "step_seconds", "steps", "peak_vram_allocated_mib")


class MetricsSink(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...


class ListSink:
    """Keeps every row in memory (tests, the benchmark)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def flush(self) -> None:
        pass

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row.get("loss") is not None]

    @property
    def eval_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row.get("eval_loss") is not None]


MIB = 1024 * 1024


def process_rss_mib() -> float | None:
    """This process's resident memory (RSS) in MiB: what a CPU run uses in place of VRAM.

    Linux's /proc/self/status (VmRSS, in kB); elsewhere the peak RSS that getrusage reports."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


def vram_readings(device_index: int | None = None) -> dict[str, float | None]:
    """torch's allocated/reserved memory and the whole device's used/total (NVML), in MiB.

    Every value is None where it cannot be read (no CUDA, no NVML)."""
    readings: dict[str, float | None] = {
        "vram_allocated_mib": None,
        "vram_reserved_mib": None,
        "device_used_mib": None,
        "device_total_mib": None,
        "peak_vram_allocated_mib": None,
    }
    try:
        import torch
    except ImportError:
        return readings
    if not torch.cuda.is_available():
        return readings
    index = torch.cuda.current_device() if device_index is None else device_index
    readings["vram_allocated_mib"] = torch.cuda.memory_allocated(index) / MIB
    readings["vram_reserved_mib"] = torch.cuda.memory_reserved(index) / MIB
    readings["peak_vram_allocated_mib"] = torch.cuda.max_memory_allocated(index) / MIB
    used, total = gpu.memory_mib(index)
    readings["device_used_mib"], readings["device_total_mib"] = used, total
    return readings
