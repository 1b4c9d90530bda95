"""Attention over packed micro-batches: each example attends to itself only, at the cost of its
own length.

A packed micro-batch is one row holding several examples (worker.data.FlattenedBatchCollator).
transformers' `sdpa` path turns such a row into a dense [T, T] block-diagonal mask, and the kernel
then computes every (query, key) pair of the whole row: a row of 23 examples of ~350 tokens pays
for 8192^2 pairs instead of 23 x 350^2, and the mask itself is a T^2 tensor. Here the collator's
cumulative sequence lengths (`cu_seq_lens_q`, the names transformers' flash path uses) go to
PyTorch's own variable-length flash kernel (`torch.nn.attention.varlen`), with no mask at all:

* CUDA, bf16/fp16 (training): `varlen_attn`, causal inside each example;
* elsewhere (CPU, fp32): one causal `scaled_dot_product_attention` per example;
* a model that soft-caps its attention logits (Gemma-2), whose cap no flash kernel applies:
  worker.softcap_attention, a block of queries at a time, on either device;
* rows without `cu_seq_lens_q` (padded batches, generation): the stock `sdpa` path, unchanged, or
  for a soft-capping model the model's own eager path (with an eager mask), which caps.

Registered under NAME through transformers' AttentionInterface / AttentionMaskInterface, so a model
loaded with `attn_implementation=NAME` uses it in every decoder layer.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from typing import Any

import torch
import torch.nn.functional as F

NAME = "tuneboard_varlen"
SOFTCAPPED = "soft-capped attention per example, in blocks"  # the compute mode says so


def register() -> str:
    """Make NAME a valid `attn_implementation` in this process (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, packed_or_padded_mask)
    return NAME


def unsupported_reason(config: Any) -> str | None:
    """Why a model cannot use NAME (then the recipe takes `dense_implementation`), or None."""
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout has no varlen kernel"
    return None


def soft_caps(config: Any) -> bool:
    """Whether the model caps its attention logits (Gemma-2): worker.softcap_attention serves it."""
    return bool(getattr(config, "attn_logit_softcapping", None))


def dense_implementation(config: Any) -> str:
    """transformers' attention for what NAME does not take: `sdpa`, or `eager` for a model that
    soft-caps its attention logits (Gemma-2): sdpa has no soft-capping (transformers refuses it for
    such a model, and a kernel that skipped the cap would train a different model); eager caps."""
    return "eager" if soft_caps(config) else "sdpa"


def packed_or_padded_mask(**kwargs: Any) -> Any:
    """No mask for packed or unpadded rows (the kernel reads the sequence bounds); padded rows keep
    sdpa's mask and take the sdpa path below, or eager's (additive) for a soft-capping model."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import eager_mask, sdpa_mask

    if soft_caps(kwargs.get("config")):
        return eager_mask(**kwargs)
    return sdpa_mask(**kwargs)


def varlen_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None). A soft-capping
    model's rows without bounds (transformers' own forward pass) are each one example."""
    softcap = kwargs.get("softcap")
    batch, _, length, _ = query.shape
    if attention_mask is not None or (key.shape[2] != length if softcap else cu_seq_lens_q is None):
        return _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        dense = "eager" if softcap else "sdpa"
        raise ValueError(f"{NAME} has no attention dropout; load the model with {dense}")
    if cu_seq_lens_q is None:  # soft-capped rows without bounds: each row one example
        cu_seq_lens_q = torch.arange(0, batch * length + 1, length, device=query.device)
        max_length_q = length
    elif batch != 1:
        raise ValueError(f"{NAME} takes one packed row, got a batch of {batch}")
    q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (query, key, value))  # [B*T, H, D]
    max_length = int(max_length_q or length)
    window = getattr(module, "sliding_window", None)
    if softcap:
        from worker.softcap_attention import softcapped_attention

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = softcapped_attention(q, k, v, cu_seq_lens_q, max_length, scale, softcap, window)
    elif q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length, scaling, window)
    else:
        out = _per_example(q, k, v, cu_seq_lens_q, scaling, window)
    return out.view(batch, length, *out.shape[1:]), None


def _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """Padded rows and generation's shorter queries: transformers' sdpa, or for soft-capped
    logits the model's own eager function, which caps."""
    if not kwargs.get("softcap"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{NAME}: {type(module).__name__} has no eager attention to cap with")
    return eager(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _flash_varlen(q, k, v, cu_seq_lens, max_length, scale, window):
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    params = _parameters(varlen_attn)
    extra: dict[str, Any] = {"scale": scale}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # older API: give every query head its own copy of its key/value head
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if "window_size" in params:
        extra["window_size"] = (window - 1 if window else -1, 0)  # (-1, 0): causal
    else:  # torch 2.10: is_causal, no windows
        if window and window < max_length:
            raise ValueError(f"{NAME}: sliding-window attention needs torch >= 2.11")
        extra["is_causal"] = True
    return varlen_attn(q, k, v, cu, cu, max_length, max_length, **extra)


@functools.cache
def _parameters(function: Any) -> frozenset[str]:
    """The keyword arguments this torch's varlen_attn takes (it changed between 2.10 and 2.12)."""
    return frozenset(inspect.signature(function).parameters)


def _per_example(q, k, v, cu_seq_lens, scale, window):
    bounds = cu_seq_lens.tolist()
    pieces = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, L, D]
        mask = None
        if window and end - start > window:
            n = end - start
            i = torch.arange(n, device=q.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        out = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=ks.shape[1] != qs.shape[1],
        )
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)
