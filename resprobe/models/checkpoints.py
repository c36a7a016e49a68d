"""Checkpoints: read safely (`weights_only=True`; arbitrary unpickling only when trusted), state dicts
cleaned, resprobe checkpoints written atomically."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from resprobe import __version__
from resprobe.errors import BadValue, ModelError

if TYPE_CHECKING:  # annotations only: no import cycle
    from resprobe.models.loading import LoadedModel


CHECKPOINT_FORMAT = "resprobe-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar", ".pth.tar")
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")


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
