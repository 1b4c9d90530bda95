"""The evaluation report of a preference adapter: reward accuracy and margin of base and adapter
on held-out pairs, checked against a plain, unpacked forward pass of each answer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from app.train_config import TrainConfig
from tests.worker.test_preference import _pairs
from worker.evaluation import preference_figures
from worker.preference_data import tokenize_pair

BETA = 0.2


def _answer_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + answer_ids])
    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(picked[len(prompt_ids) - 1 :].sum())


def test_reward_accuracy_and_margin_of_base_and_adapter(demo_model, demo_dataset, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    rows = _pairs(demo_dataset)[:6]
    config = TrainConfig(dataset_id="0" * 32, method="dpo", beta=BETA, max_seq_len=256)
    steps = []
    base_figures, adapter_figures = preference_figures(
        SimpleNamespace(model=model), tokenizer, config, rows, lambda: steps.append(1)
    )
    assert len(steps) == len(rows) == base_figures["pairs"]

    margins, rewards, chosen_nll, tokens = [], [], 0.0, 0
    with torch.inference_mode():
        for row in rows:
            pair = tokenize_pair(tokenizer, row, 256)
            assert pair is not None
            with model.disable_adapter():
                ref = [
                    _answer_logp(model, pair.prompt_ids, a)
                    for a in (pair.chosen_ids, pair.rejected_ids)
                ]
            tuned = [
                _answer_logp(model, pair.prompt_ids, a)
                for a in (pair.chosen_ids, pair.rejected_ids)
            ]
            margins.append(ref[0] - ref[1])
            rewards.append(BETA * ((tuned[0] - ref[0]) - (tuned[1] - ref[1])))
            chosen_nll -= ref[0]
            tokens += len(pair.chosen_ids)
    assert base_figures["reward_accuracy"] == sum(m > 0 for m in margins) / len(rows)
    assert base_figures["reward_margin"] == pytest.approx(sum(margins) / len(rows), rel=1e-3)
    assert adapter_figures["reward_accuracy"] == sum(r > 0 for r in rewards) / len(rows)
    assert adapter_figures["reward_margin"] == pytest.approx(sum(rewards) / len(rows), rel=1e-2)
    assert base_figures["eval_loss"] == pytest.approx(chosen_nll / tokens, rel=1e-3)
