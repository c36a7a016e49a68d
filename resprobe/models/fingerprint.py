"""Fingerprints of weights: the sha256 of checkpoint files (cached by path, size and times) and of state
dicts, so a resume or an `ablate --recording` of other weights is refused."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from resprobe import __version__

if TYPE_CHECKING:  # annotations only: no import cycle
    from resprobe.models.loading import LoadedModel


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
