"""Model specs, model building, safe checkpoint loading and resprobe's own checkpoints.

A MODEL argument (docs/reference.md) is one of::

    torchvision:NAME[:WEIGHTS]   timm:NAME   NAME (timm)   hf-hub:ORG/NAME
    PATH (a checkpoint that records its architecture)   package.module:callable

Weights come from ``--checkpoint PATH`` or ``--pretrained`` (the hubs' weights as timm and torchvision
load them, downloaded when not cached; ``--offline`` keeps to the local caches, see :mod:`resprobe.hub`).
Every ``torch.load`` here uses ``weights_only=True``; arbitrary unpickling happens only when the
caller passes ``trust_checkpoint=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import importlib
import json
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resprobe import __version__
from resprobe.errors import BadValue, ModelError

CHECKPOINT_FORMAT = "resprobe-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar", ".pth.tar")
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------
# Specs


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


# --------------------------------------------------------------------------------------------------
# Reading checkpoint files safely


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, remembered by path, size and times (:func:`_sha256_cache`): a
    1.2 GB checkpoint costs seconds to hash, and every command names its file's hash."""
    path = Path(path)
    key = _file_key(path)
    cache = _sha256_cache()
    if key is not None:
        cached = cache.get(key[0])
        if isinstance(cached, dict) and cached.get("stat") == key[1] and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    if key is not None and key == _file_key(path):  # unchanged while it was read
        _remember_sha256(cache, key, sha)
    return sha


_SHA256_CACHE_ENTRIES = 256  # the most recently hashed files; older entries are dropped


def _file_key(path: Path) -> tuple[str, list[int]] | None:
    """(resolved path, [device, inode, size, mtime_ns, ctime_ns]): the change time moves with every
    write and cannot be set back by the user, so a rewritten file never matches its old entry."""
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except OSError:
        return None
    return str(resolved), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _sha256_cache_path() -> Path:
    """In the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``), never beside their files."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resprobe" / "sha256.json"


def _sha256_cache() -> dict[str, Any]:
    try:
        data = json.loads(_sha256_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_sha256(cache: dict[str, Any], key: tuple[str, list[int]], sha: str) -> None:
    """Add an entry; written to a temporary name and renamed, so concurrent commands (torchrun ranks)
    never read half a file. A cache that cannot be written is no error: the hash is computed again."""
    cache.pop(key[0], None)
    cache[key[0]] = {"stat": key[1], "sha256": sha}
    for old in list(cache)[:-_SHA256_CACHE_ENTRIES]:
        del cache[old]
    path = _sha256_cache_path()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def state_dict_sha256(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """The fingerprint of a model's weights: sha256 over its state dict in sorted key order, each
    entry's name, dtype and shape, then its bytes (read in place through a memoryview, not copied).
    Equal for equal weights whatever file or seed they came from; recordings and reports carry it
    as ``weights_sha256`` so that a resume or ``ablate --recording`` can refuse other weights."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        flat = tensor.contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{raw.numel()}\n".encode())
        digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def weights_fingerprint(loaded: LoadedModel, ema: bool = False, seed: int = 0) -> str:
    """:func:`state_dict_sha256` of a loaded model, remembered (in the sha256 cache) for weights loaded
    whole from an unchanged checkpoint: the same file bytes built into the same architecture give the
    same tensors, so a command on a known file skips hashing them again (0.06 s CPU for ResNet-50's
    94 MB here; seconds for a ViT-L). Weights from anywhere else are hashed every time."""
    if not (loaded.checkpoint_stable and loaded.checkpoint_sha256):
        return state_dict_sha256(loaded.model)
    # everything that decides the tensors built from those bytes (another torch could cast differently)
    load = json.dumps({"file": loaded.checkpoint_sha256, "arch": loaded.arch, "recipes": loaded.recipes, "ema": ema,
                       "seed": seed, "torch": torch.__version__, "resprobe": __version__}, sort_keys=True, default=str)
    key = "weights:" + hashlib.sha256(load.encode()).hexdigest()
    cache = _sha256_cache()
    cached = cache.get(key)
    if isinstance(cached, dict) and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    sha = state_dict_sha256(loaded.model)
    _remember_sha256(cache, (key, []), sha)
    return sha


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Random initialization seeded from ``seed`` inside, the caller's CPU random state restored after:
    a model built without weights (or a fresh head) is the same network in every process, every
    torchrun rank and every ``--resume``. Only the CPU generator is seeded (models are built there);
    CUDA and MPS generators are not touched."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield


