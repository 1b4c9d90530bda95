"""An experiment, not yet in the recipe: offloaded activations fetched back one step ahead.

worker/offload.py copies what the forward pass saves (chiefly each checkpointed layer's input) to
pinned host memory on a side stream, overlapping the forward pass. On the way back it copies on
the compute stream, when the backward pass asks, so the GPU waits for every copy: at 8B and 4,096
tokens, 32 MiB a layer, about 0.65 ms a layer over PCIe 5, some 20 ms a step (session 5: the
`offload` arm ran 24 ms a step slower than `on`).

Here, when the backward pass takes back one saved tensor, the one saved just before it (the next
it will ask for, checkpointed layers being undone in reverse) starts its copy on the side stream.
One layer input more is held on the GPU. `bench/profile_step.py --policies offload,offload:prefetch`
measures it; if it pays, it moves into worker/offload.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from worker.offload import ActivationOffload, _OnHost


class PrefetchingOffload(ActivationOffload):
    def __init__(self, stream: torch.cuda.Stream) -> None:
        super().__init__(stream)
        self.order: list[_OnHost] = []  # every tensor moved, in the order the forward saved them
        self.place: dict[int, int] = {}  # id of an _OnHost -> its index in `order`
        self.fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.used: set[int] = set()  # fetched early and taken: a later take copies as usual

    def _pack(self, tensor: torch.Tensor) -> Any:
        packed = super()._pack(tensor)
        if isinstance(packed, _OnHost) and id(packed) not in self.place:
            self.place[id(packed)] = len(self.order)
            self.order.append(packed)
        return packed

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _OnHost):
            return packed
        compute = torch.cuda.current_stream(packed.device)
        early = self.fetched.pop(id(packed), None)
        if early is None:
            tensor = super()._unpack(packed)
        else:
            tensor, ready = early
            compute.wait_event(ready)
            tensor.record_stream(compute)  # made on the side stream, used on this one
            self.used.add(id(packed))
        index = self.place.get(id(packed), 0)
        if index > 0:
            self._fetch(self.order[index - 1])
        return tensor

    def _fetch(self, packed: _OnHost) -> None:
        if id(packed) in self.fetched or id(packed) in self.used:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(packed.copied)
            tensor = packed.host.to(packed.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.fetched[id(packed)] = (tensor, ready)


def prefetch_offload(recipe: Any) -> None:
    """The recipe's offload context becomes PrefetchingOffload (on CUDA, under offload/tiled)."""

    def activation_offload() -> Any:
        if recipe.memory_policy not in ("offload", "tiled") or recipe.device.type != "cuda":
            return contextlib.nullcontext()
        if recipe.offload_stream is None:
            recipe.offload_stream = torch.cuda.Stream(recipe.device)
        return PrefetchingOffload(recipe.offload_stream)

    recipe.activation_offload = activation_offload


def plain_offload(recipe: Any) -> None:
    vars(recipe).pop("activation_offload", None)
