"""Reading a recording: a complete RUN.h5, or the batches of an unfinished RUN.h5.partial/."""

from __future__ import annotations

import errno
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resprobe.errors import RecordingError, ResprobeError
from resprobe.recording.recorder import STAT_NAMES, Recorded

FORMAT = "resprobe-record"
SCHEMA_VERSION = 1
_BATCH_PREFIX = "batch-"


def partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        known = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "the file system is read-only", errno.ENOENT: "no such directory",
                 errno.ENOTDIR: "a part of the path is not a directory"}
        if exc.errno in known:
            return known[exc.errno]
        if exc.strerror:
            return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _batch_number(file: Path) -> int | None:
    """K of ``batch-K.npz`` (the run's K-th batch of B samples), None for any other name."""
    digits = file.name[len(_BATCH_PREFIX):-len(".npz")]
    return int(digits) if file.name.startswith(_BATCH_PREFIX) and digits.isdigit() else None


def stat_names(keys: Any, prefix: str = "") -> list[str]:
    """§3's statistics, then any extra columns a recording holds (language models' ``token_cos``, …)."""
    extra = sorted(k[len(prefix):] for k in keys if k.startswith(prefix) and k[len(prefix):] not in STAT_NAMES)
    return [*STAT_NAMES, *extra]


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


