"""Each decoder layer's gated MLP (SwiGLU: Llama, Qwen, Mistral; GeGLU: Gemma), LoRA on all three
projections, as one autograd function.

Through peft, a LoRA MLP is some twenty autograd nodes: per projection bitsandbytes' 4-bit matmul,
lora_A, lora_B, a scale, an add (and peft's defensive clone), then the gate. Each node runs
Python on the host, and the 8B step is bound by the host (bench/RESULTS.md, session 4). Here one
function computes

    down(act(gate(x)) * up(x)),  each projection  x W^T + s (x A^T) B^T,  act SiLU or tanh-GELU

(W dequantized on the fly, worker.nf4) and its backward pass writes dx and every dA, dB
directly. It keeps x, gate(x), up(x) and the three rank-r products; the gated product, the largest
of peft's saved tensors, is recomputed in the backward pass. It keeps less memory without
checkpointing and takes less time with every layer checkpointed; the measurements are in
bench/RESULTS.md (session 5). Fusing each projection on its own, without the gate, did not pay.

Where the MLP's output only goes into the residual sum the decoder layer returns (Llama, Mistral,
Qwen; not Gemma, whose output passes a norm first), a checkpointed layer's recompute skips the down
projection's product, the largest of the layer's seven: the backward pass reads only what each
operation saved, never the recomputed layer's output (bench/RESULTS.md, session 11).

The gate runs on Liger's Triton kernels on CUDA (swiglu, geglu), on torch elsewhere. An MLP
qualifies when its own activation is SiLU or GELU's tanh form (Gemma's `hidden_activation`,
whatever its config's `hidden_act` says) and its three projections carry one plain LoRA adapter
each (no dropout, no DoRA); any other MLP keeps peft's path, as does an MLP whose adapter is
disabled or merged (the playground's "base model" answers).

    fuse_mlps(model)    # returns how many; unfuse_mlps(model) undoes it

`fuse_mlps(model, forward_inside=True)` is the earlier form that ran the forward pass inside the
autograd function; only the benchmark uses it (bench/profile_step.py compares the two).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from worker.forward_swap import replace_forward, restore_all, restore_forward
from worker.lora_projection import (
    Projection,
    adapter_off,
    compute_dtype,
    is_plain_lora,
    lora_in,
    project,
    project_back,
    projections_of,
)

_KEY = "_unfused_forward"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Decoder layers that return `residual + mlp(x)` and read the MLP's output nowhere else.
_OUTPUT_ONLY_SUMMED = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)
SKIP_UNREAD_OUTPUT = True  # bench/profile_step.py's `:recomputedown` variant turns it off


def fuse_mlps(model: Any, *, forward_inside: bool = False) -> int:
    """Every qualifying MLP of `model` runs as one function; returns how many. An MLP that is
    fused already is fused again in the form asked for."""
    form = _InsideForward if forward_inside else _FusedForward
    summed = {
        id(layer.mlp)
        for layer in model.modules()
        if type(layer).__name__ in _OUTPUT_ONLY_SUMMED and hasattr(layer, "mlp")
    }
    count = 0
    for module in model.modules():
        if isinstance(vars(module).get("forward"), _FusedForward):
            restore_forward(module, _KEY)
        gate = _gate_of(module)
        if gate is not None:
            replace_forward(module, form(module, gate, id(module) in summed), _KEY)
            count += 1
    return count


def unfuse_mlps(model: Any) -> None:
    restore_all(model, _KEY)


def _gate_of(mlp: Any) -> str | None:
    """ "swiglu" or "geglu" for an MLP the fused function computes, else None."""
    projections = [getattr(mlp, name, None) for name in PROJECTIONS]
    if not all(is_plain_lora(p) for p in projections):
        return None
    return _gate_kind(mlp)


def _gate_kind(mlp: Any) -> str | None:
    """The activation the MLP itself applies (a config's `hidden_act` need not be it: Gemma's
    MLP reads `hidden_activation`). Liger's SwiGLU MLP has no `act_fn`: it applies SiLU by
    construction and refuses any other activation; its GeGLU patch keeps the MLP's `act_fn`."""
    if any(cls.__name__ == "LigerSwiGLUMLP" for cls in type(mlp).__mro__):
        return "swiglu"
    act = getattr(mlp, "act_fn", None)
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "swiglu"
    if _is_tanh_gelu(act):
        return "geglu"
    return None


def _is_tanh_gelu(act: Any) -> bool:
    """GELU's tanh form: torch's, or transformers' "gelu_pytorch_tanh" (Gemma) and "gelu_new"."""
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "tanh"
    return type(act).__name__ in ("GELUTanh", "NewGELUActivation")


class _FusedForward:
    """Stands in for `mlp.forward` (an instance attribute, so the module's hooks still run)."""

    def __init__(self, mlp: Any, gate: str, only_summed: bool = False) -> None:
        self.mlp = mlp
        self.gate = gate
        self.only_summed = only_summed  # the layer only adds the output to its residual
        self.projections = [getattr(mlp, name) for name in PROJECTIONS]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if adapter_off(self.projections):
            return getattr(self.mlp, _KEY)(x)
        projections, lora = projections_of(self.projections)
        # The forward pass runs outside the autograd function: an out-of-memory error raised
        # inside one (torch 2.11, Python 3.12, CUDA) left every activation of the step alive.
        unread = self.only_summed and SKIP_UNREAD_OUTPUT and _recomputing()
        with torch.no_grad():
            y, saved = _mlp_forward(x, projections, self.gate, output=not unread)
        if not torch.is_grad_enabled():  # evaluation, or a checkpointed layer's first pass
            return y
        return _LoraMLP.apply(x, y, (projections, self.gate), *saved, *lora)


