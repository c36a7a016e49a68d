"""Recipes: how a restructured model (shared, pruned) is rebuilt from its checkpoint. The analyses that
restructure models register their builders here; models/ dispatches to them without importing upward."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from resprobe.errors import ModelError

RecipeBuilder = Callable[[nn.Module, Mapping[str, Any]], nn.Module]
_RECIPE_BUILDERS: dict[str, RecipeBuilder] = {}


def register_recipe(kind: str) -> Callable[[RecipeBuilder], RecipeBuilder]:
    """Register how to restructure a freshly built model for a recipe of ``kind`` (e.g. ``share``)."""

    def decorator(fn: RecipeBuilder) -> RecipeBuilder:
        _RECIPE_BUILDERS[kind] = fn
        return fn

    return decorator


# The modules whose import registers a recipe builder (imported on first need, not with the package).
_RECIPE_MODULES = ("resprobe.share", "resprobe.share_lm", "resprobe.ablate_prune")


def apply_recipe(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    kind = recipe.get("kind")
    for module in _RECIPE_MODULES:
        importlib.import_module(module)
    builder = _RECIPE_BUILDERS.get(str(kind))
    if builder is None:
        raise ModelError(f"this resprobe cannot rebuild a model with recipe {kind!r} (newer resprobe file?)")
    return builder(model, recipe)
