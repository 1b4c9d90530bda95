"""Direct Preference Optimization: learn which of two answers is better, staying near the base.

Read it top to bottom. Each micro-batch is pairs packed into one padding-free row
(worker/recipes/preference.py). The adapter's log-probability of each answer is compared with the
reference model's, and the reference is the same base model with the adapter switched off: no
second copy of the weights, one extra forward pass without gradients. The loss (TRL's
`DPOTrainer` is the reference implementation; a CPU test checks ours against it):

    sigmoid:  -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    ipo:      ((chosen - ref_chosen) / n_chosen - (rejected - ref_rejected) / n_rejected
               - 1 / (2 beta)) ** 2            (per-token averages, as TRL computes IPO)

averaged over the micro-batch's pairs. Rewards are beta * (answer - reference).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from worker.recipes.preference import PreferenceRecipe, answer_logps
from worker.training.memory_policy import checkpointing_paused


class DPORecipe(PreferenceRecipe):
    def batch_loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        beta, loss_type = float(self.config.beta or 0.1), str(self.config.loss_type or "sigmoid")
        logps, tokens = answer_logps(model, batch)
        with torch.no_grad(), self._reference(model):
            ref_logps, _ = answer_logps(model, batch)
        chosen = logps[0::2] - ref_logps[0::2]
        rejected = logps[1::2] - ref_logps[1::2]
        if loss_type == "ipo":
            delta = chosen / tokens[0::2].clamp(min=1) - rejected / tokens[1::2].clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * (chosen - rejected))
        self.record(model, beta * chosen, beta * rejected)
        return losses.mean()

    @contextlib.contextmanager
    def _reference(self, model: Any) -> Iterator[None]:
        """The base model: the adapter off, and nothing to checkpoint without gradients."""
        with model.disable_adapter(), checkpointing_paused(model):
            yield
