"""MODEL specs (`timm:NAME`, `torchvision:NAME`, a checkpoint path, `package.module:callable`) to a loaded model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resprobe.errors import ModelError
from resprobe.models.build import (
    _classifier_name,
    _is_local_callable,
    build_architecture,
    build_with_weights,
    classifier_key,
    infer_num_classes,
    load_weights,
    seeded_init,
)
from resprobe.models.checkpoints import (
    _PATH_SUFFIXES,
    CHECKPOINT_FORMAT_VERSION,
    _first_line,
    _is_tensor_dict,
    extract_state_dict,
    is_resprobe_checkpoint,
    read_checkpoint,
)
from resprobe.models.fingerprint import _file_key, file_sha256
from resprobe.models.recipes import apply_recipe


@dataclass(frozen=True)
class ModelSpec:
    """A parsed MODEL argument."""

    source: str  # "timm" | "torchvision" | "hf-hub" | "path" | "callable"
    name: str
    weights: str | None = None  # torchvision weights enum member, e.g. "IMAGENET1K_V1"

    def __str__(self) -> str:
        if self.source in ("path", "callable"):
            return self.name
        if self.source == "torchvision" and self.weights:
            return f"torchvision:{self.name}:{self.weights}"
        return f"{self.source}:{self.name}"


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text
        or text.startswith(".")
        or text.lower().endswith(_PATH_SUFFIXES)
        or Path(text).exists()
    )


def parse_model_spec(text: str) -> ModelSpec:
    """Parse a MODEL argument into a :class:`ModelSpec` (no model is built)."""
    text = text.strip()
    if not text:
        raise ModelError("empty MODEL: give e.g. timm:resnet18, torchvision:resnet50 or a checkpoint path")
    for source in ("torchvision", "timm", "hf-hub"):
        if text.startswith(source + ":"):
            rest = text[len(source) + 1 :]
            if not rest:
                raise ModelError(f"MODEL {text!r} names no model after '{source}:'")
            if source == "torchvision":
                name, _, weights = rest.partition(":")
                return ModelSpec(source, name, weights or None)
            return ModelSpec(source, rest)
    if _looks_like_path(text):
        return ModelSpec("path", text)
    if ":" in text:
        module, _, attr = text.partition(":")
        if module and attr and all(part.isidentifier() for part in module.split(".")) and attr.isidentifier():
            return ModelSpec("callable", text)
        raise ModelError(f"cannot read MODEL {text!r}: expected timm:NAME, torchvision:NAME[:WEIGHTS], "
                         "hf-hub:ORG/NAME, a checkpoint path or package.module:callable")
    return ModelSpec("timm", text)


@dataclass
class LoadOptions:
    """How to build a model and where its weights come from."""

    checkpoint: str | Path | None = None
    pretrained: bool = False
    num_classes: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    ema: bool = False
    trust_checkpoint: bool = False
    offline: bool = False  # --offline: pretrained weights and hub configs from the local caches only
    seed: int = 0  # --seed: the random initialization of whatever the weights do not cover


@dataclass
class LoadedModel:
    """A built model and everything the other modules need to know about where it came from."""

    model: nn.Module
    spec: ModelSpec
    arch: dict[str, Any]  # JSON-able: {"source", "name", "num_classes", "kwargs"}
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    weights_sha256: str | None = None  # state_dict_sha256 of the weights as loaded (set by open_probe)
    preprocessing: dict[str, Any] | None = None  # recorded by resprobe checkpoints
    classes: list[str] | None = None  # class names by index, recorded by resprobe checkpoints trained on folders
    recipes: list[dict[str, Any]] = field(default_factory=list)
    torchvision_weights: Any = None  # a torchvision WeightsEnum member when weights were named
    meta: dict[str, Any] = field(default_factory=dict)
    # The checkpoint file did not change between its read and its hash: checkpoint_sha256 names exactly
    # the bytes the weights came from, so their fingerprint may be remembered by it (weights_fingerprint).
    checkpoint_stable: bool = field(default=False, repr=False)

    @property
    def num_classes(self) -> int | None:
        return self.arch.get("num_classes")

    @property
    def source(self) -> str:
        return self.arch["source"]


# timm.create_model arguments that load files or configurations: never taken from a checkpoint.
_UNSAFE_ARCH_KWARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                       "weights", "progress")


def _checked_arch(obj: Mapping[str, Any], path: Path, opts: LoadOptions) -> dict[str, Any]:
    """The architecture record of a resprobe checkpoint, checked before anything is built from it."""
    try:
        version = int(obj.get("format_version", 0))
    except (TypeError, ValueError):
        raise ModelError(f"{path} is a damaged resprobe checkpoint (format_version "
                         f"{obj.get('format_version')!r})") from None
    if version > CHECKPOINT_FORMAT_VERSION:
        raise ModelError(f"{path} was written by a newer resprobe (format {version}); upgrade resprobe")
    arch = obj.get("arch")
    if (not isinstance(arch, Mapping) or not isinstance(arch.get("source"), str)
            or not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs") or {}, Mapping)
            or not isinstance(arch.get("num_classes"), (int, type(None))) or not _is_tensor_dict(obj.get("state_dict"))
            or not isinstance(obj.get("recipes") or [], list)
            or not all(isinstance(r, Mapping) for r in obj.get("recipes") or [])):
        raise ModelError(f"{path} is a damaged resprobe checkpoint (no architecture or no weights); write it again")
    arch = dict(arch)
    kwargs = dict(arch.get("kwargs") or {})
    unsafe = [k for k in kwargs if not isinstance(k, str) or k in _UNSAFE_ARCH_KWARGS]
    if unsafe:
        raise ModelError(f"{path} records model arguments that would load other files ({', '.join(map(str, unsafe))}); "
                         "resprobe does not take those from a checkpoint")
    if arch["source"] == "callable" and not opts.trust_checkpoint and not _is_local_callable(arch["name"]):
        raise ModelError(
            f"{path} records its architecture as the Python callable {arch['name']!r} from an installed library or "
            "the standard library; building it would run that code with arguments taken from the file: pass "
            "--trust-checkpoint only if you trust the file"
        )
    if arch["source"] == "pickled-module":
        raise ModelError(f"{path} records a pickled module, which cannot be rebuilt; load the original file")
    return arch


def _load_resprobe_checkpoint(obj: Mapping[str, Any], path: Path, opts: LoadOptions) -> LoadedModel:
    arch = _checked_arch(obj, path, opts)
    if opts.num_classes is not None and opts.num_classes != arch.get("num_classes"):
        raise ModelError(f"{path} has {arch.get('num_classes')} classes; --num-classes {opts.num_classes} does not "
                         "fit: leave --num-classes out")
    model, weights = build_architecture({**arch, "weights": None}, offline=opts.offline)
    for recipe in obj.get("recipes") or []:
        try:
            model = apply_recipe(model, recipe)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged recipe
            raise ModelError(f"{path} holds a recipe ({recipe.get('kind')!r}) that cannot be applied "
                             f"({_first_line(exc)}); the file is damaged or from another resprobe") from exc
    load_weights(model, obj["state_dict"], str(path))
    return LoadedModel(
        model=model,
        spec=ModelSpec("path", str(path)),
        arch=arch,
        preprocessing=obj.get("preprocessing"),
        classes=_checked_classes(obj.get("classes"), arch.get("num_classes"), path),
        recipes=list(obj.get("recipes") or []),
        meta=dict(obj.get("meta") or {}),
    )


def _checked_classes(classes: Any, num_classes: int | None, path: Path) -> list[str] | None:
    """A resprobe checkpoint's class names (one distinct name per class, in index order), or None."""
    if classes is None:
        return None
    if (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes) or (num_classes is not None and len(classes) != num_classes)):
        raise ModelError(f"{path} is a damaged resprobe checkpoint (its class names do not match its "
                         f"{num_classes} classes); write it again")
    return list(classes)


