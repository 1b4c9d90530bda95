"""Each attention layer's LoRA projections as two autograd functions: q, k and v as one, o as one.

Through peft and bitsandbytes a LoRA projection is five or six autograd nodes (the 4-bit matmul,
lora_A, lora_B, a scale, an add, peft's clone), each with Python on the host in the forward pass,
the backward pass and, with checkpointing, the recompute; the profile of an 8B step showed the GPU
idle a quarter of the step waiting for the host (bench/RESULTS.md, session 9). Here

    q, k, v = x Wq^T + s (x Aq^T) Bq^T, ...   (one function: one input, three outputs)
    out     = a Wo^T + s (a Ao^T) Bo^T        (one function)

run under `no_grad` (worker.lora_projection), and each function's backward pass writes dx and every
dA, dB. They keep what peft keeps: the input once and the rank-r products.

The attention's own forward (transformers') still calls q_proj, k_proj and v_proj one after the
other on the same input: the first call computes all three and hands the other two to their
modules' calls, which take them only for that same input tensor (any other input: the module's
own path). An attention qualifies when its four projections carry one plain LoRA adapter each;
an adapter that is disabled or merged (the playground's "base model" answers) takes peft's path.

    fuse_attention(model)    # returns how many; unfuse_attention(model) undoes it
"""

from __future__ import annotations

from typing import Any

import torch

from worker.forward_swap import replace_forward, restore_all
from worker.lora_projection import (
    Projection,
    adapter_off,
    compute_dtype,
    is_plain_lora,
    project,
    project_back,
    projections_of,
)

_KEY = "_unfused_attention_forward"
QKV = ("q_proj", "k_proj", "v_proj")


def fuse_attention(model: Any) -> int:
    """Every qualifying attention layer of `model` runs its projections fused; returns how many."""
    unfuse_attention(model)
    count = 0
    for module in list(model.modules()):
        if not _qualifies(module):
            continue
        shared = _SharedQKV([getattr(module, name) for name in QKV])
        for name in QKV:
            replace_forward(getattr(module, name), _QKVForward(shared, name), _KEY)
        replace_forward(module.o_proj, _OutputForward(module.o_proj), _KEY)
        count += 1
    return count


def unfuse_attention(model: Any) -> None:
    restore_all(model, _KEY)


def _qualifies(module: Any) -> bool:
    names = (*QKV, "o_proj")
    return all(is_plain_lora(getattr(module, name, None)) for name in names)


class _SharedQKV:
    """The three projections of one attention, and the outputs computed but not yet taken."""

    def __init__(self, modules: list[Any]) -> None:
        self.modules = modules
        self.input: torch.Tensor | None = None
        self.waiting: dict[str, torch.Tensor] = {}

    def take(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if x is self.input and name in self.waiting:
            out = self.waiting.pop(name)
            if not self.waiting:
                self.input = None
            return out
        q, k, v = self.compute(x)
        self.input, self.waiting = x, dict(zip(QKV, (q, k, v), strict=True))
        return self.take(name, x)

    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        projections, lora = projections_of(self.modules)
        with torch.no_grad():
            outputs, saved = _qkv_forward(x, projections)
        if not torch.is_grad_enabled():  # evaluation, or a checkpointed layer's first pass
            return outputs
        return _LoraQKV.apply(x, projections, *outputs, *saved, *lora)


class _QKVForward:
    """Stands in for q_proj's, k_proj's or v_proj's `forward` (the modules' hooks still run)."""

    def __init__(self, shared: _SharedQKV, name: str) -> None:
        self.shared, self.name = shared, name
        self.module = shared.modules[QKV.index(name)]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or adapter_off(self.shared.modules):
            return getattr(self.module, _KEY)(x, *args, **kwargs)
        return self.shared.take(self.name, x)


class _OutputForward:
    """Stands in for o_proj's `forward`."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or adapter_off([self.module]):
            return getattr(self.module, _KEY)(x, *args, **kwargs)
        (projection,), lora = projections_of([self.module])
        dtype = compute_dtype(x)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            y, xa = project(flat, projection, dtype)
            y = y.view(*x.shape[:-1], y.shape[-1])
        if not torch.is_grad_enabled():
            return y
        return _LoraLinear.apply(x, y, projection, flat, xa, *lora)


def _qkv_forward(
    x: torch.Tensor, projections: list[Projection]
) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """q, k and v of `x` and what their backward pass needs: the input and three rank-r products."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        outputs, saved = [], [flat]
        for p in projections:
            y, xa = project(flat, p, dtype)
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
            saved.append(xa)
    return tuple(outputs), saved


class _LoraQKV(torch.autograd.Function):
    """Gradients for `_qkv_forward`'s q, k, v: dx and the six LoRA weights'."""

    @staticmethod
    def forward(ctx: Any, x, projections, q, k, v, flat, *xa_and_lora):  # type: ignore[override]
        ctx.save_for_backward(flat, *xa_and_lora[:3])
        ctx.projections, ctx.x_shape, ctx.x_dtype = projections, x.shape, x.dtype
        return q, k, v

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        flat, *xas = ctx.saved_tensors
        dtype = flat.dtype
        wants_x = bool(ctx.needs_input_grad[0])
        grad_x: Any = None if wants_x else False
        lora_grads: list[torch.Tensor | None] = []
        for grad, xa, p in zip(grads, xas, ctx.projections, strict=True):
            if grad is None:  # an output that took no part in the loss
                lora_grads += [None, None]
                continue
            dy = grad.reshape(-1, grad.shape[-1]).to(dtype)
            grad_a, grad_b, grad_x = project_back(dy, flat, xa, p, dtype, grad_x)
            lora_grads += [grad_a, grad_b]
        dx = grad_x.view(ctx.x_shape).to(ctx.x_dtype) if wants_x and grad_x is not None else None
        return (dx, None, None, None, None, None, None, None, None, *lora_grads)


class _LoraLinear(torch.autograd.Function):
    """Gradients for one projection computed under `no_grad`: dx, dA and dB."""

    @staticmethod
    def forward(ctx: Any, x, y, projection, flat, xa, *lora):  # type: ignore[override]
        ctx.save_for_backward(flat, xa)
        ctx.projection, ctx.x_shape, ctx.x_dtype = projection, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        flat, xa = ctx.saved_tensors
        dtype = flat.dtype
        wants_x = bool(ctx.needs_input_grad[0])
        dy = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_a, grad_b, grad_x = project_back(
            dy, flat, xa, ctx.projection, dtype, None if wants_x else False
        )
        dx = grad_x.view(ctx.x_shape).to(ctx.x_dtype) if wants_x else None
        return (dx, None, None, None, None, grad_a, grad_b)
