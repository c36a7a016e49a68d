"""Building architectures (timm, torchvision, callables) and loading weights into them."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from resprobe.errors import ModelError

if TYPE_CHECKING:  # annotations only: no import cycle
    from resprobe.models.loading import LoadedModel
from resprobe.models.checkpoints import _first_line, read_checkpoint


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Random initialization seeded from ``seed`` inside, the caller's CPU random state restored after:
    a model built without weights (or a fresh head) is the same network in every process, every
    torchrun rank and every ``--resume``. Only the CPU generator is seeded (models are built there);
    CUDA and MPS generators are not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield


def built_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) a fixed-size model is built for, or None when it takes any size.

    timm's patch embeddings with a strict ``img_size`` (ViT, DeiT, BEiT, EVA, Swin) and torchvision's
    VisionTransformer (``image_size``) assert the size in their forward; their pretrained config may
    name another size than the model was built with (``--model-kwargs '{"img_size": 32}'``).
    """
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if getattr(module, "strict_img_size", False) is True and size is not None:
            height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
            return int(height), int(width)
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and hasattr(model, "conv_proj"):  # torchvision VisionTransformer
        return size, size
    return None


def input_size_mismatch(loaded: LoadedModel, height: int, width: int, given: str) -> str | None:
    """The one line for a fixed-size model asked to run on other (H, W) (``given`` says whose size
    it is), naming the ``--model-kwargs`` that build it for that size; None when it fits."""
    built = built_input_size(loaded.model)
    if built is None or built == (height, width):
        return None
    key = "image_size" if loaded.source == "torchvision" else "img_size"
    size = height if height == width else [height, width]
    extra = ", ..." if loaded.source != "torchvision" else ""
    return (f"{loaded.spec} is built for {built[0]}×{built[1]} inputs only, and {given} is {height}×{width}: build it "
            f"for that size with --model-kwargs '{{\"{key}\": {json.dumps(size)}{extra}}}' (with a patch size "
            "and, for Swin, a window size that divide it), or give inputs of its size")


