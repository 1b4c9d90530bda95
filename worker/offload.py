"""Offloaded activation checkpointing: what a training step saves for its backward pass outside
the checkpointed decoder layers (chiefly each layer's input hidden states) goes to pinned host
memory, copied on a side CUDA stream while the GPU computes, and comes back when the backward
pass needs it.

PyTorch's `save_on_cpu` (which transformers' own `offload=True` uses) copies on the compute stream
and waits for each copy; here the device-to-host copies overlap the forward pass. Tensors saved
more than once (the rotary cos/sin every layer receives) move once. Small tensors and weights stay
where they are.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

MIN_BYTES = 1 << 20  # smaller tensors cost more to track than they free


@dataclass
class _OnHost:
    host: torch.Tensor
    copied: torch.cuda.Event
    device: torch.device


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """The context one forward pass runs in; what it saved comes back in the backward pass,
    wherever that runs."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self.moved: dict[int, tuple[weakref.ref[torch.Tensor], _OnHost]] = {}
        super().__init__(self._pack, self._unpack)

    def __exit__(self, *exc: Any) -> None:
        self.moved.clear()
        super().__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (
            not tensor.is_cuda
            or isinstance(tensor, torch.nn.Parameter)
            or tensor.numel() * tensor.element_size() < MIN_BYTES
        ):
            return tensor
        seen = self.moved.get(id(tensor))
        if seen is not None and seen[0]() is tensor:
            return seen[1]
        compute = torch.cuda.current_stream(tensor.device)
        self.stream.wait_stream(compute)  # the tensor's values are written
        with torch.cuda.stream(self.stream):
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy is done
        moved = _OnHost(host, copied, tensor.device)
        self.moved[id(tensor)] = (weakref.ref(tensor), moved)
        return moved

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _OnHost):
            return packed
        compute = torch.cuda.current_stream(packed.device)
        compute.wait_event(packed.copied)
        return packed.host.to(packed.device, non_blocking=True)
