"""The ML stack the GPU tests and benchmarks passed on (bench/RESULTS.md, "Versions"), and what
`make run` and the Docker image install, one set of pins a platform.

`tuneboard doctor` prints each installed version beside these and flags a difference. Change them
here, and only here, when the GPU machine's versions change and the GPU tests pass again.

`python3 app/verified_versions.py` (standard library only: the Makefile runs it before the
virtual environment exists) prints the pip requirements for this machine: on one whose
`nvidia-smi -L` lists a GPU, the torch, bitsandbytes and liger-kernel versions the GPU tests passed
on (PyPI's Linux torch wheel bundles its CUDA); elsewhere the CPU pin, which CI uses. Name a
platform (`nvidia` or `cpu`) to print its pins instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

GPU_VERIFIED: dict[str, str] = {
    "torch": "2.11.0+cu130",
    "CUDA": "13.0",
    "transformers": "5.17.0",
    "peft": "0.21.0",
    "bitsandbytes": "0.50.2",
    "liger-kernel": "0.8.5",
}
# Machines without an NVIDIA GPU (and CI): the torch the CPU tests run on.
CPU_TORCH = "2.13.0"


def release(version: str) -> str:
    """ "2.11.0+cu130" -> "2.11.0": the local build tag (CUDA or CPU) is checked on its own row."""
    return version.split("+")[0]


def pins(platform: str) -> list[str]:
    """The pip requirements `make run` and the image install first, for `platform`."""
    if platform == "nvidia":
        return [
            f"{name}=={release(GPU_VERIFIED[name])}"
            for name in ("torch", "bitsandbytes", "liger-kernel")
        ]
    if platform == "cpu":
        return [f"torch=={CPU_TORCH}"]
    raise ValueError(f"Unknown platform {platform!r}: name nvidia or cpu")


def this_platform() -> str:
    """nvidia when `nvidia-smi -L` lists a GPU, else cpu."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return "nvidia" if listed.returncode == 0 and "GPU" in listed.stdout else "cpu"


# The Liger kernels the GPU recipe uses (fused RMSNorm, RoPE, SwiGLU and linear cross-entropy): a
# run on a GPU without them says so in its compute mode, which the job page reads.
LIGER_MISSING = "without Liger kernels"
LIGER_INSTALL = f"pip install liger-kernel=={GPU_VERIFIED['liger-kernel']}"


if __name__ == "__main__":
    print(" ".join(pins(sys.argv[1] if len(sys.argv) > 1 else this_platform())))
