"""Soft-capped attention (Gemma-2) over packed rows, a block of queries at a time, its backward pass
recomputing each block's probabilities instead of keeping them.

Gemma-2 caps every attention logit, `cap * tanh(score / cap)`, and no flash kernel in torch does
(sdpa, varlen). transformers' eager path does, over a dense [T, T] mask: a packed row of 4,096
tokens computes and keeps for the backward pass 16 heads x 4,096^2 probabilities per layer (0.5
GiB in bf16, and the pre-softmax logits beside them), whichever examples the row holds. Here, as
flash attention does it in one kernel, in plain torch:

* queries go in blocks of `block_size` rows; a block's keys are only those any of its queries can
  see: from `max_length - 1` (the row's longest example, a number the collator knows on the host)
  or the sliding window before its first query, to its last query. Which example each token is in
  comes from the cumulative lengths on the device, so nothing waits on the host (a CUDA graph can
  capture it);
* the forward pass keeps q, k and v, nothing of size T^2;
* the backward pass recomputes one block's logits and probabilities at a time.

In the inputs' dtype whatever autocast says, as transformers' eager path computes them: the
products, the cap and the probabilities (softmax and its backward pass accumulate in fp32 inside
their kernels, as eager's upcast softmax does). A block's logits pass through five kernels forward
(product, tanh, cap, mask, softmax) and a few more backward, each reading and writing bf16.
Grouped key/value heads are read once per group, not repeated.

    out = softcapped_attention(q, k, v, cu_seq_lens, max_length, scale, cap, window)
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK_ELEMENTS = 1 << 25  # one block's logits per head-row and key: 64 MiB in bf16


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
    cap: float,
    window: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (one packed row; Hq a multiple of Hkv), cu_seq_lens [n + 1]
    the examples' bounds -> [T, Hq, D]: causal inside each example, within `window` if given."""
    reach = min(max_length, window) if window else max_length
    if block_size is None:
        block_size = _block_size(q.shape[1], reach)
    return _SoftcappedAttention.apply(
        q, k, v, cu_seq_lens, int(reach), float(scale), float(cap), window, int(block_size)
    )


def _block_size(heads: int, reach: int) -> int:
    """The largest power of two (16 to 1,024) whose block's logits stay within BLOCK_ELEMENTS."""
    size = 1024
    while size > 16 and heads * size * (size + reach) > BLOCK_ELEMENTS:
        size //= 2
    return size


class _SoftcappedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, cu_seq_lens, reach, scale, cap, window, block_size):  # type: ignore[override]
        rows = _Rows(q, k, cu_seq_lens, reach, window, block_size)
        out = torch.empty_like(q)
        with _inputs_dtype(q):
            for (a, b, _), (_, _, vb), (_, probs) in rows.blocks(q, k, v, scale, cap):
                out[a:b] = rows.ungrouped(torch.bmm(probs, vb), b - a)
        ctx.save_for_backward(q, k, v, cu_seq_lens)
        ctx.settings = (reach, scale, cap, window, block_size)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, cu_seq_lens = ctx.saved_tensors
        reach, scale, cap, window, block_size = ctx.settings
        rows = _Rows(q, k, cu_seq_lens, reach, window, block_size)
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape[1], k.shape[0], k.shape[2], dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        with _inputs_dtype(q):
            for (a, b, lo), (qb, kb, vb), (tanh, probs) in rows.blocks(q, k, v, scale, cap):
                dob = rows.grouped_q(grad_out, a, b)
                dv[:, lo:b] += torch.bmm(probs.transpose(1, 2), dob)
                # softmax's backward (its row sums over the block's keys: every key a query sees)
                dlogits = torch._softmax_backward_data(
                    torch.bmm(dob, vb.transpose(1, 2)), probs, -1, probs.dtype
                )
                # through the cap: d(cap * tanh(s / cap)) / ds = 1 - tanh^2; the scale comes last
                dscores = torch.addcmul(dlogits, dlogits, tanh.square_(), value=-1)
                dq[a:b] = rows.ungrouped(torch.bmm(dscores, kb), b - a) * scale
                dk[:, lo:b] += torch.bmm(dscores.transpose(1, 2), qb)
        dk, dv = (g.transpose(0, 1).to(k.dtype) for g in (dk.mul_(scale), dv))
        return dq, dk, dv, None, None, None, None, None, None


