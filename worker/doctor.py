"""`python -m worker.doctor`: what the ML stack sees on this machine, as one JSON line.

Each check is (name, verdict, detail, hint), verdict one of OK, NOTE (works, but worth knowing) and
PROBLEM (`tuneboard doctor` exits non-zero).
"""

from __future__ import annotations

import importlib.metadata
import json

from app.verified_versions import GPU_VERIFIED, LIGER_INSTALL, release
from worker import gpu

Check = tuple[str, str, str, str]
INSTALL_WORKER = "pip install 'tuneboard[worker]'"


def checks() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [("torch", "PROBLEM", "not installed", INSTALL_WORKER)]
    cuda = torch.cuda.is_available()
    found = [
        versioned("torch", torch.__version__),
        versioned("CUDA", str(torch.version.cuda))
        if cuda
        else (
            "CUDA",
            "PROBLEM",
            "not available (a CPU build of torch, or no NVIDIA driver)",
            "Training runs on the CPU (slow, no 4-bit). Install a CUDA build of torch and "
            "an NVIDIA driver to train on a GPU.",
        ),
        *gpu_checks(cuda),
    ]
    try:
        import bitsandbytes

        found.append(versioned("bitsandbytes", bitsandbytes.__version__))
    except Exception as exc:  # bitsandbytes raises more than ImportError on a broken install
        found.append(
            (
                "bitsandbytes",
                "PROBLEM" if cuda else "NOTE",
                f"unavailable ({type(exc).__name__})",
                "4-bit QLoRA needs bitsandbytes: pip install bitsandbytes. Without it jobs "
                "use bf16 LoRA, which needs more VRAM.",
            )
        )
    for name, hint in (("transformers", INSTALL_WORKER), ("peft", INSTALL_WORKER)):
        try:
            found.append(versioned(name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            found.append((name, "PROBLEM", "not installed", hint))
    try:
        found.append(versioned("liger-kernel", importlib.metadata.version("liger-kernel")))
    except importlib.metadata.PackageNotFoundError:
        found.append(
            (
                "liger-kernel",
                "NOTE" if cuda else "OK",
                "not installed" if cuda else "not installed (only used on a GPU)",
                "The benchmarked GPU recipe fuses RMSNorm, RoPE, SwiGLU and the loss with "
                "Liger's kernels; without them each step is slower and the loss holds every "
                "micro-batch's logits (GiBs for a large vocabulary). `make run` installs it on a "
                f"machine with an NVIDIA GPU; or {LIGER_INSTALL}.",
            )
        )
    return found


def versioned(name: str, version: str) -> Check:
    """A version beside the one the GPU tests verified; a different release is a NOTE (it may
    well work, but nothing measured it)."""
    verified = GPU_VERIFIED[name]
    same = release(version) == release(verified)
    return (
        name,
        "OK" if same else "NOTE",
        f"{version} (GPU tests: {verified})",
        f"The GPU tests and benchmarks ran on {name} {verified}; this version is untested there.",
    )


def gpu_checks(cuda: bool) -> list[Check]:
    """One row per GPU with its memory and the driver, or one row saying there is none."""
    driver = gpu.driver_version()
    shown_driver = f"driver {driver}" if driver else "driver unknown"
    readings = gpu.machine_gpus()
    if readings:
        return [
            (f"GPU {i}", "OK", f"{r.name}, {r.total_mib / 1024:.1f} GiB, {shown_driver}", "")
            for i, r in enumerate(readings)
        ]
    if cuda:  # CUDA without NVML (nvidia-ml-py missing): torch still names the cards
        import torch

        cards = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return [
            (f"GPU {i}", "OK", f"{p.name}, {p.total_memory / 1024**3:.1f} GiB, {shown_driver}", "")
            for i, p in enumerate(cards)
        ]
    return [
        (
            "GPU",
            "PROBLEM",
            "none found (no NVIDIA GPU, or its driver does not answer)",
            "Jobs train on the CPU in fp32: fine for the demo model, too slow for real ones. "
            "On a machine with an NVIDIA GPU, `nvidia-smi` should list it.",
        )
    ]


if __name__ == "__main__":
    print(json.dumps({"checks": checks()}))
