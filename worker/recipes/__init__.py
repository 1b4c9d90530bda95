"""The training methods: one recipe a method, looked up by the job's `method` (RECIPES)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

# method -> (module, class); imported on use, so a job loads only its own recipe.
RECIPES: dict[str, tuple[str, str]] = {
    "sft": ("worker.recipes.sft", "SFTRecipe"),
    "dpo": ("worker.recipes.dpo", "DPORecipe"),
    "orpo": ("worker.recipes.orpo", "ORPORecipe"),
}


def recipe_for(method: str) -> Any:
    module, name = RECIPES[str(method)]
    return getattr(import_module(module), name)
