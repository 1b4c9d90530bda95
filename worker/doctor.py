"""`python -m worker.doctor`: what the ML stack sees on this machine, as one JSON line."""

from __future__ import annotations

import json


def checks() -> list[tuple[str, bool, str, str]]:
    found: list[tuple[str, bool, str, str]] = []
    try:
        import torch
    except ImportError:
        return [("torch", False, "not installed", "pip install 'tuneboard[worker]'")]
    found.append(("torch", True, torch.__version__, ""))
    cuda = torch.cuda.is_available()
    found.append(
        (
            "CUDA",
            cuda,
            torch.version.cuda or "CPU build" if cuda else "not available",
            "Training runs on the CPU (slow, no 4-bit). Install a CUDA build of torch and "
            "an NVIDIA driver to train on a GPU.",
        )
    )
    if cuda:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append(
                (
                    f"GPU {index}",
                    True,
                    f"{props.name}, {props.total_memory / 1024**3:.1f} GiB VRAM",
                    "",
                )
            )
    try:
        import bitsandbytes

        found.append(("bitsandbytes", True, bitsandbytes.__version__, ""))
    except Exception as exc:  # bitsandbytes raises more than ImportError on a broken install
        found.append(
            (
                "bitsandbytes",
                False,
                f"unavailable ({type(exc).__name__})",
                "4-bit QLoRA needs bitsandbytes: pip install bitsandbytes. Without it jobs "
                "use bf16 LoRA, which needs more VRAM.",
            )
        )
    try:
        import transformers

        found.append(("transformers", True, transformers.__version__, ""))
    except ImportError:
        found.append(("transformers", False, "not installed", "pip install 'tuneboard[worker]'"))
    return found


if __name__ == "__main__":
    print(json.dumps({"checks": checks()}))