class _InsideForward(_FusedForward):
    """The earlier form: the forward pass inside the autograd function (for the benchmark)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if adapter_off(self.projections):
            return getattr(self.mlp, _KEY)(x)
        projections, lora = projections_of(self.projections)
        return _ForwardInside.apply(x, (projections, self.gate), *lora)


class _ForwardInside(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, how: Any, *lora: torch.Tensor) -> torch.Tensor:
        y, saved = _mlp_forward(x, *how)
        return _LoraMLP.forward(ctx, x, y, how, *saved, *lora)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        grads = _LoraMLP.backward(ctx, grad)
        return (grads[0], None, *grads[9:])  # x, projections, the six LoRA weights


def _mlp_forward(
    x: torch.Tensor, projections: list[Projection], kind: str, output: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """down(act(gate(x)) * up(x)) and what its backward pass needs; with `output=False` only
    what the backward pass needs, and zeros of the output's shape (no down product)."""
    dtype = compute_dtype(x)
    (gate_p, up_p, down_p) = projections
    with torch.autocast(x.device.type, enabled=False):
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        gate, xa_gate = project(flat, gate_p, dtype)
        up, xa_up = project(flat, up_p, dtype)
        h = _gated(kind, gate, up)
        if output:
            y, ha = project(h, down_p, dtype)
            y = y.view(*x.shape[:-1], y.shape[-1])
        else:
            ha = lora_in(h, down_p, dtype)
            y = h.new_zeros(()).expand(*x.shape[:-1], down_p.lora_b.shape[0])
    return y, [flat, gate, up, xa_gate, xa_up, ha]


def _recomputing() -> bool:
    """A forward pass run from inside a backward pass with gradients on: a checkpointed layer's
    recompute (or a tiled MLP's), whose outputs' values the backward pass never reads."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1


class _LoraMLP(torch.autograd.Function):
    """Gradients for `_mlp_forward`'s result `y`: the gated product is recomputed, gate and up
    are overwritten by their gradients (they are not needed after)."""

    @staticmethod
    def forward(ctx: Any, x, y, how, *saved_and_lora):  # type: ignore[override]
        ctx.save_for_backward(*saved_and_lora[:6])
        (ctx.projections, ctx.kind), ctx.dtype, ctx.x_shape, ctx.x_dtype = (
            how,
            saved_and_lora[0].dtype,
            x.shape,
            x.dtype,
        )
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        flat, gate, up, xa_gate, xa_up, ha = ctx.saved_tensors
        gate_p, up_p, down_p = ctx.projections
        dtype = ctx.dtype
        dy = grad.reshape(-1, grad.shape[-1]).to(dtype)
        h = _gated(ctx.kind, gate, up)
        down_a, down_b, dh = project_back(dy, h, ha, down_p, dtype, None)
        del h
        d_gate, d_up = _gated_back(ctx.kind, gate, up, dh)  # written over gate and up
        del dh
        wants_x = bool(ctx.needs_input_grad[0])
        grad_x = None if wants_x else False
        gate_a, gate_b, grad_x = project_back(d_gate, flat, xa_gate, gate_p, dtype, grad_x)
        up_a, up_b, grad_x = project_back(d_up, flat, xa_up, up_p, dtype, grad_x)
        dx = grad_x.view(ctx.x_shape).to(ctx.x_dtype) if wants_x else None
        return (dx, None, None, *[None] * 6, gate_a, gate_b, up_a, up_b, down_a, down_b)


def _gated(kind: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up."""
    liger = _liger(kind) if gate.is_cuda else None
    if liger is not None:
        return liger[0](gate, up)[2]
    if kind == "swiglu":
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _gated_back(
    kind: str, gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d gate and d up (on CUDA written over `gate` and `up`, which are not needed after)."""
    liger = _liger(kind) if gate.is_cuda else None
    if liger is not None:
        return liger[1](gate, up, dh)
    g, u, d = gate.float(), up.float(), dh.float()
    if kind == "swiglu":
        sig = torch.sigmoid(g)
        d_gate, d_up = d * u * sig * (1 + g * (1 - sig)), d * g * sig
    else:  # GELU, tanh form: 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3)
        t = torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g**3))
        slope = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * g * g)
        d_gate, d_up = d * u * slope, d * (0.5 * g * (1 + t))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_LIGER: dict[str, Any] = {}


def _liger(kind: str) -> Any:
    """Liger's (forward, backward) for the gate, or None (not installed, no Triton here)."""
    if kind not in _LIGER:
        try:
            if kind == "swiglu":
                from liger_kernel.ops import swiglu

                _LIGER[kind] = (swiglu.swiglu_forward, swiglu.swiglu_backward)
            else:
                from liger_kernel.ops import geglu

                _LIGER[kind] = (geglu.geglu_forward, geglu.geglu_backward)
        except Exception:  # not installed, or no triton for this device
            _LIGER[kind] = None
    return _LIGER[kind]
