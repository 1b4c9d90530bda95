"""worker.attention: packed rows attend per example, the same as a dense block-diagonal mask."""

import pytest
import torch
import torch.nn.functional as F

from worker import attention


def _packed(lengths, q_heads=4, kv_heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, q_heads, total, dim, generator=generator)
    k = torch.randn(1, kv_heads, total, dim, generator=generator)
    v = torch.randn(1, kv_heads, total, dim, generator=generator)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _dense_reference(q, k, v, cu, window=None):
    """The whole row at once: causal, block-diagonal by example, grouped heads repeated."""
    total = q.shape[2]
    example = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    i = torch.arange(total)
    mask = (example[:, None] == example[None, :]) & (i[:, None] >= i[None, :])
    if window:
        mask &= i[:, None] - i[None, :] < window
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


class _Layer:
    """What transformers' attention functions read from a decoder layer's attention module."""

    sliding_window = None
    is_causal = True
    num_key_value_groups = 2  # 4 query heads over 2 key/value heads


@pytest.mark.parametrize("window", [None, 3])
def test_packed_rows_match_a_dense_block_diagonal_mask_with_grouped_heads(window):
    q, k, v, cu = _packed([5, 1, 9, 4])
    layer = _Layer()
    layer.sliding_window = window
    out, weights = attention.varlen_attention(
        layer, q, k, v, None, cu_seq_lens_q=cu, max_length_q=9
    )
    assert weights is None
    assert out.shape == (1, q.shape[2], q.shape[1], q.shape[3])  # [1, T, H, D], as sdpa returns
    torch.testing.assert_close(out, _dense_reference(q, k, v, cu, window))


def test_without_sequence_bounds_it_is_plain_sdpa():
    q, k, v, _ = _packed([6])
    out, _ = attention.varlen_attention(_Layer(), q, k, v, None)
    torch.testing.assert_close(out, _dense_reference(q, k, v, torch.tensor([0, 6])))


def test_models_it_cannot_serve_keep_sdpa():
    class Config:
        attn_logit_softcapping = 50.0

    assert "soft-capping" in attention.unsupported_reason(Config())
    assert attention.unsupported_reason(object()) is None
