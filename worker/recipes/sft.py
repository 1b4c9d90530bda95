"""Supervised fine-tuning: learn to give the dataset's answers.

Read it top to bottom: the rows become tokenised examples with the chat template (loss on the
assistant's tokens unless `train_on: all`), packed without padding into micro-batches of about
`micro_batch_size x max_seq_len` tokens; the loss is the model's own cross-entropy. Everything
else, from loading the 4-bit base model to atomic checkpoints, is `LoRARecipe`'s
(worker/training/recipe.py).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from transformers import Trainer

from worker import token_logps
from worker.batch_shape import MAX_PADDING, REAL_TOKENS, PackedShape
from worker.control import LocalControl, RunControl
from worker.data import (
    FlattenedBatchCollator,
    PaddedBatchCollator,
    TokenizedExample,
    pack_examples,
    tokenize_rows,
)
from worker.errors import DatasetError
from worker.training.recipe import LoRARecipe
from worker.training.trainer import RecipeTrainer, TrainResult

__all__ = ["LocalControl", "RunControl", "SFTRecipe", "TrainResult"]


class SFTRecipe(LoRARecipe):
    train_examples: list[TokenizedExample] | None

    def _prepare_data(self) -> None:
        cfg = self.config
        if self.train_examples is None:
            train_rows, eval_rows = self._rows()
            args = (str(cfg.train_on), cfg.max_seq_len, self.chat_template, str(cfg.long_text))
            self.train_examples, stats = tokenize_rows(self.tokenizer, train_rows, *args)
            self.eval_examples, _ = tokenize_rows(self.tokenizer, eval_rows, *args)
            if notice := stats.notice(cfg.max_seq_len):
                self.control.update(notice=notice)
        if not self.train_examples:
            raise DatasetError(
                "No training examples are left after tokenisation.",
                "Check that rows have assistant replies, or raise max_seq_len.",
            )
        # Packing: micro-batches of up to micro_batch_size x max_seq_len real tokens, no padding.
        if cfg.packing:
            budget = cfg.micro_batch_size * cfg.max_seq_len
            longest = max(len(e) for e in self.train_examples + self.eval_examples)
            budget = max(budget, longest)
            self.train_batches = pack_examples(self.train_examples, budget, cfg.seed)
            self.eval_batches = pack_examples(self.eval_examples, budget, cfg.seed)
        else:
            self.train_batches, self.eval_batches = self.train_examples, self.eval_examples

    def _one_batch_shape(self) -> bool:
        """Packed, every micro-batch can take the fullest one's shape (worker.batch_shape) where
        the padding that takes is a small share: best-fit packing fills rows to a few percent.
        Unpacked, every example the same length and every micro-batch full."""
        if self.config.packing:
            return self._packed_shape.padding_share(self.train_batches) <= MAX_PADDING
        examples = self.train_batches
        full = len(examples) % self.config.micro_batch_size == 0
        return full and len({len(e) for e in examples}) == 1

    @cached_property
    def _packed_shape(self) -> PackedShape:
        """The fullest training micro-batch's shape, which every row can be padded to."""
        return PackedShape.of(self.train_batches)

    def _collator(self) -> Any:
        if self.config.packing:
            # Replayed as CUDA graphs, the layers take one shape: every row padded to it.
            shape = self._packed_shape if self.layer_graphs else None
            return FlattenedBatchCollator(shape, self.tokenizer.pad_token_id or 0)
        return PaddedBatchCollator(self.tokenizer.pad_token_id)

    def _longest_batch(self) -> dict[str, torch.Tensor]:
        if self.config.packing:
            batch = self._collator()([max(self.train_batches, key=lambda b: sum(map(len, b)))])
            batch.pop(REAL_TOKENS, None)
        else:
            longest = sorted(self.train_examples or [], key=len)[-self.config.micro_batch_size :]
            batch = self._collator()(longest)
        return self._to_device(batch)

    def batch_loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        if not model.training:  # evaluation: no whole batch's logits (worker.token_logps)
            return token_logps.mean_nll(model, batch)
        return model(**batch).loss

    def compute_loss(
        self,
        trainer: RecipeTrainer,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool,
        num_items_in_batch: Any,
    ) -> Any:
        if not model.training:
            return super().compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)
        # The Trainer's own: the model sums the token losses over the accumulated micro-batches.
        return Trainer.compute_loss(
            trainer,
            model,
            inputs,
            return_outputs=return_outputs,
            num_items_in_batch=num_items_in_batch,
        )
