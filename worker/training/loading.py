"""The base model for training: found (a folder or a hub id), its tokenizer, loaded in 4-bit NF4
with bf16 compute on CUDA (bf16 LoRA without bitsandbytes, fp32 on the CPU), the kernels that
apply to it (Liger, our fused LoRA MLPs and attention projections) and the LoRA adapter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# A hub id that is not cached must fail fast when the hub is unreachable (set before the hub
# client is imported; the operator's own values win).
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.train_config import Quantization, TrainConfig
from worker import attention, nf4
from worker.control import RunControl
from worker.data import use_chatml_if_missing
from worker.errors import DatasetError, ModelNotFound
from worker.fused_attention import fuse_attention
from worker.fused_mlp import fuse_mlps


def resolve_model(model_path: Path | str) -> str:
    """A local folder holding the model: the path itself, or the hub snapshot of an id."""
    path = Path(model_path)
    if path.exists():
        return str(path)
    try:  # a hub id: cached, or downloaded (fails fast offline: HF_HUB_OFFLINE, timeouts)
        from huggingface_hub import snapshot_download

        return snapshot_download(
            str(model_path),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as error:
        raise ModelNotFound(
            f"Model {model_path} is not on this machine and could not be downloaded "
            f"({type(error).__name__}).",
            "Register a local model folder, or download it once on a machine with access to "
            "the model hub (`hf download <id>`) and share the HF cache.",
        ) from error


def load_tokenizer(model_dir: str, chat_template: str | None) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    use_chatml_if_missing(tokenizer, chat_template)  # saved with the adapter: chat matches
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_dir: str,
    model_path: Path | str,
    config: TrainConfig,
    device: torch.device,
    world_size: int,
    attn_implementation: str,
) -> tuple[Any, str, Quantization | None]:
    """(the model, what runs in words, the quantization used: nf4 or None)."""
    on_cuda = device.type == "cuda"
    distributed = world_size > 1
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if on_cuda and config.quantization == "nf4" and bitsandbytes_available():
        from transformers import BitsAndBytesConfig

        quantization: dict[str, Any] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": torch.bfloat16,
        }
        if distributed:
            # FSDP flattens parameters of one dtype: packed 4-bit weights stored as bf16
            # shard alongside the bf16 norms and embeddings.
            quantization["bnb_4bit_quant_storage"] = torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
        kwargs.update(dtype=torch.bfloat16, device_map={"": device.index or 0})
        compute_mode = "4-bit NF4 QLoRA, bf16 compute"
    elif on_cuda:
        kwargs.update(dtype=torch.bfloat16, device_map={"": device.index or 0})
        compute_mode = "bf16 LoRA" + (
            " (bitsandbytes missing: no 4-bit)" if config.quantization == "nf4" else ""
        )
    else:
        # fp32: bf16 matmuls on most CPUs are slower and less accurate than fp32.
        kwargs.update(dtype=torch.float32)
        compute_mode = "fp32 LoRA on the CPU (no CUDA device)"
    quantization_used = Quantization.nf4 if "quantization_config" in kwargs else None
    if distributed:
        compute_mode += f", FSDP over {world_size} GPUs"
    try:
        # safetensors only: never unpickle weights a user's folder or the hub supplied.
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, **kwargs)
    except OSError as error:
        raise ModelNotFound(
            f"Could not load model weights from {model_path}: {error}",
            "The model folder needs config.json and *.safetensors weights.",
        ) from error
    # No prepare_model_for_kbit_training: it casts embeddings, norms and lm_head to fp32,
    # the largest single cost in memory and speed. Only the LoRA weights are fp32 (peft).
    model.config.use_cache = False
    return model, compute_mode, quantization_used


def attention_implementation(model_dir: str, packing: bool, control: RunControl) -> str:
    """Packed rows attend per example (worker.attention); otherwise, or for a model whose
    attention that path cannot compute, transformers' own (`attention.dense_implementation`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    dense = attention.dense_implementation(config)
    reason = attention.unsupported_reason(config)
    if packing and not reason:
        return attention.register()
    if reason and (packing or dense != "sdpa"):
        where = "Packed attention uses" if packing else "Attention uses"
        control.update(notice=f"{where} transformers' {dense} path with a dense mask: {reason}.")
    return dense


def missing_kernels(device: torch.device, distributed: bool) -> list[str]:
    """The kernel packages the benchmarked GPU recipe would use here but cannot import: on one
    CUDA device, liger-kernel (its fused loss and SwiGLU). Empty on the CPU and under FSDP, where
    the recipe does not use them."""
    if device.type != "cuda" or distributed:
        return []
    try:
        import liger_kernel.transformers.monkey_patch  # noqa: F401
    except Exception:  # not installed, or no triton for this GPU
        return ["liger-kernel"]
    return []


def apply_liger_kernels(
    model: Any, device: torch.device, distributed: bool, control: RunControl
) -> bool:
    """Fused RoPE / RMSNorm / SwiGLU / linear cross-entropy where liger has the architecture.
    True when applied."""
    # Liger's fused loss reads lm_head's weight directly; under FSDP that is a shard.
    if device.type != "cuda" or distributed:
        return False
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except Exception:  # not installed, or no triton for this GPU
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    try:
        _apply_liger_kernel_to_instance(model=model)
        return True
    except Exception as error:  # an architecture variant liger does not handle
        control.update(notice=f"Liger kernels not applied: {error}")
        return False


def attach_lora(model: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(config.seed)  # the LoRA initialisation
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets) if config.lora_targets else "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # a target module that this architecture lacks
        raise DatasetError(
            f"LoRA could not be attached: {error}",
            "Leave lora_targets empty to adapt every linear projection.",
        ) from error


def fuse_lora_layers(model: Any, distributed: bool) -> list[str]:
    """Each LoRA SwiGLU MLP as one autograd function (worker.fused_mlp: it keeps less and is
    faster with checkpointing, bench/RESULTS.md session 5) and each attention's LoRA projections
    as two (worker.fused_attention: less work for the host, session 9), their NF4 weights
    dequantised by one kernel each (worker.nf4, session 10). Not under FSDP, whose shards the
    functions would read as whole weights. Returns what was fused, for the job page's compute
    mode."""
    if distributed:
        return []
    fused = ["fused LoRA MLPs"] if fuse_mlps(model) else []
    fused += ["fused LoRA attention"] if fuse_attention(model) else []
    return fused + (["NF4 dequantised in one kernel"] if fused and nf4.runs_fused(model) else [])


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True