def _check_readable_file(path: Path, what: str = "checkpoint") -> None:
    if not path.exists():
        raise ModelError(f"{what} not found: {path}")
    if path.is_dir():
        raise ModelError(f"{what} {path} is a directory; give the path of a file")
    if not os.access(path, os.R_OK):
        raise ModelError(f"{what} {path} is not readable (check its permissions)")


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_REFUSED_OBJECT_PATTERNS = (
    r"GLOBAL (\S+) was not an allowed global",  # a class or function the file wants imported
    r"unsupported GLOBAL (\S+) whose module",  # ... from a blocked module (os, subprocess, ...)
    r"Trying to call reduce for unrecognized function (\S+)",
    r"Can only create new object for nn.Parameter or classes allowlisted via `add_safe_globals` but got (\S+)",
    r"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got (\S+)",
    r"(\S+) must be imported to load",
)


def _refused_objects(message: str) -> list[str] | None:
    """The objects ``weights_only`` refused to unpickle, or None when the file is merely damaged."""
    import re

    found = None
    for pattern in _REFUSED_OBJECT_PATTERNS:
        for match in re.finditer(pattern, message):
            found = (found or []) + [match.group(1).strip("`'\".,")]
    return found


def _unsafe_message(path: Path, objects: list[str]) -> str:
    detail = f" ({', '.join(dict.fromkeys(objects))})" if objects else ""
    return (f"refusing to unpickle {path}: it holds Python objects{detail}, and unpickling them could run code "
            "from the file; use a plain state dict or a .safetensors file of the weights instead, or pass "
            "--trust-checkpoint only if you trust where the file came from")


