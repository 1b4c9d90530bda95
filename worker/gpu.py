"""GPU readings through NVML (nvidia-ml-py), without importing torch. None/empty on a CPU machine."""

from __future__ import annotations

import logging
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


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


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
