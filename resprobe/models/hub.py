"""Pretrained weights from the model hubs, as timm and torchvision load them (docs/reference.md).

``--pretrained`` goes through ``timm.create_model(pretrained=True)`` (the Hugging Face hub cache,
``HF_HOME``) and torchvision's weights enums (the torch hub cache, ``TORCH_HOME``), downloading
what is not cached. Offline (``--offline``, or the user's own ``HF_HUB_OFFLINE=1``) nothing touches
the network: the file is looked up in the caches first and handed to timm by path, and a missing
file is one line naming the caches and the model, at once — never a network timeout.

resprobe never sets an environment variable: offline mode is passed through the libraries' APIs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from resprobe.errors import ModelError

_TRUE = ("1", "ON", "YES", "TRUE")
# timm's default weight file name on the hub, and the safetensors file it prefers when present
_HF_WEIGHTS = "pytorch_model.bin"
_HF_SAFE_WEIGHTS = "model.safetensors"


def env_offline() -> bool:
    """Whether the user's environment forbids the Hugging Face hub (``HF_HUB_OFFLINE``), read, never set."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def is_offline(offline: bool = False) -> bool:
    """``--offline`` or the user's own ``HF_HUB_OFFLINE=1``."""
    return bool(offline) or env_offline()


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment now (so a
    ``HF_HOME`` set after huggingface_hub was imported is honoured too)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def torch_hub_checkpoints() -> Path:
    """Where torch hub (torchvision weights, timm's URL weights) keeps downloaded checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _split_revision(repo: str) -> tuple[str, str | None]:
    repo_id, _, revision = repo.partition("@")
    return repo_id, revision or None


def cached_hf_file(repo: str, filename: str) -> Path | None:
    """A file of a hub repository (``ORG/NAME[@REV]``) if the local cache holds it; no network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision = _split_revision(repo)
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()), revision=revision)
    except Exception:  # noqa: BLE001 - an invalid repo id: nothing cached under it
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _weight_files(cfg: Mapping[str, Any]) -> list[str]:
    """The hub file names timm would load for a pretrained config, in timm's order of preference."""
    name = cfg.get("hf_hub_filename") or _HF_WEIGHTS
    if name == _HF_WEIGHTS:
        return [_HF_SAFE_WEIGHTS, name]
    if name.endswith(".bin") and name != "open_clip_pytorch_model.bin":
        return [name[: -len(".bin")] + ".safetensors", name]
    return [name]


def cached_timm_weights(cfg: Mapping[str, Any]) -> tuple[Path | None, list[str]]:
    """Find a timm pretrained config's weights in the local caches: ``(path or None, places looked)``.

    Sources in the order timm uses them: a ``file`` the config names, the Hugging Face hub
    (``hf_hub_id``), then the URL's file in the torch hub cache (timm's older cache).
    """
    looked: list[str] = []
    if cfg.get("file"):
        path = Path(str(cfg["file"])).expanduser()
        if path.is_file():
            return path, looked
        looked.append(str(path))
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        for filename in dict.fromkeys(_weight_files(cfg)):
            found = cached_hf_file(hub_id, filename)
            if found is not None:
                return found, looked
        looked.append(f"{hf_cache_dir()} ({hub_id})")
    url = cfg.get("url")
    if url:
        path = torch_hub_checkpoints() / os.path.basename(url.split("?")[0])
        if path.is_file():
            return path, looked
        looked.append(str(path))
    return None, looked


def timm_pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config for a registry name with its tag (``resnet18.a1_in1k``)."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        if tags:
            raise ModelError(f"timm has no pretrained weights {name!r}; its tags are {', '.join(tags[:8])}"
                             + (" ..." if len(tags) > 8 else ""))
        raise ModelError(f"timm has no pretrained weights for {name!r}; list them with "
                         "`python -c \"import timm; print(timm.list_pretrained('NAME*'))\"`")
    return cfg.to_dict()