@dataclass
class Recording(Recorded):
    """A recording read back from disk (or from an interrupted run's partial folder)."""

    path: Path | None = None
    tensors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def read_partial(directory: Path) -> Recording:
    """The batches of an interrupted (or finishing) run, as one :class:`Recording`."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        raise RecordingError(f"{directory} is not a resprobe recording in progress (no readable meta.json)") from None
    try:
        return _read_partial(directory, meta)
    except ResprobeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged meta.json or batch file
        raise RecordingError(f"{directory} holds a damaged recording in progress ({type(exc).__name__}); start anew "
                             "with --overwrite") from None


def _read_partial(directory: Path, meta: Any) -> Recording:
    if not isinstance(meta, dict) or not isinstance(meta.get("blocks"), list):
        raise RecordingError(f"{directory}/meta.json is damaged (no block list); start anew with --overwrite")
    blocks = meta["blocks"]
    names = [b["name"] for b in blocks]
    parts: dict[str, list[np.ndarray]] = {}
    tensors: dict[str, dict[str, list[np.ndarray]]] = {}
    readout: dict[str, list[np.ndarray]] = {}
    numbered = [(_batch_number(file), file) for file in directory.glob(f"{_BATCH_PREFIX}*.npz")]
    for _number, file in sorted((k, f) for k, f in numbered if k is not None):  # sample order, gaps allowed
        try:  # the whole batch or nothing of it
            with np.load(file, allow_pickle=False) as f:
                arrays = {key: f[key] for key in f.files}
        except Exception:  # noqa: BLE001 - a damaged batch is simply not counted
            continue
        for key, value in arrays.items():
            if key.startswith("tensor."):
                _, kind, block = key.split(".", 2)
                tensors.setdefault(block, {}).setdefault(kind, []).append(value)
            elif key.startswith("readout."):
                readout.setdefault(key.split(".", 1)[1], []).append(value)
            else:
                parts.setdefault(key, []).append(value)

    def cat(key: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        arrays = parts.get(key)
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, *shape), dtype)

    n = len(cat("index", np.int64))
    attrs = dict(meta.get("attrs", {}))
    n_planned = int(meta.get("n_planned", attrs.get("n_planned", n)))
    if any(cat(f"stat.{s}", np.float32, (len(names),)).shape != (n, len(names)) for s in STAT_NAMES):
        raise RecordingError(f"{directory} holds batches of inconsistent shapes; start anew with --overwrite")
    return Recording(
        block_names=names, blocks=blocks,
        index=cat("index", np.int64), label=cat("label", np.int64), pred=cat("pred", np.int64),
        loss=cat("loss", np.float32),
        stats={s: cat(f"stat.{s}", np.float32, (len(names),)) for s in stat_names(parts, "stat.")},
        attrs={**attrs, "n_planned": n_planned, "n_done": n},
        complete=n >= n_planned, n_planned=n_planned,
        readout={k: np.concatenate(v) for k, v in readout.items()},
        path=directory,
        tensors={b: {k: np.concatenate(v) for k, v in kinds.items()} for b, kinds in tensors.items()},
    )


def open_recording(path: str | Path, load_tensors: bool = False) -> Recording:
    """Read ``RUN.h5`` (or, when only an interrupted run exists, its partial folder)."""
    path = Path(path)
    if not path.exists():
        if partial_dir(path).is_dir():
            recording = read_partial(partial_dir(path))
            recording.complete = False  # not merged: still in progress or interrupted
            return recording
        raise RecordingError(f"recording not found: {path}")
    if path.is_dir():
        if (path / "meta.json").exists():
            recording = read_partial(path)
            recording.complete = False
            return recording
        raise RecordingError(f"{path} is a directory, not a recording: give a RUN.h5 written by `resprobe record` "
                             "(or MODEL with --data)")
    import h5py

    try:
        with open(path, "rb") as fh:
            signature = fh.read(8)
    except OSError as exc:
        raise RecordingError(f"cannot read {path}: {_os_reason(exc)}") from None
    if signature != _HDF5_SIGNATURE:
        raise RecordingError(f"{path} is not an HDF5 file, so not a resprobe recording (those are written by "
                             "`resprobe record`)")
    from resprobe.recording.hdf5_probe import check_readable

    check_readable(path, RecordingError, "record it again")  # a crash in a child process, not here
    try:
        f = h5py.File(path, "r")
    except Exception:  # noqa: BLE001 - h5py reports damage with several exception types
        raise RecordingError(f"{path} is a damaged HDF5 file (truncated or corrupt); record it again") from None
    with f:
        try:
            fmt = _decode(f.attrs.get("format"))
            version_attr = _decode(f.attrs.get("schema_version", 0))
        except Exception:  # noqa: BLE001
            raise RecordingError(f"{path} is a damaged HDF5 file (unreadable attributes); record it again") from None
        if fmt != FORMAT:
            raise RecordingError(f"{path} is an HDF5 file but not a resprobe recording (give a file written by "
                                 "`resprobe record`)")
        try:
            version = int(version_attr or 0)
        except (TypeError, ValueError):
            raise RecordingError(f"{path} is a damaged resprobe recording (schema_version {version_attr!r})") from None
        if version > SCHEMA_VERSION:
            raise RecordingError(f"{path} uses recording schema {version}, newer than this resprobe reads "
                                 f"({SCHEMA_VERSION}); upgrade resprobe")
        try:
            recording = _read_hdf5(f, path, load_tensors)
        except ResprobeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file can fail anywhere inside h5py
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise RecordingError(f"{path} is a damaged resprobe recording ({type(exc).__name__}"
                                 f"{': ' + first if first else ''}); record it again") from None
    _warn_newer_partial(path, recording)
    return recording


def _warn_newer_partial(path: Path, recording: Recording) -> None:
    """An unfinished ``--overwrite`` run beside a complete file: say which one the report is of."""
    try:
        meta = json.loads((partial_dir(path) / "meta.json").read_text())
        created = meta.get("attrs", {}).get("created")
    except (OSError, ValueError, AttributeError):
        return
    if created is not None and created == recording.attrs.get("created"):
        return  # the same run, killed while removing its partial folder: the file is complete
    warnings.warn(f"{partial_dir(path)} holds a newer, unfinished run for {path} (--overwrite): this report is of the "
                  "older, complete file; finish the new run with --resume", stacklevel=3)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _read_hdf5(f: Any, path: Path, load_tensors: bool) -> Recording:
    attrs = {k: _decode(v) for k, v in f.attrs.items()}
    for key in ("preprocessing", "options", "protocol"):
        if isinstance(attrs.get(key), str) and attrs[key]:
            attrs[key] = json.loads(attrs[key])
    g = f["blocks"]
    names = [_decode(x) for x in g["name"][()]]
    blocks = [{"name": name, "stage": int(g["stage"][i]), "index": int(g["index"][i]), "kind": _decode(g["kind"][i]),
               "in_shape": json.loads(_decode(g["in_shape"][i])), "out_shape": json.loads(_decode(g["out_shape"][i]))}
              for i, name in enumerate(names)]
    n_done = int(attrs.get("n_done", 0))
    if n_done < 0:
        raise RecordingError(f"{path} is a damaged resprobe recording (n_done {n_done})")
    stats = {s: np.asarray(f["stats"][s][:n_done], dtype=np.float32) for s in stat_names(f["stats"])}
    samples = {k: np.asarray(f["samples"][k][:n_done]) for k in ("index", "label", "pred", "loss")}
    shapes_ok = (all(v.shape == (n_done, len(names)) for v in stats.values())
                 and all(v.shape == (n_done,) for v in samples.values()))
    if not shapes_ok:
        raise RecordingError(f"{path} is a damaged resprobe recording (datasets of inconsistent shapes)")
    readout = {k: np.asarray(v[:n_done]) for k, v in f["readout"].items()} if "readout" in f else {}
    tensors: dict[str, dict[str, np.ndarray]] = {}
    if load_tensors and "tensors" in f:
        tensors = {b: {k: np.asarray(v) for k, v in kinds.items()} for b, kinds in f["tensors"].items()}
    n_planned = int(attrs.get("n_planned", n_done))
    complete = bool(attrs.get("complete")) and n_done >= n_planned and shapes_ok
    return Recording(block_names=names, blocks=blocks, index=samples["index"].astype(np.int64),
                     label=samples["label"].astype(np.int64), pred=samples["pred"].astype(np.int64),
                     loss=samples["loss"].astype(np.float32), stats=stats, attrs=attrs, complete=complete,
                     n_planned=n_planned, readout=readout, path=path, tensors=tensors)
