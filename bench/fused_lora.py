"""An experiment, not yet in the recipe: each LoRA projection as one autograd function.

The 8B step is bound by the host's CPU (bench/RESULTS.md, session 4): per projection peft runs its
module's Python, bitsandbytes' MatMul4Bit, a defensive clone of the output, lora_A, lora_B, a scale
and an add, each a separate autograd node with its own Python. Here one function computes
`x W^T + s (x A^T) B^T` (W dequantized on the fly, as bitsandbytes does) and its backward pass
writes dx, dA and dB directly: fewer ops, one Python call. Technique 6 of PERFORMANCE.md, in its
simplest form (torch matmuls, no Triton kernel).

`bench/profile_step.py --policies off,off:fusedlora,on,on:fusedlora` measures it on the GPU; if
the numbers justify it, it moves into worker/ and the recipe. CPU test: tests/bench.

    fuse_lora(model)    # every plain LoRA projection; unfuse_lora(model) undoes it
"""

from __future__ import annotations

from typing import Any

import torch


def fuse_lora(model: Any) -> int:
    """Route every eligible LoRA projection through the fused function; returns how many."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and _eligible(module):
            if not hasattr(module, "_unfused_forward"):
                module._unfused_forward = module.forward
            module.forward = _FusedForward(module)
            count += 1
    return count


def unfuse_lora(model: Any) -> None:
    for module in model.modules():
        if hasattr(module, "_unfused_forward"):
            module.forward = module._unfused_forward
            del module._unfused_forward


def _eligible(module: Any) -> bool:
    """Plain LoRA on a linear layer: one adapter, no dropout, no DoRA or other variant."""
    if len(module.active_adapters) != 1 or getattr(module, "lora_variant", None):
        return False
    name = module.active_adapters[0]
    base = module.get_base_layer()
    quantized = hasattr(getattr(base, "weight", None), "quant_state")
    return (
        name in module.lora_A
        and isinstance(module.lora_dropout[name], torch.nn.Identity)
        and (quantized or isinstance(base, torch.nn.Linear))
    )


class _FusedForward:
    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module
        if args or kwargs or module.disable_adapters or module.merged:
            return module._unfused_forward(x, *args, **kwargs)
        name = module.active_adapters[0]
        return _LoraLinear.apply(
            x,
            module.get_base_layer(),
            module.lora_A[name].weight,
            module.lora_B[name].weight,
            module.scaling[name],
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _weight(base: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight [out, in] in `dtype`: dequantized when it is 4-bit."""
    weight = base.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.to(dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, base, lora_a, lora_b, scale):  # type: ignore[override]
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xa = flat @ a.t()
            y = flat @ _weight(base, dtype).t()
            y.addmm_(xa, b.t(), alpha=scale)
            if base.bias is not None:
                y += base.bias.to(dtype)
        ctx.save_for_backward(flat, xa, lora_a, lora_b)
        ctx.base, ctx.scale, ctx.dtype, ctx.x_shape, ctx.x_dtype = (
            base,
            scale,
            dtype,
            x.shape,
            x.dtype,
        )
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        flat, xa, lora_a, lora_b = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        dy = grad.reshape(-1, grad.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        dz = dy @ b  # the gradient at x A^T, unscaled
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ _weight(ctx.base, dtype)
            grad_x.addmm_(dz, a, alpha=scale)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        grad_a = (dz.t() @ flat).mul_(scale).to(lora_a.dtype)
        grad_b = (dy.t() @ xa).mul_(scale).to(lora_b.dtype)
        return grad_x, None, grad_a, grad_b, None
