"""Put a stand-in in place of a module's `forward`, and take it out again.

The stand-in is an instance attribute, so `module(...)` still runs the module's hooks; the forward
it replaces (the class's, or one a kernel library bound) is kept under a key of the caller's, and
replacing again keeps the first one. worker.fused_mlp and worker.tiled_mlp use it; a tiled MLP
that is also fused slices the fused forward. Undo in the reverse order (untile, then unfuse):
taking out the inner stand-in first drops the outer one and leaves its key behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def replace_forward(module: Any, stand_in: Callable[..., Any], key: str) -> None:
    if key not in vars(module):
        setattr(module, key, module.forward)
    module.forward = stand_in


def restore_forward(module: Any, key: str) -> None:
    if key in vars(module):
        module.forward = vars(module).pop(key)


def restore_all(model: Any, key: str) -> None:
    """Every module of `model` gets back the forward kept under `key`."""
    for module in model.modules():
        restore_forward(module, key)
