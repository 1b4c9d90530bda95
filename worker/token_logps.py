"""Log-probabilities of the trained tokens (labels not -100), from the last hidden states and the
output layer a slice of tokens at a time: the vocabulary-wide logits of a whole batch never exist
at once. SFT's evaluation, the preference methods' answers and the evaluation report use it.

Why slices: a packed row of 4,096 tokens with a 128k vocabulary has 1 GiB of bf16 logits, 2 GiB
once upcast for the loss and 2 more for its softmax. Liger's fused loss avoids that in training
only; an evaluation through the model's own loss built them on top of a step the memory policy
had fitted to the card, and a job on a small card ran out of memory in its final evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from worker.data import IGNORE_INDEX

# The fp32 logits of one slice: 512 tokens at a 128k vocabulary (their softmax as much again).
SLICE_BYTES = 256 * 1024**2


def trained_token_logps(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token | everything before) of every trained token, in order; where they are: a
    mask over `labels[:, 1:]`). Any other key of `batch` (position_ids, packed attention's
    sequence bounds, attention_mask) goes to the decoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {
        k: v
        for k, v in batch.items()
        if k not in ("labels", "sequence_ids", "input_ids", "use_cache")
    }
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], use_cache=False, **inputs
    ).last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    trained = targets != IGNORE_INDEX
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    logps = _sliced_logps(hidden[trained], head, targets[trained], softcap)
    return logps, trained


def mean_nll(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The mean negative log-likelihood of the trained tokens: the model's own loss, in slices."""
    logps, _ = trained_token_logps(model, batch)
    return -logps.float().sum() / max(logps.numel(), 1)


def _sliced_logps(
    hidden: torch.Tensor, head: Any, targets: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    pieces = []
    tokens = max(1, SLICE_BYTES // (4 * head.weight.shape[0]))
    for start in range(0, hidden.shape[0], tokens):
        end = start + tokens
        args = (hidden[start:end], head.weight, head.bias, targets[start:end], softcap)
        if torch.is_grad_enabled() and hidden.requires_grad:  # recomputed in the backward pass
            pieces.append(checkpoint(_token_logps, *args, use_reentrant=False))
        else:
            pieces.append(_token_logps(*args))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0)


def _token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, targets, reduction="none")
