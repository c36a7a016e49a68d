"""A language model without some of its decoder layers, as plain transformers loads it (DESIGN §8
"ablate"): the kept layers in a shorter list, the config's layer count and per-layer lists trimmed,
every ``layer_idx`` renumbered 0..n−1 (the KV cache is indexed by it), saved with ``save_pretrained``
(safetensors) and the tokenizer beside it."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resprobe.errors import BadValue, ModelError
from resprobe.models.causal_lm import decoder_layers, text_config

INDEX_LISTS = ("mlp_only_layers",)  # config lists that hold layer indices (renumbered, not trimmed)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _layer_indices(module: nn.Module) -> list[tuple[nn.Module, int]]:
    return [(m, m.layer_idx) for m in module.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _pruned_config_values(config: Any, removed: set[int], n: int) -> dict[str, Any]:
    """The config attributes that change: the layer count, lists with one entry per layer (trimmed),
    lists of layer indices (renumbered)."""
    kept = [i for i in range(n) if i not in removed]
    new_index = {old: new for new, old in enumerate(kept)}
    values: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == n and key not in INDEX_LISTS:
            values[key] = type(value)(v for i, v in enumerate(value) if i not in removed)
        elif key in INDEX_LISTS and isinstance(value, (list, tuple)):
            values[key] = type(value)(new_index[i] for i in value if i in new_index)
    return values


def check_prunable(model: nn.Module) -> None:
    """Refuse what renumbered layers would change: GPT-2's attention scaled by 1/(layer_idx + 1)."""
    config = text_config(model.config)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ModelError("this model scales attention by its layer index (scale_attn_by_inverse_layer_idx): a pruned "
                         "copy with renumbered layers would compute something else")


@contextmanager
def pruned_in_place(model: nn.Module, removed: Sequence[int]) -> Iterator[nn.Module]:
    """Within the context, ``model`` is the pruned model (its modules shared, nothing copied); all is
    put back afterwards, also after an exception."""
    check_prunable(model)
    name, layers = decoder_layers(model)
    n = len(layers)
    removed_set = set(removed)
    if not removed_set or not removed_set <= set(range(n)) or len(removed_set) >= n:
        raise BadValue(f"cannot remove layers {sorted(removed)} of {n}: keep at least one")
    owner, attr = _parent(model, name)
    config = text_config(model.config)
    values = _pruned_config_values(config, removed_set, n)
    saved_config = {key: getattr(config, key) for key in values}
    kept = [layer for i, layer in enumerate(layers) if i not in removed_set]
    saved_indices = [pair for layer in kept for pair in _layer_indices(layer)]
    try:
        setattr(owner, attr, nn.ModuleList(kept))
        for key, value in values.items():
            setattr(config, key, value)
        for new, layer in enumerate(kept):
            for module, _ in _layer_indices(layer):
                module.layer_idx = new
        yield model
    finally:
        setattr(owner, attr, layers)
        for key, value in saved_config.items():
            setattr(config, key, value)
        for module, index in saved_indices:
            module.layer_idx = index


def pruned_copy(model: nn.Module, removed: Sequence[int]) -> nn.Module:
    """A new model without the layers ``removed``; ``model`` is left as it was."""
    with pruned_in_place(model, removed) as pruned:
        return copy.deepcopy(pruned)


def _check_loadable(model: nn.Module) -> None:
    """The pruned config must build the same modules (an MoE whose dense/sparse layers follow the index
    pattern would not): compared on the meta device, nothing allocated."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))
        raise ModelError(f"the pruned model's config would build other layers than it keeps ({diff[0][0]}): "
                         f"transformers could not load it as saved")


def check_out_dir(path: str | Path, overwrite: bool) -> Path:
    """A folder that may be written: absent, or (with ``overwrite``) empty or a model folder. Other
    folders are never replaced: they may hold the user's files."""
    out = Path(path).expanduser()
    if not out.parent.is_dir():
        raise BadValue(f"--save-pruned {out}: directory {out.parent} does not exist")
    if out.exists():
        if not overwrite:
            raise BadValue(f"--save-pruned {out} already exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise BadValue(f"--save-pruned {out} is a file; give a folder path")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise BadValue(f"--save-pruned {out} holds files but no config.json: resprobe replaces only a model "
                           "folder; give another path")
    return out


def save_pruned_lm(model: nn.Module, tokenizer: Any, removed: Sequence[int], path: str | Path,
                   overwrite: bool = False) -> Path:
    """Write the model without layers ``removed`` to ``path`` (a folder; written beside it first, then
    moved in place, so an interrupted save leaves no half folder)."""
    out = check_out_dir(path, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with pruned_in_place(model, removed) as pruned:
            _check_loadable(pruned)
            pruned.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