def _close_matches(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def _build_timm(name: str, num_classes: int | None, kwargs: dict[str, Any], pretrained: bool,
                offline: bool = False) -> nn.Module:
    import timm

    from resprobe.models import hub

    if not name.startswith("hf-hub:") and not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}{_close_matches(name, timm.list_models())}")
    build_kwargs = dict(kwargs)
    if num_classes is not None:
        build_kwargs["num_classes"] = num_classes
    # an unknown tag is named here, not as a failed download
    cfg = hub.timm_pretrained_cfg(name) if pretrained and not name.startswith("hf-hub:") else None
    target, source_kwargs = hub.timm_target(name, cfg, pretrained, offline)  # the caches first, then the hub
    build_kwargs.update(source_kwargs)
    try:
        with hub.quiet_retries():
            model = timm.create_model(target, pretrained=pretrained, **build_kwargs)
    except TypeError as exc:
        raise ModelError(f"cannot build timm model {name!r} with --model-kwargs {json.dumps(kwargs, default=str)}: "
                         f"{exc}") from exc
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained or name.startswith("hf-hub:"):
            raise ModelError(
                f"cannot get the pretrained weights or config of {name} ({_first_line(exc)}); check the network "
                f"(the cache is {hub.hf_cache_dir()}), or pass --checkpoint PATH"
            ) from exc
        raise ModelError(f"cannot build timm model {name!r}: {_first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - timm asserts on impossible arguments
        raise ModelError(f"cannot build timm model {name!r} with --model-kwargs {json.dumps(kwargs, default=str)}: "
                         f"{_first_line(exc)}") from exc
    if cfg is not None and num_classes is not None and cfg.get("num_classes") not in (None, num_classes):
        _say_new_head(f"timm:{name}", cfg["num_classes"], num_classes, classifier_key(model))
    return model


def _say_new_head(what: str, head_classes: int, num_classes: int, head: str | None) -> None:
    import warnings

    warnings.warn(f"{what}: the pretrained {head_classes}-class classifier ({head}) is left out; the model has a "
                  f"new {num_classes}-class classifier, randomly initialized (train it before trusting its figures)",
                  stacklevel=3)


def _torchvision_weights(name: str, weights: str | None, pretrained: bool) -> Any:
    from torchvision.models import get_model_weights

    if weights is None and not pretrained:
        return None
    enum = get_model_weights(name)
    key = weights or "DEFAULT"
    key = key.split(".")[-1]
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        options = ", ".join(w.name for w in enum)
        raise ModelError(f"torchvision model {name} has no weights {weights!r}; choose one of {options}") from None


def _build_torchvision(name: str, num_classes: int | None, kwargs: dict[str, Any], weights: Any,
                       offline: bool = False) -> nn.Module:
    from torchvision.models import get_model, list_models

    if name not in list_models():
        raise ModelError(f"unknown torchvision model {name!r}{_close_matches(name, list_models())}")
    build_kwargs = dict(kwargs)
    if num_classes is not None:
        build_kwargs["num_classes"] = num_classes
    try:
        model = get_model(name, weights=None, **build_kwargs)
    except Exception as exc:  # noqa: BLE001 - TypeError for unknown arguments, asserts, ValueError
        raise ModelError(f"cannot build torchvision model {name!r} with {json.dumps(kwargs, default=str)}: "
                         f"{_first_line(exc)}") from exc
    if weights is not None:
        from resprobe.models.hub import torchvision_weights_file

        state = read_checkpoint(torchvision_weights_file(weights, offline))
        head_classes = len(weights.meta.get("categories") or [])
        if num_classes is not None and head_classes and num_classes != head_classes:
            state = _without_head(model, state, num_classes, head_classes, f"torchvision:{name}:{weights.name}")
        load_weights(model, state, f"torchvision weights {weights}")
    return model


def _without_head(model: nn.Module, state: Mapping[str, torch.Tensor], num_classes: int, head_classes: int,
                  what: str) -> dict[str, torch.Tensor]:
    """Pretrained body, new head (as timm's ``create_model(pretrained=True, num_classes=N)``): the
    weights with the model's own fresh N-class classifier in place of theirs, said on stderr."""
    head = classifier_key(model, num_classes)
    own = model.state_dict()
    replaced = {k: own[k] for k in own if head is not None and k.rsplit(".", 1)[0] == head}
    if replaced:
        _say_new_head(what, head_classes, num_classes, head)
    return {**state, **replaced}


# Modules that moved when the package was laid out in folders: checkpoints written before record the old
# path (`resprobe.zoo:cifar_resnet`), and users have typed it.
MOVED_MODULES = {"resprobe.zoo": "resprobe.models.zoo"}


def _build_callable(target: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = target.partition(":")
    module_name = MOVED_MODULES.get(module_name, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for MODEL {target}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        raise ModelError(f"{module_name} has no callable {attr!r}{_close_matches(attr, names)}")
    build_kwargs = dict(kwargs)
    if num_classes is not None:
        build_kwargs["num_classes"] = num_classes
    try:
        model = factory(**build_kwargs)
    except TypeError as exc:
        raise ModelError(f"cannot build {target} with {json.dumps(build_kwargs, default=str)}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{target} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_architecture(arch: Mapping[str, Any], pretrained: bool = False,
                       offline: bool = False) -> tuple[nn.Module, Any]:
    """Build a model from an architecture record (``LoadedModel.arch``): randomly initialized, or with
    the hubs' pretrained weights (``offline``: from the local caches only)."""
    source, name = arch["source"], arch["name"]
    num_classes, kwargs = arch.get("num_classes"), dict(arch.get("kwargs") or {})
    if source in ("timm", "hf-hub"):
        full = name if source == "timm" else f"hf-hub:{name}"
        return _build_timm(full, num_classes, kwargs, pretrained, offline), None
    if source == "torchvision":
        weights = _torchvision_weights(name, arch.get("weights"), pretrained)
        return _build_torchvision(name, num_classes, kwargs, weights, offline), weights
    if source == "callable":
        return _build_callable(name, num_classes, kwargs), None
    raise ModelError(f"cannot rebuild an architecture from source {source!r}")


def build_with_weights(arch: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                       source: str, offline: bool = False) -> tuple[nn.Module, Any]:
    """Build an architecture and load ``state_dict`` into it, without initializing it randomly first.

    The model is built on the meta device and takes the checkpoint's tensors (cast to its own dtypes):
    random initialization of a ResNet-50 costs about half a second that the weights then overwrite.
    Where that cannot work (a build that fails on the meta device, a tensor the checkpoint does not
    hold, such as a buffer computed at construction) the model is built and loaded the ordinary way.
    """
    try:
        with torch.device("meta"):
            model, weights = build_architecture(arch, offline=offline)
    except Exception:  # noqa: BLE001 - some constructors compute with their tensors (RegNet; wrapped in a
        model = None  # ModelError by the builders): the real build below says what is really wrong
    if model is not None:
        own = model.state_dict()
        tensors = [*model.parameters(), *model.buffers()]
        if (set(own) <= set(state_dict) and len(tensors) == len(own)
                and all(isinstance(v, torch.Tensor) and v.shape == own[k].shape for k, v in state_dict.items()
                        if k in own)):
            load_weights(model, {k: v.to(own[k].dtype).contiguous() if k in own else v
                                 for k, v in state_dict.items()}, source, assign=True)
            if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                return model, weights
    model, weights = build_architecture(arch, offline=offline)
    load_weights(model, state_dict, source)
    return model, weights


def classifier_key(model: nn.Module, num_classes: int | None = None) -> str | None:
    """The module name of the classifier, found without a list of names per family.

    timm says it (``pretrained_cfg["classifier"]``); otherwise it is the last ``nn.Linear`` in module
    order (torchvision's ``fc``, ``classifier.1``, ``classifier.2``, ``heads.head``, ``head``), the last
    one with ``num_classes`` outputs when the class count is known (``model.num_classes`` by default),
    and a 1×1 convolution only in a model with no Linear layer at all (SqueezeNet).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, str) and name:
        return name
    count = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    candidates = [(n, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not candidates:
        candidates = [(n, m.out_channels) for n, m in model.named_modules()
                      if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)]
    fitting = [n for n, out in candidates if out == count] if isinstance(count, int) else []
    if fitting:
        return fitting[-1]
    return candidates[-1][0] if candidates else None


def _classifier_name(arch: Mapping[str, Any]) -> str | None:
    """The classifier's module name for an architecture: timm's registry says it; other models are
    built on the meta device (no memory, no initialization) with their default head and looked at."""
    if arch["source"] == "timm":
        from timm.models import get_pretrained_cfg_value

        try:
            return get_pretrained_cfg_value(arch["name"], "classifier")
        except Exception:  # noqa: BLE001 - unknown names fail later with a clear message
            return None
    default_head = {**arch, "num_classes": None, "weights": None}
    try:
        with torch.device("meta"):
            probe, _ = build_architecture(default_head)
    except Exception:  # noqa: BLE001 - a constructor that computes with its tensors (RegNet): build it for real
        probe, _ = build_architecture(default_head)
    return classifier_key(probe)


def infer_num_classes(state_dict: Mapping[str, torch.Tensor], classifier: str | None) -> int | None:
    """Read the class count from the classifier's weight in ``state_dict``."""
    for key in ([f"{classifier}.weight"] if classifier else []) + ["fc.weight", "head.fc.weight"]:
        weight = state_dict.get(key)
        if isinstance(weight, torch.Tensor) and weight.dim() in (2, 4):
            return int(weight.shape[0])
    return None


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, strict: bool = True,
                 assign: bool = False) -> None:
    """``load_state_dict`` whose failure names the first offending keys and the likely cause."""
    own = model.state_dict()
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"weights from {source} are not all tensors ({bad[0]} is a {type(state_dict[bad[0]]).__name__})")
    mismatched_keys = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]

    def listed(keys: list[str], n: int = 3) -> str:
        return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")

    classifier = classifier_key(model)
    head_keys = {f"{classifier}.weight", f"{classifier}.bias"} if classifier else set()
    if mismatched_keys and set(mismatched_keys) <= head_keys and not (strict and (missing or unexpected)):
        theirs, ours = state_dict[f"{classifier}.weight"].shape[0], own[f"{classifier}.weight"].shape[0]
        raise ModelError(f"weights from {source} have a {theirs}-class classifier but the model has {ours} classes: "
                         f"pass --num-classes {theirs} (or leave --num-classes out to take it from the checkpoint)")
    parts = []
    if strict and missing:
        parts.append(f"missing {listed(missing)}")
    if strict and unexpected:
        parts.append(f"unexpected {listed(unexpected)}")
    if mismatched_keys:
        shapes = [f"{k} (checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)})" for k in mismatched_keys]
        parts.append(f"shape mismatch for {listed(shapes, 2)}")
    if parts:
        raise ModelError(f"weights from {source} do not fit the model: {'; '.join(parts)}; likely another "
                         "architecture or other --model-kwargs than the checkpoint was trained with")
    try:
        model.load_state_dict(state_dict, strict=False, assign=assign)
    except Exception as exc:  # noqa: BLE001 - e.g. a dtype that cannot be copied
        raise ModelError(f"weights from {source} do not fit the model: {_first_line(exc)}") from exc


def _is_local_callable(target: str) -> bool:
    """Whether ``package.module:callable`` is the user's own code (or resprobe's model zoo): not the
    standard library, not an installed package. Nothing is imported to find out."""
    import importlib.util
    import site
    import sys
    import sysconfig

    module = target.partition(":")[0]
    if MOVED_MODULES.get(module, module) == "resprobe.models.zoo":
        return True
    top = module.split(".")[0]
    if not top or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return True  # not importable: building fails with a clear message, nothing runs
    if spec is None:
        return True
    locations = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    if not locations or any(loc in ("built-in", "frozen", None) for loc in locations):
        return False
    libraries = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    libraries |= set(getattr(site, "getsitepackages", lambda: [])()) | {site.getusersitepackages()}
    roots = [Path(lib).resolve() for lib in libraries if lib]
    for location in locations:
        resolved = Path(location).resolve()
        if any(resolved == root or root in resolved.parents for root in roots):
            return False
    return True
