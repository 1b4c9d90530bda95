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


def _allowed(cu, window=None):
    """[T, T]: query i may see key j: causal, block-diagonal by example, within the window."""
    total = int(cu[-1])
    example = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    i = torch.arange(total)
    allowed = (example[:, None] == example[None, :]) & (i[:, None] >= i[None, :])
    if window:
        allowed &= i[:, None] - i[None, :] < window
    return allowed


def _dense_reference(q, k, v, cu, window=None):
    """The whole row at once: causal, block-diagonal by example, grouped heads repeated."""
    mask = _allowed(cu, window)
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


def test_models_it_cannot_serve_keep_sdpa_and_soft_capping_ones_it_serves():
    class Dropout:
        attention_dropout = 0.1

    class SoftCapping:
        attn_logit_softcapping = 50.0

    assert "dropout" in attention.unsupported_reason(Dropout())
    assert attention.unsupported_reason(SoftCapping()) is None
    assert attention.soft_caps(SoftCapping()) and not attention.soft_caps(object())
    assert attention.unsupported_reason(object()) is None


# Gemma-2: soft-capped logits (worker.softcap_attention), against transformers' own eager path.


class _GemmaLayer(_Layer):
    """What Gemma-2's attention module carries; its module's eager function is the fallback."""

    training = True
    head_dim = 8
    num_key_value_groups = 2


_GemmaLayer.__module__ = "transformers.models.gemma2.modeling_gemma2"


def _eager(q, k, v, mask, cap, window=None):
    """transformers' Gemma-2 eager attention with an additive mask -> [1, T, H, D]."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    layer = _GemmaLayer()
    layer.sliding_window = window
    return eager_attention_forward(layer, q, k, v, mask, scaling=0.35, softcap=cap)[0]


def _block_diagonal(cu, window=None):
    """`_allowed` as eager's additive mask [1, 1, T, T]."""
    allowed = _allowed(cu, window)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("block_size", [4, 1024])
def test_soft_capped_packed_rows_give_eager_s_output_and_gradients(window, block_size, monkeypatch):
    """Blocks smaller than an example and one block for the row; a cap (0.9) at the logits'
    scale, so tanh is far from the identity; grouped heads; a window shorter than examples."""
    from worker import softcap_attention

    monkeypatch.setattr(
        softcap_attention, "_block_size", lambda heads, reach: block_size
    )  # the row is small: the default would be one block
    q, k, v, cu = _packed([5, 1, 9, 4, 13], seed=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    layer = _GemmaLayer()
    layer.sliding_window = window
    out, _ = attention.varlen_attention(
        layer, q, k, v, None, scaling=0.35, cu_seq_lens_q=cu, max_length_q=13, softcap=0.9
    )
    reference = _eager(q, k, v, _block_diagonal(cu, window), 0.9, window)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(reference, (q, k, v), grad)
    for name, a, b in zip("qkv", ours, theirs, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, msg=name)
    # without the cap it would be another function: the test can tell them apart
    uncapped = _eager(q, k, v, _block_diagonal(cu, window), 1e6, window)
    assert not torch.allclose(out, uncapped, atol=1e-3)


def test_soft_capped_rows_without_bounds_are_each_one_causal_example():
    """A batch of unpadded rows (no mask, no bounds: transformers' own forward pass) is causal."""
    q, k, v, _ = _packed([7, 7], seed=4)
    rows = [t.view(t.shape[0], t.shape[1], 2, 7, t.shape[3]) for t in (q, k, v)]
    q2, k2, v2 = (t.squeeze(0).transpose(0, 1) for t in rows)  # [2, H, 7, D]
    out, _ = attention.varlen_attention(_GemmaLayer(), q2, k2, v2, None, scaling=0.35, softcap=0.9)
    causal = _block_diagonal(torch.tensor([0, 7]))
    torch.testing.assert_close(out, _eager(q2, k2, v2, causal, 0.9))


def test_soft_capped_padded_rows_and_generation_take_the_model_s_eager_path():
    """A padded batch's mask, as packed_or_padded_mask makes it for a soft-capping model, is
    eager's additive one, and the model's own eager function applies it (and the cap)."""
    from transformers import Gemma2Config
    from transformers.masking_utils import causal_mask_function

    config = Gemma2Config(attn_logit_softcapping=0.9)
    mask = attention.packed_or_padded_mask(
        batch_size=1, q_length=6, kv_length=6, mask_function=causal_mask_function,
        attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]).bool(), config=config, dtype=torch.float32,
    )  # fmt: skip
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 6, 6)
    assert mask[0, 0, 5, 0] < -1e30 and mask[0, 0, 5, 5] == 0  # additive: pads masked out
    q, k, v, _ = _packed([6], seed=5)
    out, _ = attention.varlen_attention(_GemmaLayer(), q, k, v, mask, scaling=0.35, softcap=0.9)
    torch.testing.assert_close(out, _eager(q, k, v, mask, 0.9))
    # one new query over a cache of six keys (generation): every key, no mask
    step, _ = attention.varlen_attention(
        _GemmaLayer(), q[:, :, -1:], k, v, None, scaling=0.35, softcap=0.9
    )
    torch.testing.assert_close(step, _eager(q[:, :, -1:], k, v, None, 0.9))


