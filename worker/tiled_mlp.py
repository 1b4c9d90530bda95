"""The MLP of each decoder layer run a slice of tokens at a time, for sequences too long to fit.

At 80,000 tokens an 8B layer's MLP intermediates (gate, up, their product and the gradients of
each, 14,336 values a token) take about 14 GB while its backward pass runs: more than the rest of
the step together once activations are offloaded. The MLP treats every token on its own, so it can
run on slices of the sequence: the forward pass keeps only its input and output; the backward pass
reruns one slice with autograd, backpropagates it, and moves on, so one slice's intermediates are
alive at a time (the tiled MLP of Arctic Long Sequence Training, arXiv 2506.13996). The price is
one more MLP forward pass per layer, which is why the memory policy uses it only for sequences that
do not fit otherwise.

    tile_mlps(decoder_layers, tokens=4096)   # and untile_mlps(decoder_layers) to undo
"""

from __future__ import annotations

from typing import Any

import torch

from worker.forward_swap import replace_forward, restore_forward

_KEY = "_untiled_forward"


def tile_mlps(layers: list[Any], tokens: int) -> None:
    """Every layer's `mlp` runs slices of at most `tokens` tokens (shorter inputs run whole)."""
    for layer in layers:
        replace_forward(layer.mlp, _TiledForward(layer.mlp, tokens), _KEY)


def untile_mlps(layers: list[Any]) -> None:
    for layer in layers:
        restore_forward(layer.mlp, _KEY)


class _TiledForward:
    """Stands in for `mlp.forward` (an instance attribute, so the module's hooks still run)."""

    def __init__(self, mlp: Any, tokens: int) -> None:
        self.forward = vars(mlp).get(_KEY, mlp.forward)
        self.params = [p for p in mlp.parameters() if p.requires_grad]  # the LoRA weights
        self.tokens = tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= self.tokens:
            return self.forward(x)
        if not torch.is_grad_enabled():  # a checkpointed layer's first pass, or evaluation
            return _in_slices(self.forward, self.tokens, x)
        return _TiledMLP.apply(self.forward, self.tokens, x, *self.params)


def _in_slices(forward: Any, tokens: int, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([forward(piece) for piece in x.split(tokens, dim=-2)], dim=-2)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, forward: Any, tokens: int, x: torch.Tensor, *params: torch.Tensor):
        device = x.device.type
        ctx.forward, ctx.tokens, ctx.params = forward, tokens, params
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # The backward pass reruns the slices with the same random numbers (LoRA dropout).
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _in_slices(forward, tokens, x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        wants_x = ctx.needs_input_grad[2]
        wanted = zip(ctx.params, ctx.needs_input_grad[3:], strict=True)
        params = [p for p, wants in wanted if wants]
        grad_x = torch.empty_like(x) if wants_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        device, enabled, dtype = ctx.autocast
        cpu_rng, cuda_rng = ctx.rng
        done = 0
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            for piece, grad_piece in zip(
                x.split(ctx.tokens, dim=-2), grad_out.split(ctx.tokens, dim=-2), strict=True
            ):
                piece = piece.detach().requires_grad_(wants_x)
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                    out = ctx.forward(piece)
                inputs = [piece, *params] if wants_x else params
                grads = list(torch.autograd.grad(out, inputs, grad_piece, allow_unused=True))
                if grad_x is not None:
                    grad_x.narrow(-2, done, piece.shape[-2]).copy_(grads.pop(0))
                    done += piece.shape[-2]
                for i, grad in enumerate(grads):
                    total = grad_params[i]
                    if grad is not None:
                        grad_params[i] = grad if total is None else total + grad
        per_param = iter(grad_params)
        return (
            None,
            None,
            grad_x,
            *(next(per_param) if wants else None for wants in ctx.needs_input_grad[3:]),
        )
