"""What an export is, for both processes: its kinds, its quantisations, the file it makes, the disk
it needs and the base models llama.cpp's converter can make a GGUF of.

The web app checks a request, the base's architecture and the free disk with these before it queues
an export; the worker (worker/export.py) checks them again before it starts, and names its files
with them. Nothing here imports the ML stack: the converter's registry is read as text.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Literal

ExportKindName = Literal["gguf", "gguf-lora", "merged"]
Quantization = Literal["f16", "q8_0", "q4_K_M"]
# What llama.cpp's LoRA converter writes (`convert_lora_to_gguf.py --outtype`): no k-quants.
LORA_QUANTIZATIONS: tuple[str, ...] = ("f16", "q8_0")
# Bytes per weight in the file (GGUF blocks carry their scales: q8_0 is 34 bytes per 32 weights,
# q4_K_M about 4.85 bits per weight).
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q4_K_M": 4.85 / 8, "bf16": 2.0}
# A merged checkpoint held while the GGUF is written (bf16 for real models).
MERGED_BYTES_PER_WEIGHT = 2.0
# The llama.cpp whose converter builds GGUFs: the same pin as pyproject.toml's worker extra.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)")
_QUOTED = re.compile(r"[\"']([A-Za-z0-9_]+)[\"']")


def file_name(adapter_id: str, kind: str, quantization: str | None) -> str:
    """What the download is called (and the name the Ollama bundle's Modelfile points at)."""
    if kind == "merged":
        return f"{adapter_id}-merged"
    if kind == "gguf-lora":
        return f"{adapter_id}-lora-{quantization}.gguf"
    return f"{adapter_id}-{quantization}.gguf"


def estimate_bytes(kind: str, quantization: str | None, parameters: int, adapter_bytes: int) -> int:
    """The size of the finished export."""
    if kind == "gguf-lora":
        return adapter_bytes  # at most: the adapter's own weights are fp32 or bf16
    if kind == "merged":
        return int(parameters * MERGED_BYTES_PER_WEIGHT)
    return int(parameters * BYTES_PER_WEIGHT[quantization or "f16"])


def disk_needed(kind: str, quantization: str | None, parameters: int, adapter_bytes: int) -> int:
    """The free disk a build needs at its peak: the finished file, and for a GGUF of the merged
    model the merged checkpoint beside it (and the f16 GGUF that a k-quant is made from)."""
    final = estimate_bytes(kind, quantization, parameters, adapter_bytes)
    if kind == "gguf-lora":
        # The check converts the base to an f16 GGUF to load the LoRA onto.
        return final + int(parameters * BYTES_PER_WEIGHT["f16"])
    if kind == "merged":
        return final
    staging = int(parameters * MERGED_BYTES_PER_WEIGHT)
    if quantization == "q4_K_M":
        staging += int(parameters * BYTES_PER_WEIGHT["f16"])
    return final + staging


def converter_dir() -> Path:
    """Where `make setup` caches llama.cpp's converter scripts (worker/gguf_converter.py)."""
    return Path(sys.prefix) / "share" / "tuneboard" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def converter_architectures() -> frozenset[str] | None:
    """The `architectures` names (config.json) llama.cpp's converter has a class for, read from
    its `@ModelBase.register(...)` lines without importing it (it imports torch); None where the
    converter is not installed in this environment."""
    folder = converter_dir() / "conversion"
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file() or not folder.is_dir():
        return None
    names: set[str] = set()
    for source in sorted(folder.glob("*.py")):
        for arguments in _REGISTER.findall(source.read_text(encoding="utf-8")):
            names.update(_QUOTED.findall(arguments))
    return frozenset(names)


def base_architecture(source: str, registered: str) -> str:
    """A base model's `architectures[0]` from the config.json in its folder, or `registered`
    (the registry's copy, made when it was registered) for a hub id or an unreadable config."""
    config = Path(source) / "config.json"
    try:
        names = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        names = []
    return str(names[0]) if names and isinstance(names, list) else registered


def unsupported_architecture(architecture: str, base_name: str) -> tuple[str, str]:
    """(message, hint) for a base whose architecture the converter has no class for."""
    return (
        f"llama.cpp's GGUF converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) does not "
        f"support the architecture {architecture or '(none)'} of the base model {base_name}.",
        "Download the adapter (PEFT) or a merged model instead: both load with transformers.",
    )
