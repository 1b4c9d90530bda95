"""worker/batch_shape.py: packed rows of different fill padded to one shape (what CUDA graphs
replay), with padding that trains nothing and attends only to itself."""

from __future__ import annotations

import itertools

import torch

from worker.batch_shape import REAL_TOKENS, PackedShape
from worker.data import FlattenedBatchCollator, TokenizedExample


def _example(length: int, start: int = 10) -> TokenizedExample:
    ids = list(range(start, start + length))
    return TokenizedExample(input_ids=ids, labels=ids)


def test_rows_of_different_fill_take_one_shape_and_keep_their_own_tokens():
    batches = [
        [_example(5), _example(3)],  # 8 tokens, the fullest
        [_example(4)],  # 4 tokens: padding in examples of at most 5 tokens
        [_example(2), _example(2), _example(1)],  # 5 tokens in 3 examples, the most
    ]
    # 8 tokens would leave the fullest row no token for the padding examples that bring it to
    # the others' count: every row gets 2 more.
    shape = PackedShape.of(batches)
    assert shape == PackedShape(tokens=10, bounds=5, longest=5)
    assert shape.padding_share(batches) == 1 - 17 / 30
    collate = FlattenedBatchCollator(shape, pad_token_id=0)
    plain = FlattenedBatchCollator()
    rows = [collate([batch]) for batch in batches]
    for row, batch in zip(rows, batches, strict=True):
        assert row["input_ids"].shape == row["labels"].shape == row["position_ids"].shape == (1, 10)
        bounds = row["cu_seq_lens_q"].tolist()
        assert len(bounds) == 5 and bounds[-1] == 10
        assert all(0 < end - start <= 5 for start, end in itertools.pairwise(bounds)), bounds
        assert row["max_length_q"] == row["max_length_k"] == 5
        unpadded = plain([batch])
        real = row[REAL_TOKENS]
        assert real == unpadded["input_ids"].shape[-1] == sum(map(len, batch))
        for key in ("input_ids", "labels", "position_ids"):  # the real tokens first, as they were
            assert torch.equal(row[key][:, :real], unpadded[key])
        assert (row["labels"][:, real:] == -100).all()  # padding trains nothing
        assert bounds[: len(unpadded["cu_seq_lens_q"])] == unpadded["cu_seq_lens_q"].tolist()
    # The 4-token row: three padding examples of 2 tokens, their positions each from 0.
    assert rows[1]["cu_seq_lens_q"].tolist() == [0, 4, 6, 8, 10]
    assert rows[1]["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 0, 1]]
    assert rows[0]["cu_seq_lens_q"].tolist() == [0, 5, 8, 9, 10]


def test_a_row_fuller_than_the_shape_is_left_as_it_is():
    shape = PackedShape.of([[_example(4)]])
    batch = FlattenedBatchCollator()([[_example(3), _example(3)]])  # 6 tokens (an eval batch)
    assert FlattenedBatchCollator(shape, 0)([[_example(3), _example(3)]]).keys() == batch.keys()
    assert shape.pad(batch, 0) is batch