def looks_like_checkpoint(path: str | Path) -> bool:
    """A checkpoint's name or first bytes (zip, pickle or safetensors): ``align FILE`` tells them apart."""
    path = Path(path)
    if str(path).lower().endswith(_PATH_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)) or (len(head) == 9 and head[8:9] == b"{")


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> Any:
    """Load a checkpoint file's contents on the CPU without executing code from it.

    ``.safetensors`` files go through safetensors only (never unpickled, whatever they hold);
    everything else through ``torch.load`` with ``weights_only=True`` (``argparse.Namespace``
    allowed, as in timm and torchvision training checkpoints). ``trust_checkpoint=True`` is the only
    way to unpickle arbitrary objects. Every failure is a :class:`ModelError`.
    """
    path = Path(path)
    _check_readable_file(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise ModelError(f"checkpoint {path} is empty (0 bytes); it was not written completely: save it again")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if trust_checkpoint:
        return _load_trusted(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        objects = _refused_objects(str(exc))
        if objects is not None:
            raise ModelError(_unsafe_message(path, objects)) from exc
        error: Exception = exc
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail anywhere inside torch.load
        error = exc
    if _is_safetensors_file(path):  # safetensors without the suffix
        return _read_safetensors(path)
    raise ModelError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated: "
                     f"{_first_line(error)}); save or download it again") from error


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        # torch's advice (re-run with weights_only=False) is exactly wrong for a damaged file
        text = text.rsplit("WeightsUnpickler error:", 1)[-1].strip() or "unpickling failed"
    line = text.splitlines()[0].strip() if text else ""
    if ". " in line:  # the first sentence says it; torch's advice that follows does not apply
        line = line.split(". ")[0]
    return f"{type(exc).__name__}: {line[:160]}" if line else type(exc).__name__


def _load_trusted(path: Path) -> Any:
    """``--trust-checkpoint``: unpickle anything (runs code from the file, by the user's choice)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise ModelError(f"cannot unpickle {path}: it needs the Python module {exc.name!r}, which is not "
                         "installed here") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the file's own code raised
        if _is_safetensors_file(path):
            return _read_safetensors(path)
        raise ModelError(f"cannot unpickle {path} ({_first_line(exc)}); it is damaged, or not a PyTorch "
                         "checkpoint") from exc


def _is_safetensors_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, and torch errors for odd dtypes or shapes
        try:
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError:
            head = b""
        if head.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
            raise ModelError(
                f"{path} is named .safetensors but holds a pickled PyTorch checkpoint, which resprobe never "
                "unpickles under that name; convert it to real safetensors, or, only if you trust it, rename "
                "it to .pt (then it is loaded with weights_only=True, and --trust-checkpoint allows arbitrary "
                "objects)"
            ) from exc
        raise ModelError(f"{path} is not a readable safetensors file (corrupt or truncated: {_first_line(exc)}); "
                         "save or download it again") from exc


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` (DataParallel, AveragedModel) and ``_orig_mod.`` (torch.compile) prefixes.

    Drops ``n_averaged``, the counter torchvision's ``AveragedModel`` EMA keeps beside the weights.
    """
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES_TO_STRIP:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
            key = key.replace("._orig_mod.", ".")
        if key == "n_averaged":
            continue
        cleaned[key] = value
    return cleaned


_PLAIN_KEYS = ("state_dict", "model", "module", "net", "weights")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")


def extract_state_dict(obj: Any, ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the weights in a checkpoint's contents: a raw state dict or one under a known key."""
    if isinstance(obj, nn.Module):
        return clean_state_dict(obj.state_dict())
    if _is_tensor_dict(obj):
        if ema:
            raise ModelError(f"{source} is a plain state dict with no EMA weights; drop --ema")
        return clean_state_dict(obj)
    if not isinstance(obj, Mapping):
        raise ModelError(f"{source} holds a {type(obj).__name__}, not a state dict or a dict of weights")
    keys = _EMA_KEYS if ema else _PLAIN_KEYS
    for key in keys:
        value = obj.get(key)
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if _is_tensor_dict(value):
            return clean_state_dict(value)
    found = ", ".join(sorted(map(str, obj.keys()))[:8])
    if ema:
        raise ModelError(f"{source} has no EMA weights (looked for {', '.join(_EMA_KEYS)}; it has {found})")
    raise ModelError(f"{source} holds no weights (looked for a state dict or {', '.join(_PLAIN_KEYS)}; it has {found})")


# --------------------------------------------------------------------------------------------------
# Building models


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

    from resprobe import hub

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
        from resprobe.hub import torchvision_weights_file

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


def _build_callable(target: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = target.partition(":")
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


# --------------------------------------------------------------------------------------------------
# resprobe's own checkpoints and the recipes that rebuild pruned / shared models


RecipeBuilder = Callable[[nn.Module, Mapping[str, Any]], nn.Module]
_RECIPE_BUILDERS: dict[str, RecipeBuilder] = {}


def register_recipe(kind: str) -> Callable[[RecipeBuilder], RecipeBuilder]:
    """Register how to restructure a freshly built model for a recipe of ``kind`` (e.g. ``share``)."""

    def decorator(fn: RecipeBuilder) -> RecipeBuilder:
        _RECIPE_BUILDERS[kind] = fn
        return fn

    return decorator


# The modules whose import registers a recipe builder (imported on first need, not with the package).
_RECIPE_MODULES = ("resprobe.share", "resprobe.ablate")


def apply_recipe(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    kind = recipe.get("kind")
    for module in _RECIPE_MODULES:
        importlib.import_module(module)
    builder = _RECIPE_BUILDERS.get(str(kind))
    if builder is None:
        raise ModelError(f"this resprobe cannot rebuild a model with recipe {kind!r} (newer resprobe file?)")
    return builder(model, recipe)


def is_resprobe_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def save_resprobe_checkpoint(
    path: str | Path,
    loaded: LoadedModel,
    model: nn.Module | None = None,
    recipes: list[dict[str, Any]] | None = None,
    preprocessing: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    replace: bool = True,
    option: str = "--out",
) -> Path:
    """Write a resprobe checkpoint: tensors plus JSON-able metadata, loadable with ``weights_only=True``.

    Written to a temporary name and renamed into place, so a crash never leaves a half file at PATH.
    ``replace=False`` (no ``--overwrite``): a file that appeared at PATH meanwhile is refused, never replaced.
    """
    path = Path(path)
    model = model if model is not None else loaded.model
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "resprobe_version": __version__,
        "arch": json.loads(json.dumps(loaded.arch)),
        "preprocessing": json.loads(json.dumps(preprocessing if preprocessing is not None else loaded.preprocessing)),
        "recipes": json.loads(json.dumps(recipes if recipes is not None else loaded.recipes)),
        "meta": json.loads(json.dumps(meta or {})),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    if loaded.classes:  # the class names by index: later commands map class folders by name
        payload["classes"] = [str(name) for name in loaded.classes]
    if extra:
        payload.update(extra)
    atomic_torch_save(payload, path, replace, option)
    return path


def atomic_torch_save(obj: Any, path: str | Path, replace: bool = True, option: str = "--out") -> None:
    """``torch.save`` to a temporary name beside ``path``, then renamed into place (atomic: PATH is the
    old file or the whole new one, also when PATH is the model being analysed). ``replace=False``
    installs with a hard link, which fails if PATH exists: a file that appeared since the command's
    first check is not replaced without ``--overwrite``."""
    path = Path(path)
    if not path.parent.exists():
        raise ModelError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _install_new(tmp, path, option)
    except OSError as exc:
        raise ModelError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _install_new(tmp: Path, path: Path, option: str) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (no --overwrite)."""
    exists = BadValue(f"{option} {path} already exists; pass --overwrite to replace it")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError:  # file systems without hard links: check, then rename
        if path.exists():
            raise exists from None
        os.replace(tmp, path)


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


def _is_local_callable(target: str) -> bool:
    """Whether ``package.module:callable`` is the user's own code (or resprobe's model zoo): not the
    standard library, not an installed package. Nothing is imported to find out."""
    import importlib.util
    import site
    import sys
    import sysconfig

    module = target.partition(":")[0]
    if module == "resprobe.zoo":
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


# --------------------------------------------------------------------------------------------------
# The one entry point


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
