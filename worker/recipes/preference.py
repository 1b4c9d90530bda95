"""What the preference methods (DPO, ORPO) share: pairs as padding-free batches, and the
log-probability of each answer. Pairs become tokens as the token report counts them
(worker/preference_data.py).

A pair is a prompt and two answers. In a micro-batch each pair becomes two sequences, prompt +
chosen and prompt + rejected, and every sequence of every pair goes into ONE row with no padding
(`position_ids` restart per sequence, attention stays inside it: the packing SFT uses). The
log-probability of an answer is the sum over its tokens of log p(token | everything before),
computed from the last hidden states in slices of tokens with the output layer, each slice
recomputed in the backward pass instead of kept (worker.token_logps): the vocabulary-wide logits
of a whole batch (2 x 4,096 tokens x 128k vocabulary in fp32 is 4 GiB) never exist at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from worker.data import IGNORE_INDEX, pack_examples
from worker.errors import DatasetError
from worker.preference_data import TokenizedPair, tokenize_pair
from worker.token_logps import trained_token_logps
from worker.training.recipe import LoRARecipe


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    def notice(self, max_len: int) -> str:
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} pairs longer than {max_len} tokens were cut to fit")
        if self.dropped_lines:
            parts.append(
                f"{len(self.dropped_lines)} pairs were left out: an answer had no tokens left "
                f"after the cut (lines {', '.join(map(str, self.dropped_lines[:10]))})"
            )
        return "; ".join(parts) + "." if parts else ""


def tokenize_pairs(
    tokenizer: Any, rows: list[dict[str, Any]], max_seq_len: int, chat_template: str | None
) -> tuple[list[TokenizedPair], PairStats]:
    stats, pairs = PairStats(), []
    for row in rows:
        if not all(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
            raise DatasetError(
                f"Row {row.get('line')} is not a preference pair (prompt, chosen, rejected).",
                "Train this dataset with method sft, or upload a preference dataset.",
            )
        pair = tokenize_pair(tokenizer, row, max_seq_len, chat_template)
        if pair is None:
            stats.dropped_lines.append(row.get("line") or 0)
            continue
        stats.truncated += pair.truncated
        pairs.append(pair)
    stats.pairs = len(pairs)
    return pairs, stats


class PairCollator:
    """A micro-batch of pairs -> one padding-free row of 2 x pairs sequences, chosen then rejected
    per pair: `input_ids`, `labels` (the answers' tokens; -100 on prompts and on each sequence's
    first token), `position_ids`, the sequence bounds for packed attention, and `sequence_ids`
    (which sequence each token is in: 2i chosen, 2i + 1 rejected)."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(
            return_tensors="pt", return_flash_attn_kwargs=True
        )

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        pairs = [p for item in features for p in (item if isinstance(item, list) else [item])]
        sequences, lengths = [], []
        for pair in pairs:
            for answer in (pair.chosen_ids, pair.rejected_ids):
                ids = pair.prompt_ids + answer
                labels = [IGNORE_INDEX] * len(pair.prompt_ids) + answer
                sequences.append({"input_ids": ids, "labels": labels})
                lengths.append(len(ids))
        batch = self._flatten(sequences)
        batch["sequence_ids"] = torch.repeat_interleave(
            torch.arange(len(lengths)), torch.tensor(lengths)
        ).unsqueeze(0)
        batch["use_cache"] = False
        return batch


def answer_logps(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the answer's token log-probabilities, its token count) for every sequence of the
    batch, in `sequence_ids` order: shape (2 x pairs,) each."""
    token_logps, answer = trained_token_logps(model, batch)
    sequence = batch["sequence_ids"][:, 1:][answer]
    count = int(batch["sequence_ids"].max()) + 1
    sums = torch.zeros(count, device=token_logps.device, dtype=torch.float32)
    sums = sums.index_add(0, sequence, token_logps.float())
    tokens = torch.bincount(sequence, minlength=count).to(sums.dtype)
    return sums, tokens


class PreferenceRecipe(LoRARecipe):
    """The data side of DPO and ORPO, and the running figures both log."""

    FIGURES = (
        "rewards_chosen",
        "rewards_rejected",
        "reward_margin",
        "reward_accuracy",
        "eval_rewards_chosen",
        "eval_rewards_rejected",
        "eval_reward_margin",
        "eval_reward_accuracy",
    )
    NOTHING_LEFT_HINT = "Check that the pairs have both answers, or raise max_seq_len."
    train_examples: list[TokenizedPair] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Rewards of the micro-batches since the last logged row, per mode (see `record`).
        self._figures: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}

    def _prepare_data(self) -> None:
        cfg = self.config
        if self.train_examples is None:
            train_rows, eval_rows = self._rows()
            args = (cfg.max_seq_len, self.chat_template)
            self.train_examples, stats = tokenize_pairs(self.tokenizer, train_rows, *args)
            self.eval_examples, _ = tokenize_pairs(self.tokenizer, eval_rows, *args)
            if notice := stats.notice(cfg.max_seq_len):
                self.control.update(notice=notice)
        pairs = self.train_examples or []
        if not pairs:
            self.train_batches, self.eval_batches = [], []
            return
        if cfg.packing:  # pairs up to micro_batch_size x max_seq_len tokens a micro-batch
            budget = max(cfg.micro_batch_size * cfg.max_seq_len, *map(len, pairs))
            budget = max(budget, *map(len, self.eval_examples or [pairs[0]]))
            self.train_batches = pack_examples(pairs, budget, cfg.seed)
            self.eval_batches = pack_examples(self.eval_examples, budget, cfg.seed)
        else:  # micro_batch_size pairs a micro-batch, still without padding
            size = cfg.micro_batch_size
            self.train_batches = [pairs[i : i + size] for i in range(0, len(pairs), size)]
            evals = self.eval_examples
            self.eval_batches = [evals[i : i + size] for i in range(0, len(evals), size)]

    def _items_per_micro_batch(self) -> int:
        return 1  # a micro-batch is one list of pairs, whatever the packing

    def _collator(self) -> Any:
        return PairCollator()

    def _longest_batch(self) -> dict[str, torch.Tensor]:
        longest = max(self.train_batches, key=lambda b: sum(map(len, b)))
        return self._to_device(self._collator()([longest]))

    def _build_trainer(self) -> Any:
        trainer = super()._build_trainer()
        # The loss is a mean over the micro-batch's pairs: the Trainer divides it by the
        # accumulation steps (it would not for a model that takes a token count).
        trainer.model_accepts_loss_kwargs = False
        return trainer

    def record(self, model: Any, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Rewards of the micro-batch's pairs, kept (on the device, no sync) until the next row."""
        mode = "train" if model.training else "eval"
        self._figures[mode].append(torch.stack([chosen.detach(), rejected.detach()]).float())

    def logged_figures(self, mode: str) -> dict[str, float]:
        kept, self._figures[mode] = self._figures.get(mode, []), []
        if not kept:
            return {}
        chosen, rejected = torch.cat(kept, dim=1).cpu()
        prefix = "eval_" if mode == "eval" else ""
        return {
            f"{prefix}rewards_chosen": float(chosen.mean()),
            f"{prefix}rewards_rejected": float(rejected.mean()),
            f"{prefix}reward_margin": float((chosen - rejected).mean()),
            f"{prefix}reward_accuracy": float((chosen > rejected).float().mean()),
        }
