"""Pruned models: blocks replaced by what removal computes, saved as a resprobe checkpoint (the `prune` recipe)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from resprobe.errors import BadValue, ModelError
from resprobe.models.blocks import GENERIC, BlockFamily, family_of
from resprobe.models.checkpoints import save_resprobe_checkpoint
from resprobe.models.recipes import register_recipe

if TYPE_CHECKING:  # pragma: no cover
    from resprobe.probe import Probe


REBUILDABLE_SOURCES = ("timm", "torchvision", "hf-hub", "callable")


class RemovedBlock(nn.Module):
    """What a removed identity block becomes when its lesion is its input, unchanged (pre-activation and
    transformer blocks, docs/reference.md). Block discovery skips it (``_resprobe_removed``)."""

    _resprobe_removed = True

    def forward(self, x: Tensor, *_args: Any, **_kwargs: Any) -> Tensor:  # what else the model passes: unused
        return x


class LesionedBlock(nn.Module):
    """A removed block that keeps what its lesion computes: ``post(shortcut(h))`` (identity blocks
    ``post(h)``: a SiLU post-activation is applied), pre-activation ``shortcut(norm1(h))``. The kept
    modules sit under their original attribute names, so their weights keep their checkpoint keys
    (``layer2.0.downsample.0.weight``)."""

    _resprobe_removed = True

    def __init__(self, block: nn.Module, family: BlockFamily):
        super().__init__()
        self.family = family  # a plain attribute: not a module, no state
        for attr in family.lesion_attrs():
            value = getattr(block, attr, None)
            if isinstance(value, nn.Module):
                setattr(self, attr, value)
            elif isinstance(value, (int, float)):  # NFNet's beta
                object.__setattr__(self, attr, value)

    def forward(self, x: Tensor, *_args: Any, **_kwargs: Any) -> Tensor:  # the shortcut reads x only
        return self.family.lesion(self, x)


def _replacement_for(module: nn.Module) -> nn.Module:
    family = family_of(module) or GENERIC
    if family.shortcut_module(module) is None and family.lesion_is_identity_map:
        return RemovedBlock()
    return LesionedBlock(module, family)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def prune_model(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Replace the named blocks in place by their lesions (:class:`RemovedBlock` / :class:`LesionedBlock`)."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"cannot prune {name!r}: the model has no such module") from None
        if getattr(module, "_resprobe_removed", False):
            raise ModelError(f"cannot prune {name!r}: it is already removed")
        _set_submodule(model, name, _replacement_for(module))
    return model


@register_recipe("prune")
def _build_pruned(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    """Rebuild a pruned model from a freshly built one (resprobe checkpoints, docs/reference.md)."""
    removed = recipe.get("removed")
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        raise ModelError("damaged prune recipe: 'removed' must be a list of block names")
    return prune_model(model, removed)


def save_pruned(probe: Probe, names: Sequence[str], path: str | Path,
                figures: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a resprobe checkpoint of ``probe``'s model without the named blocks.

    The recipe ``{"kind": "prune", "removed": [...]}`` is appended to the model's own recipes, and the
    probe's preprocessing is kept, so ``resprobe eval PATH`` reproduces the ablation's figures. An
    existing ``path`` is replaced (atomically) only with ``overwrite``.
    """
    check_rebuildable(probe)
    pruned = prune_model(copy.deepcopy(probe.model), names)
    recipe = {"kind": "prune", "removed": list(names)}
    meta = {"pruned_from": str(probe.loaded.spec), "pruned_checkpoint": probe.loaded.checkpoint,
            "ablation": dict(figures or {})}
    return save_resprobe_checkpoint(path, probe.loaded, model=pruned, recipes=[*probe.loaded.recipes, recipe],
                                    preprocessing=probe.preprocessing_used.to_dict(), meta=meta,
                                    replace=overwrite, option="--save-pruned")


def check_rebuildable(probe: Probe) -> None:
    source = probe.loaded.arch.get("source")
    if source not in REBUILDABLE_SOURCES:
        raise BadValue(f"--save-pruned: a model loaded from a pickled module ({source}) cannot be rebuilt; "
                       "load it by architecture name with --checkpoint instead")


@dataclass
class PrunedResult:
    path: str
    removed: list[str]
    loss: float
    acc: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