def offline_timm_overlay(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that makes timm load ``name``'s weights (its pretrained config
    ``cfg``, from :func:`timm_pretrained_cfg`) from the local cache.

    timm has no local-files-only switch (it asks the hub whether the file changed), so the cached
    file is found here and given to timm as its ``file``: timm then loads and adapts it (class
    count, input channels, filter functions) exactly as it does a downloaded one.
    """
    path, looked = cached_timm_weights(cfg)
    if path is None:
        raise ModelError(f"offline: the pretrained weights of timm model {name} are not in the local cache "
                         f"(looked in {'; '.join(looked) or 'no cache: the model names no weights'}); run once "
                         "without --offline (and without HF_HUB_OFFLINE=1) to download them, or pass --checkpoint")
    return {"file": str(path)}


def _hf_hub_snapshot(repo: str, pretrained: bool) -> tuple[Path | None, str]:
    """The cached snapshot folder of ``hf-hub:ORG/NAME[@REV]`` holding its ``config.json`` (and with
    ``pretrained`` its weights), or None and what is missing from the cache."""
    config = cached_hf_file(repo, "config.json")
    if config is None:
        return None, "config.json"
    if pretrained and not any((config.parent / f).is_file() for f in ("model.safetensors", "pytorch_model.bin",
                                                                       "pytorch_model.pth", "model.pth")):
        return None, "weights (model.safetensors or pytorch_model.bin)"
    return config.parent, ""


def offline_hf_hub_dir(repo: str, pretrained: bool) -> Path:
    """The cached snapshot folder of ``hf-hub:ORG/NAME[@REV]`` (its ``config.json``, and with
    ``pretrained`` its weights), given to timm as ``local-dir:`` so that nothing is downloaded."""
    snapshot, missing = _hf_hub_snapshot(repo, pretrained)
    if snapshot is None:
        raise ModelError(f"offline: the {missing} of hf-hub:{repo} are not in the local cache "
                         f"({hf_cache_dir()}); run once without --offline (and without HF_HUB_OFFLINE=1) to "
                         "download them")
    return snapshot


# One HEAD request decides whether the hub can be reached before timm downloads: without a route,
# huggingface_hub retries each file five times with backoff (about 25 s per file, 50 s for timm's
# two names), logging two lines a try. A refused or unresolvable connection fails at once; a silent
# network within this many seconds.
REACH_TIMEOUT_S = 5.0


def require_hub(repo: str, filename: str, what: str) -> None:
    """Raise one line at once if the Hugging Face hub cannot be reached for ``filename`` of ``repo``
    (``ORG/NAME[@REV]``). An HTTP answer of any kind (a missing file, a gated repo) counts as reached:
    timm's own download then says what is wrong."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError

    repo_id, revision = _split_revision(repo)
    try:  # retry_on_errors=False (the default): one request, no backoff, no retry log
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=REACH_TIMEOUT_S)
    except (HfHubHTTPError, FileMetadataError):
        return
    except Exception as exc:  # noqa: BLE001 - ConnectError, timeouts, proxy and SSL errors: no hub
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"cannot reach the Hugging Face hub ({reason}) to download {what}; check the network, "
                         f"put the files in the cache ({hf_cache_dir()}), or pass --checkpoint PATH") from None


class _NoRetryNotes(logging.Filter):
    """Drops huggingface_hub's per-try lines ("... thrown while requesting HEAD ...", "Retrying in 4s"):
    the failure that ends them is said by resprobe in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("thrown while requesting" in message or message.startswith(("Retrying in", "Rate limited")))


@contextmanager
def quiet_retries() -> Iterator[None]:
    """Silence huggingface_hub's retry lines on stderr while resprobe talks (the logger's state is
    restored afterwards; no environment variable is touched)."""
    logger = logging.getLogger("huggingface_hub.utils._http")
    quiet = _NoRetryNotes()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def timm_target(name: str, cfg: Mapping[str, Any] | None, pretrained: bool,
                offline: bool) -> tuple[str, dict[str, Any]]:
    """What to give ``timm.create_model`` for ``name`` (a timm name or ``hf-hub:ORG/NAME``): the name
    (or a cached ``local-dir:``) and the extra keyword arguments (a cached weights ``file``).

    Cached files are used as they are, online or not (as torchvision's are): timm would otherwise ask the
    hub whether they changed. Offline, a missing file is one line naming the caches; online, the hub is
    asked once, quickly, before timm downloads (:func:`require_hub`).
    """
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        if is_offline(offline):
            return "local-dir:" + str(offline_hf_hub_dir(repo, pretrained)), {}
        snapshot, _ = _hf_hub_snapshot(repo, pretrained)
        if snapshot is not None:
            return "local-dir:" + str(snapshot), {}
        require_hub(repo, "config.json", f"the config of {name}")
        return name, {}
    if cfg is None:
        return name, {}
    if is_offline(offline):
        return name, {"pretrained_cfg_overlay": offline_timm_overlay(name, cfg)}
    path, _ = cached_timm_weights(cfg)
    if path is not None:
        return name, {"pretrained_cfg_overlay": {"file": str(path)}}
    if cfg.get("hf_hub_id"):
        require_hub(str(cfg["hf_hub_id"]), _weight_files(cfg)[0], f"the pretrained weights of timm model {name}")
    return name, {}


def torchvision_weights_file(weights: Any, offline: bool = False) -> Path:
    """The torch hub file of a torchvision weights enum member, downloaded (with a progress bar on
    stderr and torch hub's hash check) when it is not cached and the network is allowed."""
    url = weights.url
    path = torch_hub_checkpoints() / os.path.basename(url)
    if path.is_file():
        return path
    if is_offline(offline):
        raise ModelError(f"offline: the pretrained weights {weights} are not in the local cache (looked for "
                         f"{path}); run once without --offline to download them, or pass --checkpoint PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)  # NAME-<sha256 prefix>.pth
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, a hash mismatch (RuntimeError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot download the pretrained weights {weights} from {url} ({reason}); check the "
                         f"network, or put the file at {path}") from None
    return path
