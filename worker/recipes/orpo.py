"""Odds Ratio Preference Optimization: learn the chosen answer and prefer it, in one stage, with no
reference model.

Read it top to bottom. Each micro-batch is pairs packed into one padding-free row
(worker/recipes/preference.py). With p the per-token average log-probability of an answer, the
loss is the chosen answers' negative log-likelihood (their tokens only, averaged) minus beta times
the mean log sigmoid of the log odds ratio (the paper's lambda is our beta):

    log_odds = (p_chosen - p_rejected) - (log(1 - e^p_chosen) - log(1 - e^p_rejected))

TRL's ORPO trainer is the reference for the odds-ratio term (a CPU test checks it); its NLL term
also counts prompt tokens, ours the answers' only, as the ORPO paper writes it. Rewards are
beta * p, as TRL logs them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from worker.recipes.preference import PreferenceRecipe, answer_logps


class ORPORecipe(PreferenceRecipe):
    def batch_loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        beta = float(self.config.beta or 0.1)
        logps, tokens = answer_logps(model, batch)
        nll = -logps[0::2].sum() / tokens[0::2].sum().clamp(min=1)
        average = logps / tokens.clamp(min=1)
        chosen, rejected = average[0::2], average[1::2]
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        self.record(model, beta * chosen, beta * rejected)
        return nll - beta * F.logsigmoid(log_odds).mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 and far from it."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
