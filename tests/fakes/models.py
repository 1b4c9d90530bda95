"""A folder that looks like `save_pretrained` output (config.json, a tiny safetensors file and a
tokenizer config with a chat template), for registry tests that need no real weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
}


def make_model_dir(
    root: Path,
    config: dict[str, Any] | None = None,
    *,
    chat_template: bool = True,
    weights: bool = True,
) -> Path:
    """1000 x 64 + 64 parameters when `weights`; a ChatML-free placeholder template when asked."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    if chat_template:
        (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    if weights:
        save_file(
            {"embed": np.zeros((1000, 64), np.float32), "norm": np.zeros(64, np.float32)},
            str(root / "model.safetensors"),
        )
    return root
