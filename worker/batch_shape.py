"""One shape for every packed micro-batch of a run, so that CUDA graphs (worker.layer_graphs) can
replay the decoder layers on variable-length data too.

A packed micro-batch is one row of examples (worker.data.FlattenedBatchCollator); rows differ in
tokens, in examples and in their longest example. `PackedShape.pad` gives each row the same
tokens (the run's fullest row's, plus a few where a row needs them) and the same count of
examples, with padding examples of one token to the run's longest example each (no label is
trained on them, and each attends only to itself, like any packed example), and tells the
attention kernel the run's longest example. Loss and gradients do not change. The padded tokens
cost their compute, so the recipe pads only where they are a small share (`MAX_PADDING`);
best-fit packing leaves a few percent.
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
    longest: int  # the longest example, and the most a padding example takes

    @classmethod
    def of(cls, batches: Sequence[Sequence[Sized]]) -> PackedShape:
        rows = [(sum(len(example) for example in batch), len(batch)) for batch in batches]
        longest = max(len(example) for batch in batches for example in batch)
        tokens = max(real for real, _ in rows)
        while True:
            # Every row's padding in as few examples as hold it (each at most `longest`)...
            examples = max(n + -(-(tokens - real) // longest) for real, n in rows)
            # ...and a token at least for each example a row adds: no empty examples, which
            # the varlen kernels need not handle. Longer rows for all where one is short.
            short = max(examples - n - (tokens - real) for real, n in rows)
            if short <= 0:
                return cls(tokens, examples + 1, longest)
            tokens += short

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
        count = self.bounds - len(bounds)  # the padding examples it takes
        if count < 0 or not count <= missing <= count * self.longest:
            return batch
        base, extra = divmod(missing, count) if count else (0, 0)
        chunks = [base + 1] * extra + [base] * (count - extra)
        ends = real + torch.tensor(chunks, dtype=torch.long).cumsum(0)
        padded_bounds = torch.cat([bounds, ends.to(bounds.dtype)])
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