def _inputs_dtype(t: torch.Tensor) -> Any:
    """Autocast off inside: every product and the softmax stay in the inputs' dtype. On CUDA
    autocast runs softmax in fp32 and products in bf16, so a backward pass run under it (as the
    CUDA graphs' warm-up does) handed softmax's backward bf16 gradients for fp32 probabilities."""
    return torch.autocast(t.device.type, enabled=False)


def _probabilities(qb, kb, scale, cap, allowed):
    """(tanh(score / cap), the softmax of the capped logits, what a query may not see left out)."""
    tanh = torch.bmm(qb * (scale / cap), kb.transpose(1, 2)).tanh_()
    capped = (tanh * cap).masked_fill_(~allowed, float("-inf"))
    return tanh, torch.softmax(capped, dim=-1)


class _Rows:
    """One packed row's blocks, its tokens' examples, and the grouped-heads views of a block."""

    def __init__(self, q, k, cu_seq_lens, reach, window, block_size):
        self.total, self.heads, self.kv_heads = q.shape[0], q.shape[1], k.shape[1]
        self.group = self.heads // self.kv_heads
        self.reach, self.window, self.block_size = reach, window, block_size
        self.positions = torch.arange(self.total, device=q.device)
        bounds = cu_seq_lens.to(device=q.device, dtype=torch.long)
        self.example = torch.searchsorted(bounds[1:], self.positions, right=True)  # [T]

    def blocks(self, q, k, v, scale, cap):
        """Each block of queries: (first query, end, first key), its grouped q, k and v, and
        `_probabilities` of them."""
        for a in range(0, self.total, self.block_size):
            b = min(a + self.block_size, self.total)
            lo = max(0, a - self.reach + 1)
            qb, kb, vb = (
                self.grouped_q(q, a, b),
                self.grouped_kv(k, lo, b),
                self.grouped_kv(v, lo, b),
            )
            yield (
                (a, b, lo),
                (qb, kb, vb),
                _probabilities(qb, kb, scale, cap, self.allowed(a, b, lo)),
            )

    def allowed(self, a: int, b: int, lo: int) -> torch.Tensor:
        """[1, G*C, L]: query i may see key j (same example, j <= i, within the window)."""
        qi, kj = self.positions[a:b, None], self.positions[None, lo:b]
        ok = (self.example[a:b, None] == self.example[None, lo:b]) & (kj <= qi)
        if self.window:
            ok &= qi - kj < self.window
        return ok.repeat(self.group, 1)[None]

    def grouped_q(self, t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """t[a:b] [C, Hq, X] -> [Hkv, G*C, X]: the queries of one key/value head side by side."""
        c = b - a
        return (
            t[a:b]
            .reshape(c, self.kv_heads, self.group, -1)
            .permute(1, 2, 0, 3)
            .reshape(self.kv_heads, self.group * c, -1)
        )

    def grouped_kv(self, t: torch.Tensor, lo: int, b: int) -> torch.Tensor:
        """t[lo:b] [L, Hkv, D] -> [Hkv, L, D]."""
        return t[lo:b].transpose(0, 1)

    def ungrouped(self, t: torch.Tensor, c: int) -> torch.Tensor:
        """[Hkv, G*C, D] -> [C, Hq, D] (the inverse of grouped_q)."""
        return (
            t.reshape(self.kv_heads, self.group, c, -1)
            .permute(2, 0, 1, 3)
            .reshape(c, self.heads, -1)
        )
