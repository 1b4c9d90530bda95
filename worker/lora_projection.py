"""One LoRA projection `x W^T + s (x A^T) B^T` computed by hand, W dequantized on the fly when it is
4-bit (worker.nf4), for the fused functions (worker.fused_mlp, worker.fused_attention):
they run a layer's projections under `no_grad` and write dx and every dA, dB in their own backward
pass, instead of the five or six autograd nodes, each with Python on the host, that peft and
bitsandbytes run per projection."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from worker import nf4

CACHE_CASTS = True  # bench/profile_step.py's `:nocastcache` variant turns `casts_kept` off
_kept = threading.local()  # .casts: each LoRA weight's copy in the compute dtype, inside a pass


class Projection(NamedTuple):
    """One LoRA projection: x W^T + scale (x A^T) B^T, W the base layer's (4-bit or not)."""

    base: Any
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float


def is_plain_lora(module: Any) -> bool:
    """One LoRA adapter on a linear (4-bit or not) layer: no dropout, no bias on lora_B, no
    variant such as DoRA."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    base = module.get_base_layer()
    return (
        name in module.lora_A
        and not getattr(module, "lora_variant", {}).get(name)
        and not getattr(module, "use_dora", {}).get(name)
        and getattr(module.lora_B[name], "bias", None) is None
        and isinstance(module.lora_dropout[name], torch.nn.Identity)
        and (hasattr(getattr(base, "weight", None), "quant_state") or type(base) is torch.nn.Linear)
    )


def adapter_off(modules: list[Any]) -> bool:
    """The adapter is disabled (the playground's "base model" answers) or merged: peft's path."""
    return any(m.disable_adapters or m.merged for m in modules)


def projections_of(modules: list[Any]) -> tuple[list[Projection], list[torch.Tensor]]:
    """Each LoRA layer with its active adapter, and their LoRA weights (A, B, A, B, ...), or
    their stand-ins inside `weights_as`."""
    projections: list[Projection] = []
    lora: list[torch.Tensor] = []
    stand_ins = getattr(_kept, "stand_ins", None) or {}
    for m in modules:
        name = m.active_adapters[0]
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        a, b = stand_ins.get(id(a), a), stand_ins.get(id(b), b)
        projections.append(Projection(m.get_base_layer(), a, b, m.scaling[name]))
        lora += [a, b]
    return projections, lora


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@contextlib.contextmanager
def casts_kept() -> Iterator[None]:
    """One forward and backward pass: inside, each LoRA weight (float32) is cast to the compute
    dtype once and the copy reused, where the fused functions read it four to six times (more
    with checkpointing), each read a kernel launch and host time in a step the host paces
    (bench/RESULTS.md, session 11). The weights cannot change within one pass; the copies go when
    it ends. (A tensor's version counter would not do: the fused AdamW updates without bumping
    it.)"""
    if getattr(_kept, "casts", None) is not None or not CACHE_CASTS:
        yield
        return
    _kept.casts = WeakIdKeyDictionary()
    try:
        yield
    finally:
        _kept.casts = None


@contextlib.contextmanager
def weights_as(stand_ins: dict[int, torch.Tensor]) -> Iterator[None]:
    """Inside, the fused functions read each LoRA weight `w` as `stand_ins[id(w)]` where there
    is one (worker.layer_graphs: an alias made inside a CUDA graph's capture, whose gradient the
    capture takes without the weight's own gradient node, which an earlier step may have made
    on another stream)."""
    nested = getattr(_kept, "stand_ins", None) or {}
    with _kept_as("stand_ins", {**nested, **stand_ins}):  # nested: every layer's at once
        yield


def casts_paused() -> contextlib.AbstractContextManager[None]:
    """Inside, every read casts anew (a CUDA graph's capture: the graph must hold its own casts,
    not read a copy that goes when the pass ends)."""
    return _kept_as("casts", None)


@contextlib.contextmanager
def _kept_as(name: str, value: Any) -> Iterator[None]:
    """This thread's `name` (casts, stand-ins) is `value` inside, and what it was after."""
    kept = getattr(_kept, name, None)
    setattr(_kept, name, value)
    try:
        yield
    finally:
        setattr(_kept, name, kept)


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, made once per pass inside `casts_kept`."""
    casts = getattr(_kept, "casts", None)
    if casts is None or tensor.dtype == dtype:
        return tensor.to(dtype)
    copy = casts.get(tensor)
    if copy is None or copy.dtype != dtype:
        with torch.no_grad():
            copy = casts[tensor] = tensor.to(dtype)
    return copy


def weight(base: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight [out, in] in `dtype`: dequantized when it is 4-bit."""
    w = base.weight
    if hasattr(w, "quant_state"):
        return nf4.dequantize(w, dtype)
    return w.to(dtype)


def lora_in(flat: torch.Tensor, p: Projection, dtype: torch.dtype) -> torch.Tensor:
    """`flat A^T`, the rank-r product the backward pass needs for B's gradient."""
    return flat @ cast(p.lora_a, dtype).t()


def project(
    flat: torch.Tensor, p: Projection, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`flat W^T + s (flat A^T) B^T` (+ the base layer's bias), and `flat A^T` for the backward
    pass."""
    xa = lora_in(flat, p, dtype)
    y = flat @ weight(p.base, dtype).t()
    y.addmm_(xa, cast(p.lora_b, dtype).t(), alpha=p.scale)
    if p.base.bias is not None:
        y += p.base.bias.to(dtype)
    return y, xa


def project_back(
    dy: torch.Tensor,
    flat: torch.Tensor,
    xa: torch.Tensor,
    p: Projection,
    dtype: torch.dtype,
    grad_x: Any,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One projection's dA and dB; its dx is added into `grad_x` (None: a new one; False: none
    is wanted)."""
    a = cast(p.lora_a, dtype)
    dz = dy @ cast(p.lora_b, dtype)  # the gradient at x A^T, before the scale
    if grad_x is None:
        grad_x = dy @ weight(p.base, dtype)
    elif grad_x is not False:
        grad_x.addmm_(dy, weight(p.base, dtype))
    if grad_x is not False:
        grad_x.addmm_(dz, a, alpha=p.scale)
    grad_a = (dz.t() @ flat).mul_(p.scale).to(p.lora_a.dtype)
    grad_b = (dy.t() @ xa).mul_(p.scale).to(p.lora_b.dtype)
    return grad_a, grad_b, grad_x
