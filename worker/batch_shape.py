"""One shape for every packed micro-batch of a run, so that CUDA graphs (worker.layer_graphs) can
replay the decoder layers on variable-length data too.

A packed micro-batch is one row of examples (worker.data.FlattenedBatchCollator); rows differ in
tokens, in examples and in their longest example. `PackedShape.pad` gives each row the run's
fullest row's tokens, with padding examples of at most the run's longest example (no label is
trained on them, and each attends only to itself, like any packed example), then pads the
examples' bounds (`cu_seq_lens`) with empty examples to one count, and sets the longest length
the attention kernel is told to the run's. Loss and gradients do not change: the padding is
masked out of the loss and no real token attends to it. It costs the padded tokens' compute, so
the recipe pads only where that is a small share (`MAX_PADDING`); best-fit packing leaves a few
percent.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch

from worker.data import IGNORE_INDEX

MAX_PADDING = 0.10  # the largest share of padded tokens worth a graph's gain (sessions 12-13)
REAL_TOKENS = "real_tokens"  # a padded batch's count of its own tokens (the job's tokens/s)


@dataclass(frozen=True)
class PackedShape:
    tokens: int  # every row's tokens
    bounds: int  # entries of `cu_seq_lens` (examples + 1)
    longest: int  # the longest example, and the longest padding example

    @classmethod
    def of(cls, batches: Sequence[Sequence[Sized]]) -> PackedShape:
        lengths = [[len(example) for example in batch] for batch in batches]
        tokens = max(sum(row) for row in lengths)
        longest = max(max(row) for row in lengths)
        bounds = 1 + max(len(row) + -(-(tokens - sum(row)) // longest) for row in lengths)
        return cls(tokens, bounds, longest)

    def padding_share(self, batches: Sequence[Sequence[Sized]]) -> float:
        """The share of the padded rows' tokens that padding would take."""
        real = sum(len(example) for batch in batches for example in batch)
        return 1 - real / (self.tokens * len(batches))

    def pad(self, batch: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
        """A collated packed row, padded to this shape; a row that does not fit it (an
        evaluation batch fuller than any training one) is returned as it is."""
        ids = batch["input_ids"]
        real = ids.shape[-1]
        bounds = batch["cu_seq_lens_q"]
        missing = self.tokens - real
        chunks = [self.longest] * (missing // self.longest)
        chunks += [missing % self.longest] if missing % self.longest else []
        if missing < 0 or len(bounds) + len(chunks) > self.bounds:
            return batch
        ends = real + torch.tensor(chunks, dtype=torch.long).cumsum(0)
        empty = torch.full((self.bounds - len(bounds) - len(chunks),), self.tokens)
        padded_bounds = torch.cat([bounds, ends.to(bounds.dtype), empty.to(bounds.dtype)])
        positions = [torch.arange(length, dtype=torch.long) for length in chunks]
        position_ids = batch["position_ids"]
        return {
            **batch,
            "input_ids": torch.cat([ids, ids.new_full((1, missing), pad_token_id)], dim=1),
            "labels": torch.cat([batch["labels"], ids.new_full((1, missing), IGNORE_INDEX)], 1),
            "position_ids": torch.cat(
                [position_ids, *(p.to(position_ids)[None] for p in positions)], 1
            ),
            "cu_seq_lens_q": padded_bounds,
            "cu_seq_lens_k": padded_bounds,
            "max_length_q": self.longest,
            "max_length_k": self.longest,
            REAL_TOKENS: real,
        }
