"""The model families Tuneboard is measured on, as their published architectures, and the same
architectures in miniature for CPU tests.

No model hub is reachable from the test or GPU machines, and throughput and memory do not depend on
the weight values, so the benchmark builds random-initialised models from these configs (the
values of each model's published `config.json` on the Hugging Face hub), and the tests build tiny
ones that keep every feature a kernel could trip on: Qwen2's biased q/k/v projections, Gemma-2's
GeGLU MLP, attention and final-logit soft-capping, query scaling, sliding windows on alternate
layers and tied embeddings.

    published_config("qwen2.5-7b")        # a transformers config, the real sizes
    tiny_config("gemma2", vocab_size=300)  # the same family, a few kilobytes of weights
    save_random_model(config, folder)      # random bf16/fp32 weights as safetensors
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What every Llama-3.x config.json shares; each model's own values follow.
_LLAMA3 = {
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def _llama3(rope_factor: float, **values: Any) -> dict[str, Any]:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": rope_factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return {**_LLAMA3, "rope_parameters": rope, **values}


# name -> (label, model_type, the published config.json's architecture values)
PUBLISHED: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-3.2-1b": (
        "Llama-3.2-1B",
        "llama",
        _llama3(
            32.0,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            head_dim=64,
            tie_word_embeddings=True,
        ),
    ),
    "llama-3.2-3b": (
        "Llama-3.2-3B",
        "llama",
        _llama3(
            32.0,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            tie_word_embeddings=True,
        ),
    ),
    "llama-3.1-8b": (
        "Llama-3.1-8B",
        "llama",
        _llama3(
            8.0,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2 hard-codes bias on q, k and v (not o); sliding windows are off (use_sliding_window).
    "qwen2.5-7b": (
        "Qwen2.5-7B",
        "qwen2",
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "hidden_act": "silu",
            "use_sliding_window": False,
            "sliding_window": 131072,
            "max_window_layers": 28,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
        },
    ),
    "mistral-7b-v0.3": (
        "Mistral-7B-v0.3",
        "mistral",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 32768,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "hidden_act": "silu",
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    # GeGLU (gelu tanh), soft-capped attention (50) and logits (30), queries scaled by 256^-0.5,
    # a 4,096-token window on every other layer, tied embeddings, 256k vocabulary.
    "gemma-2-9b": (
        "Gemma-2-9B",
        "gemma2",
        {
            "hidden_size": 3584,
            "intermediate_size": 14336,
            "num_hidden_layers": 42,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 256,
            "vocab_size": 256000,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "attention_bias": False,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
    ),
}

# One published model per family: what a tiny model of the family copies its features from.
FAMILY_MODELS = {
    "llama": "llama-3.2-1b",
    "qwen2": "qwen2.5-7b",
    "mistral": "mistral-7b-v0.3",
    "gemma2": "gemma-2-9b",
}

# Sizes of a tiny model: two layers, grouped-query attention, seconds on the CPU. The sliding
# window is shorter than the tests' packed rows, so windows are exercised.
_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 16384,
}
_TINY_WINDOW = 16


def architecture(name: str) -> dict[str, Any]:
    """A published model's config values (a copy), with `model_type`."""
    _label, model_type, values = PUBLISHED[name]
    return {"model_type": model_type, **{k: _copy(v) for k, v in values.items()}}


def label(name: str) -> str:
    return PUBLISHED[name][0]


def published_config(name: str) -> Any:
    """The transformers config of a published model's architecture."""
    return make_config(architecture(name))


def tiny_architecture(family: str, vocab_size: int) -> dict[str, Any]:
    """A family's published architecture with tiny sizes; every feature flag is the real one."""
    values = architecture(FAMILY_MODELS[family]) | _TINY | {"vocab_size": vocab_size}
    if values.get("sliding_window"):
        values["sliding_window"] = _TINY_WINDOW
    # A tiny random model's logits are far below Gemma-2's caps (50 and 30), where tanh is the
    # identity: caps at the scale of its logits make a path that skips them compute another loss.
    for cap, value in (("attn_logit_softcapping", 0.05), ("final_logit_softcapping", 0.2)):
        if values.get(cap):
            values[cap] = value
    if "query_pre_attn_scalar" in values:
        values["query_pre_attn_scalar"] = _TINY["head_dim"]
    if values.get("max_window_layers"):
        values["max_window_layers"] = _TINY["num_hidden_layers"]
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if values.get(token) is not None and values[token] >= vocab_size:
            values[token] = min(
                vocab_size - 1, {"bos_token_id": 1, "eos_token_id": 2}.get(token, 0)
            )
    return values


def tiny_config(family: str, vocab_size: int) -> Any:
    return make_config(tiny_architecture(family, vocab_size))


def save_random_model(config: Any, folder: Path, *, seed: int, dtype: Any = None) -> None:
    """Random weights of `config` saved as safetensors in `folder` (on the GPU when there is one:
    an 8B init takes seconds there; save_pretrained moves one shard at a time to the host)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    del model


def make_config(values: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value