def _arch_from_training_checkpoint(obj: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    """timm ``train.py`` checkpoints name ``arch``; torchvision reference ones keep ``args.model``."""
    if isinstance(obj.get("arch"), str):
        return {"source": "timm", "name": obj["arch"]}
    args = obj.get("args")
    model_name = getattr(args, "model", None) if args is not None else None
    if isinstance(model_name, str) and "model" in obj:
        return {"source": "torchvision", "name": model_name}
    return None


def _training_model_kwargs(obj: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """timm ``train.py`` keeps its ``--model-kwargs`` in ``args.model_kwargs``: the architecture needs
    them (a quarter-width ResNet does not fit a full-width one). ``--model-kwargs`` overrides them."""
    kwargs = getattr(obj.get("args"), "model_kwargs", None)
    if not kwargs:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ModelError(f"{path}: args.model_kwargs is a {type(kwargs).__name__}, not a dict of model arguments")
    unsafe = [k for k in kwargs if k in _UNSAFE_ARCH_KWARGS]
    if unsafe:
        raise ModelError(f"{path} records model arguments that would load other files ({', '.join(unsafe)}); "
                         "resprobe does not take those from a checkpoint")
    return dict(kwargs)


def load_model(model: str | ModelSpec, opts: LoadOptions | None = None) -> LoadedModel:
    """Build MODEL and load its weights as docs/reference.md describes; the model is returned in eval mode."""
    opts = opts or LoadOptions()
    spec = model if isinstance(model, ModelSpec) else parse_model_spec(model)
    if opts.num_classes is not None and opts.num_classes < 1:
        raise ModelError(f"--num-classes must be at least 1, got {opts.num_classes}")
    with seeded_init(opts.seed):  # whatever no weights cover is the same network every time
        loaded = _load(spec, opts)
    loaded.model.eval()
    return loaded


def _load(spec: ModelSpec, opts: LoadOptions) -> LoadedModel:
    if spec.source == "path":
        loaded = _load_from_path(spec, opts)
    else:
        if opts.pretrained and opts.checkpoint:
            raise ModelError("give either --pretrained or --checkpoint, not both")
        state_dict = None
        checkpoint_path = Path(opts.checkpoint) if opts.checkpoint else None
        if checkpoint_path is not None:
            before = _file_key(checkpoint_path)
            obj = read_checkpoint(checkpoint_path, opts.trust_checkpoint)
            if is_resprobe_checkpoint(obj):
                raise ModelError(f"{checkpoint_path} is a resprobe checkpoint: give it as MODEL, not --checkpoint")
            state_dict = extract_state_dict(obj, opts.ema, str(checkpoint_path))
        arch = {"source": spec.source, "name": spec.name, "num_classes": opts.num_classes,
                "kwargs": dict(opts.model_kwargs)}
        if spec.source == "torchvision":
            arch["weights"] = spec.weights
        if state_dict is not None and opts.num_classes is None:
            arch["num_classes"] = infer_num_classes(state_dict, _classifier_name(arch))
        if state_dict is not None:
            built, tv_weights = build_with_weights(arch, state_dict, str(checkpoint_path), opts.offline)
        else:
            built, tv_weights = build_architecture(arch, pretrained=opts.pretrained, offline=opts.offline)
        arch["num_classes"] = _model_num_classes(built, arch.get("num_classes"))
        loaded = LoadedModel(model=built, spec=spec, arch=arch, torchvision_weights=tv_weights)
        if state_dict is not None:
            loaded.checkpoint = str(checkpoint_path)
            loaded.checkpoint_sha256 = file_sha256(checkpoint_path)
            loaded.checkpoint_stable = before is not None and before == _file_key(checkpoint_path)
    return loaded


def _model_num_classes(model: nn.Module, fallback: int | None) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    key = classifier_key(model)
    if key:
        module = model.get_submodule(key)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[0])
    return fallback


def _load_from_path(spec: ModelSpec, opts: LoadOptions) -> LoadedModel:
    path = Path(spec.name)
    if opts.checkpoint:
        raise ModelError(f"MODEL is already a checkpoint ({path}); drop --checkpoint")
    before = _file_key(path)
    obj = read_checkpoint(path, opts.trust_checkpoint)
    sha = file_sha256(path)
    stable = before is not None and before == _file_key(path)
    if is_resprobe_checkpoint(obj):
        loaded = _load_resprobe_checkpoint(obj, path, opts)
    elif isinstance(obj, nn.Module):  # only reachable with --trust-checkpoint
        loaded = LoadedModel(model=obj, spec=spec, arch={"source": "pickled-module", "name": type(obj).__name__,
                                                          "num_classes": _model_num_classes(obj, None)})
    else:
        arch = _arch_from_training_checkpoint(obj, path) if isinstance(obj, Mapping) else None
        if arch is None:
            raise ModelError(
                f"{path} does not record its architecture; give the architecture as MODEL and the file as "
                f"--checkpoint (e.g. resprobe eval timm:resnet18 --checkpoint {path})"
            )
        state_dict = extract_state_dict(obj, opts.ema, str(path))
        arch["kwargs"] = {**_training_model_kwargs(obj, path), **opts.model_kwargs}
        arch["num_classes"] = opts.num_classes or infer_num_classes(state_dict, _classifier_name(arch))
        model, _ = build_with_weights(arch, state_dict, str(path), opts.offline)
        loaded = LoadedModel(model=model, spec=spec, arch=arch)
    loaded.checkpoint, loaded.checkpoint_sha256 = str(path), sha
    loaded.checkpoint_stable = stable and loaded.source != "pickled-module"  # a module's own code may vary
    return loaded
