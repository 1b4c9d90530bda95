"""The input embeddings kept in pinned host memory, for a card that must checkpoint.

A model whose input embedding table is frozen and not shared with its output layer (Llama-3.1-8B:
128,256 x 4,096 in bf16, 0.98 GiB; Qwen2.5-7B 1.01 GiB) reads only a step's token rows from it.
Kept on the host, each forward pass gathers those rows there and copies them to the GPU (4,096
tokens at 8B: 32 MiB); the card gets the table's memory back for activations. Under an 8 GB card's
cap that GiB is the difference between offloading every layer's input to the host and keeping
them on the card (bench/RESULTS.md, session 13). The cost: the forward pass waits for the token
ids to reach the host, and the host gathers the rows.

Tied embeddings (Llama-3.2-1B/3B, Gemma) stay: the output layer reads the whole table every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HostEmbedding(nn.Module):
    """An `nn.Embedding` whose table lives in pinned host memory; its output is on `device`.
    The table is a plain attribute, not a parameter: `model.to(device)` must not bring it back,
    and nothing trains it."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.device = embedding.weight.device
        self.table = embedding.weight.detach().to("cpu")
        if self.device.type == "cuda":
            self.table = self.table.pin_memory()

    @property
    def weight(self) -> torch.Tensor:
        """The table (on the host), for code that reads an embedding's dtype or shape."""
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").reshape(-1)  # waits for the ids: the one sync it adds
        rows = torch.empty(
            (ids.numel(), self.embedding_dim),
            dtype=self.table.dtype,
            pin_memory=self.device.type == "cuda",
        )
        torch.index_select(self.table, 0, ids, out=rows)
        rows = rows.view(*input_ids.shape, self.embedding_dim)
        return rows.to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory"


def movable_bytes(model: Any) -> int:
    """The device memory that moving the input embeddings to the host would free; 0 where they
    cannot move: already moved, tied to the output layer, trained, or not a plain embedding."""
    base = _base(model)
    embedding = base.get_input_embeddings()
    output = base.get_output_embeddings()
    if (
        type(embedding) is not nn.Embedding
        or embedding.max_norm is not None
        or embedding.weight.requires_grad
        or (output is not None and output.weight.data_ptr() == embedding.weight.data_ptr())
    ):
        return 0
    return embedding.weight.numel() * embedding.weight.element_size()


def move_to_host(model: Any) -> int:
    """Moves the input embeddings to pinned host memory where they can move; returns the bytes
    freed on the card (0: nothing moved). The caller empties CUDA's cache to see them free."""
    freed = movable_bytes(model)
    if not freed:
        return 0
    base = _base(model)
    embedding = base.get_input_embeddings()
    host = HostEmbedding(embedding)
    # Hooks on the module stay, and their handles still remove them: reentrant checkpointing's
    # hook that makes the embeddings' output want a gradient (transformers registers it on the
    # module and removes it when checkpointing stops) must act on the new module too.
    for hooks in _HOOK_DICTS:
        setattr(host, hooks, getattr(embedding, hooks))
    base.set_input_embeddings(host)
    return freed


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
