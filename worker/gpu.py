"""GPU readings through NVML (nvidia-ml-py), without importing torch. None/empty on a CPU machine.

The one NVML reader: the worker's heartbeat and doctor read whole cards by NVML's (physical)
index; a training run's metric rows read its own card by CUDA's index (`memory_mib`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReading:
    name: str
    total_mib: int
    used_mib: int
    utilization: int | None
    temperature: int | None


_initialised: Any | None = None


def _nvml() -> Any | None:
    """pynvml, initialised once per process; None without the package or a driver (asked again
    next time: a machine can gain a driver, and a failed import is cheap)."""
    global _initialised
    if _initialised is not None:
        return _initialised
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    _initialised = pynvml
    return pynvml


def parse_gpus(gpus: str) -> list[int]:
    """ "0,1" -> [0, 1]; "" -> [] (CPU)."""
    return [int(part) for part in gpus.split(",") if part.strip()]


def read_gpus(indices: list[int]) -> list[GpuReading]:
    """One reading per GPU index; [] when NVML is not available."""
    nvml = _nvml() if indices else None
    if nvml is None:
        return []
    readings = []
    try:
        for index in indices:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                utilization = None
            try:
                temperature = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            except Exception:
                temperature = None
            readings.append(
                GpuReading(
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_mib=int(memory.total // MIB),
                    used_mib=int(memory.used // MIB),
                    utilization=utilization,
                    temperature=temperature,
                )
            )
    except Exception:
        log.exception("could not read the GPUs through NVML")
        return []
    return readings


def used_mib(indices: list[int]) -> int | None:
    """Device memory in use on these GPUs (MiB, summed), or None on a CPU machine."""
    readings = read_gpus(indices)
    return sum(r.used_mib for r in readings) if readings else None


def physical_index(cuda_index: int) -> int:
    """NVML's number for the device CUDA calls `cuda_index` in this process: NVML numbers devices
    physically, and CUDA_VISIBLE_DEVICES may renumber them ("2,3": CUDA's 0 is NVML's 2)."""
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [part for part in visible if part]
    if not visible:
        return cuda_index
    if cuda_index >= len(visible) or not visible[cuda_index].isdigit():
        raise LookupError(f"CUDA device {cuda_index} is not a plain index in {visible}")
    return int(visible[cuda_index])


def memory_mib(cuda_index: int) -> tuple[float | None, float | None]:
    """(used, total) MiB of the whole device CUDA calls `cuda_index` (every process on it), or
    (None, None) where NVML cannot say: no driver, a MIG slice, a UUID in CUDA_VISIBLE_DEVICES."""
    nvml = _nvml()
    if nvml is None:
        return None, None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(physical_index(cuda_index))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:
        return None, None
    return memory.used / MIB, memory.total / MIB


def machine_gpus() -> list[GpuReading]:
    """Every NVIDIA GPU of this machine (CUDA_VISIBLE_DEVICES aside); [] without a driver."""
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception:
        return []
    return read_gpus(list(range(count)))


def driver_version() -> str | None:
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        version = nvml.nvmlSystemGetDriverVersion()
    except Exception:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)
