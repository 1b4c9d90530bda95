"""What an export is, for both processes: its kinds, its quantisations, the file it makes and the
disk it needs.

The web app checks a request and the free disk with these before it queues an export; the worker
(worker/export.py) checks the disk again before it starts, and names its files with them.
"""

from __future__ import annotations

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