def test_soft_capped_attention_keeps_nothing_of_the_row_s_length_squared():
    """What the backward pass keeps grows with the row, not with its square: q, k, v, the
    output and one log-sum-exp per query and head."""
    from worker.softcap_attention import softcapped_attention

    def kept_bytes(total: int) -> int:
        q = torch.randn(total, 4, 8, requires_grad=True)
        k, v = (torch.randn(total, 2, 8, requires_grad=True) for _ in range(2))
        cu = torch.tensor([0, total // 2, total])
        sizes: list[int] = []

        def keep(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            softcapped_attention(q, k, v, cu, total // 2, 0.35, 0.9, block_size=64)
        return sum(sizes)

    small, large = kept_bytes(512), kept_bytes(2048)
    assert large <= 4 * small * 1.01  # linear in the row's length
    assert large < 4 * 2048 * 2048  # one head's [T, T] fp32 logits would be more than all of it


def test_soft_capped_attention_computes_in_its_inputs_dtype_under_autocast(monkeypatch):
    """Autocast is off inside, forward and backward: on CUDA it runs softmax in fp32 and the
    products in bf16, and a backward pass under it (the CUDA graphs' warm-up) handed softmax's
    backward bf16 gradients for fp32 probabilities (the GPU, 2026-12-07). On the CPU autocast
    leaves softmax alone, so what is checked is that no kernel of the function runs under it."""
    from worker.softcap_attention import softcapped_attention

    under_autocast: list[bool] = []

    def spying(fn):
        def spy(*args, **kwargs):
            under_autocast.append(torch.is_autocast_enabled("cpu"))
            return fn(*args, **kwargs)

        return spy

    q, k, v, cu = (t.bfloat16() if t.is_floating_point() else t for t in _packed([5, 9], seed=6))
    q, k, v = (t[0].transpose(0, 1).contiguous().requires_grad_(True) for t in (q, k, v))
    grad = torch.randn_like(q)
    plain = softcapped_attention(q, k, v, cu, 9, 0.35, 0.9, block_size=4)
    expected = (plain, *torch.autograd.grad(plain, (q, k, v), grad))

    monkeypatch.setattr(torch, "softmax", spying(torch.softmax))
    monkeypatch.setattr(torch, "_softmax_backward_data", spying(torch._softmax_backward_data))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = softcapped_attention(q, k, v, cu, 9, 0.35, 0.9, block_size=4)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    assert len(under_autocast) == 3 * 4  # 4 blocks: a softmax forward; again and its backward back
    assert not any(under_autocast)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b)
