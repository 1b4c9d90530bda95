"""Offloaded activation checkpointing: what a training step saves for its backward pass outside
the checkpointed decoder layers (chiefly each layer's input hidden states) goes to pinned host
memory, copied on a side CUDA stream while the GPU computes, and comes back ahead of need: when
the backward pass takes a tensor back, the ones saved just before it (as many bytes as it) start
their copies to the GPU on the side stream, while the GPU works through the layer in between. The
GPU holds about one layer's input more than it would waiting for each copy.

PyTorch's `save_on_cpu` (which transformers' own `offload=True` uses) copies on the compute stream
and waits for each copy, both ways. Tensors saved more than once (the rotary cos/sin every layer
receives) move once. Small tensors and weights stay where they are.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

MIN_BYTES = 1 << 20  # smaller tensors cost more to track than they free
PREFETCH = True  # the benchmark's `noprefetch` variant turns it off: each copy back waited for


@dataclass(eq=False)
class _OnHost:
    host: torch.Tensor
    copied: torch.cuda.Event
    device: torch.device
    index: int  # the order it was saved in
    on_device: torch.Tensor | None = None  # its copy back, started ahead of need
    arrived: torch.cuda.Event | None = None
    taken: bool = False  # the backward pass took it back once
    shared: bool = False  # saved more than once: taken back out of order, it moves no cursor

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """The context one forward pass runs in; what it saved comes back in the backward pass,
    wherever that runs."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self.moved: dict[int, tuple[weakref.ref[torch.Tensor], _OnHost]] = {}
        self.saved: list[weakref.ref[_OnHost]] = []  # in the order saved; the graph owns them
        self.earliest_taken = 1 << 62  # the lowest index the backward pass has taken back
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
            seen[1].shared = True
            return seen[1]
        compute = torch.cuda.current_stream(tensor.device)
        self.stream.wait_stream(compute)  # the tensor's values are written
        with torch.cuda.stream(self.stream):
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy is done
        moved = _OnHost(host, copied, tensor.device, len(self.saved))
        self.moved[id(tensor)] = (weakref.ref(tensor), moved)
        self.saved.append(weakref.ref(moved))
        return moved

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _OnHost):
            return packed
        compute = torch.cuda.current_stream(packed.device)
        if packed.on_device is not None and packed.arrived is not None:  # on its way already
            tensor, packed.on_device = packed.on_device, None
            compute.wait_event(packed.arrived)
        else:
            compute.wait_event(packed.copied)
            tensor = packed.host.to(packed.device, non_blocking=True)
        packed.taken = True
        if PREFETCH and not packed.shared:
            self.earliest_taken = min(self.earliest_taken, packed.index)
            self._bring_back_ahead(packed.nbytes, compute)
        return tensor

    def _bring_back_ahead(self, want: int, compute: torch.cuda.Stream) -> None:
        """Start the copies back of the tensors saved before the earliest one taken back, until
        `want` bytes are on their way."""
        waiting = []
        for ref in reversed(self.saved[: self.earliest_taken]):
            packed = ref()
            if packed is None or packed.taken:
                continue
            if packed.on_device is None:
                waiting.append(packed)
            want -= packed.nbytes
            if want <= 0:
                break
        for packed in waiting:
            self._bring_back(packed, compute)

    def _bring_back(self, packed: _OnHost, compute: torch.cuda.Stream) -> None:
        """`packed`'s copy to the GPU on the side stream, after the work queued so far (its
        memory comes from the compute stream's pool)."""
        on_device = torch.empty_like(packed.host, device=packed.device)
        self.stream.wait_stream(compute)
        self.stream.wait_event(packed.copied)
        with torch.cuda.stream(self.stream):
            on_device.copy_(packed.host, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(self.stream)
        on_device.record_stream(self.stream)  # dropped unused: not reused before the copy is done
        packed.on_device, packed.arrived = on_device, arrived
