"""The recording: HDF5 schema 1 (docs/reference.md), written so that a kill at any instant loses at most
the batch in flight.

While a run is in progress nothing is written into ``RUN.h5`` in place. Each completed batch becomes
a small ``.npz`` file, written under a temporary name, fsynced and renamed into ``RUN.h5.partial/``
(a rename is atomic: a batch file is either whole or absent). ``meta.json`` there holds the run's
attributes and options; a ``lock`` file held with ``flock`` keeps a second process out. At the end
the batches are merged into ``RUN.h5.tmp-PID``, which is fsynced and renamed onto ``RUN.h5``; only
then is the partial folder removed. ``--resume`` keeps the whole batch files (``batch-K.npz`` is
batch K of the one-process order, whichever process wrote it), reuses the stored options and
records the missing batches, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from resprobe import __version__
from resprobe.errors import Interrupted as _Interrupted
from resprobe.errors import BadValue, RecordingError, ResprobeError
from resprobe.hdf5_probe import written_here
from resprobe.recorder import STAT_NAMES, BatchStats, Recorded

FORMAT = "resprobe-record"
SCHEMA_VERSION = 1
_BATCH_PREFIX = "batch-"


def partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _write_error(path: Path, exc: BaseException, kept: bool = True) -> RecordingError:
    """A failed write, in one line; ``kept``: completed batches survive in the partial folder."""
    if kept:
        return RecordingError(f"cannot write {path}: {_os_reason(exc)}; the batches recorded so far are kept in "
                              f"{partial_dir(path)}: free some space (or fix the cause) and run the same command "
                              "with --resume")
    return RecordingError(f"cannot write {path}: {_os_reason(exc)}; choose an --out in a writable directory")


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """Whatever stops a write to ``tmp`` (an error, a kill signal) removes ``tmp``; errors become one
    clear RecordingError about ``path``."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception):
            raise _write_error(path, exc) from None
        raise


# --------------------------------------------------------------------------------------------------
# Writing


class RunWriter:
    """Durable, resumable writer of one recording. Batches are written by a background thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.dir = partial_dir(self.path)
        self._lock_fh: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resprobe-writer")
        self._pending: list[Future] = []
        self.meta: dict[str, Any] = {}
        self.n_done = 0
        self.done: set[int] = set()  # the numbers of the durable batches a resume found

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, meta: dict[str, Any], overwrite: bool = False) -> RunWriter:
        path = Path(path)
        check_can_create(path, overwrite)
        writer = cls(path)
        try:
            if writer.dir.exists():
                # A run in progress refuses here (the lock), whatever the options. A partial folder
                # without batch files holds nothing (killed before its first batch): it is reused.
                writer._acquire_lock()
                if _holds_batches(writer.dir) and not overwrite:
                    raise RecordingError(f"an interrupted recording exists at {writer.dir}: finish it with "
                                         "--resume or start anew with --overwrite")
                writer._clear_partial()
            else:
                writer._acquire_lock()
            # Whether RUN.h5 may be replaced at the end: without --overwrite, not even by a file that
            # appeared during the run (finish installs with a hard link, which never replaces).
            writer.meta = {**meta, "overwrite": bool(overwrite)}
            writer._write_json("meta.json", writer.meta, kept=False)
        except BaseException:
            writer.close()
            raise
        return writer

    @classmethod
    def resume(cls, path: Path) -> RunWriter:
        path = Path(path)
        writer = cls(path)
        if not writer.dir.is_dir():
            if path.exists():
                raise RecordingError(f"{path} is already complete; nothing to resume")
            raise RecordingError(f"nothing to resume: neither {path} nor {writer.dir} exists; start the "
                                 "recording without --resume")
        try:
            writer._acquire_lock()
            try:
                meta = json.loads((writer.dir / "meta.json").read_text())
            except (OSError, ValueError):
                raise RecordingError(f"{writer.dir} has no readable meta.json; start anew with --overwrite") from None
            if not isinstance(meta, dict) or not isinstance(meta.get("blocks"), list) or "n_planned" not in meta:
                raise RecordingError(f"{writer.dir}/meta.json is damaged; start anew with --overwrite")
            writer.meta = meta
            writer._scan_batches()
        except BaseException:
            writer.close()
            raise
        return writer

    @staticmethod
    def is_locked(directory: Path) -> bool:
        """Whether another process holds ``directory``'s lock (is writing that recording now)."""
        try:
            fh = open(directory / "lock", "rb")
        except OSError:
            return False
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def _acquire_lock(self) -> None:
        if self._lock_fh is not None:
            return
        try:
            if not self.dir.is_dir():
                self.dir.mkdir(exist_ok=True)
                _fsync_dir(self.dir.parent)  # the folder itself survives a power loss
            fh = open(self.dir / "lock", "a+")
        except OSError as exc:
            raise _write_error(self.path, exc, kept=False) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise RecordingError(f"{self.path} is being written by another resprobe process; wait for it or "
                                 "choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh

    def _clear_partial(self) -> None:
        try:
            for child in self.dir.iterdir():
                if child.name == "lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        except OSError as exc:
            raise _write_error(self.path, exc, kept=False) from None

    def _batch_files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{_BATCH_PREFIX}*.npz"))

    def _scan_batches(self) -> None:
        """Keep every whole batch file; remove damaged ones and leftovers (they are recomputed).

        Batch file ``batch-K.npz`` holds samples ``K·B .. K·B+B-1`` (B the run's batch size) of the
        one-process order, whichever process wrote it, so a run of several processes leaves gaps
        that a resume with any number of processes fills (:meth:`missing_batches`)."""
        self.n_done = 0
        self.done = set()
        for file in self._batch_files():
            number = _batch_number(file)
            ok = number is not None
            if ok:
                try:
                    with np.load(file, allow_pickle=False) as f:
                        n = len(f["index"])
                except Exception:  # noqa: BLE001 - a damaged batch is recomputed
                    ok = False
            if not ok:
                file.unlink()
                continue
            self.done.add(number)  # type: ignore[arg-type]
            self.n_done += n
        for tmp in self.dir.glob("tmp-*"):
            tmp.unlink()

    def durable_samples(self) -> int:
        """Samples in the batch files now in the folder, by their names (any process's)."""
        n_planned = int(self.meta.get("n_planned", 0))
        batch_size = int(self.meta.get("options", {}).get("batch_size") or 1)
        numbers = (_batch_number(f) for f in self._batch_files())
        return sum(max(0, min(batch_size, n_planned - k * batch_size)) for k in numbers if k is not None)

    def missing_batches(self, n_batches: int) -> list[int]:
        """The numbers of the batches not yet durable, in order."""
        return [k for k in range(n_batches) if k not in self.done]

    @classmethod
    def attach(cls, path: Path) -> RunWriter:
        """Another process's run (torchrun: rank 0 created or resumed it and holds its lock): this
        process only adds batch files to it."""
        writer = cls(Path(path))
        try:
            writer.meta = json.loads((writer.dir / "meta.json").read_text())
        except (OSError, ValueError):
            writer.close()
            raise RecordingError(f"{writer.dir} has no readable meta.json (rank 0 did not create the run)") from None
        return writer

    def _write_json(self, name: str, data: Mapping[str, Any], kept: bool = True) -> None:
        tmp = self.dir / f"tmp-{name}"
        try:
            with open(tmp, "w") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / name)
            _fsync_dir(self.dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _write_error(self.path, exc, kept=kept) from None

    # -- batches -------------------------------------------------------------------------------

    # Batches handed to the writer thread and not yet durable, at most: with one, a kill loses at most
    # the batch being written and the one being computed (the contract's "batch in flight"), and
    # memory holds no backlog when the disk is slower than the model.
    max_pending = 1

    def write_batch(self, batch: BatchStats, number: int) -> None:
        """Queue ``batch`` (batch ``number`` of the run) for the background
        writer, first waiting while ``max_pending`` batches are still being written; the first error
        of an earlier write surfaces here."""
        self._raise_failed()
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()  # blocks the recorder until the writer catches up
        self.n_done += len(batch)
        self._pending.append(self._pool.submit(self._write_batch_file, number, batch))

    def _raise_failed(self) -> None:
        still = []
        for future in self._pending:
            if future.done():
                future.result()  # re-raises the writer thread's error
            else:
                still.append(future)
        self._pending = still

    def flush(self) -> None:
        """Wait until every queued batch is durable."""
        for future in self._pending:
            future.result()
        self._pending = []

    def _write_batch_file(self, number: int, batch: BatchStats) -> None:
        arrays: dict[str, np.ndarray] = {"index": batch.index, "label": batch.label, "pred": batch.pred,
                                         "loss": batch.loss}
        for name, values in batch.stats.items():
            arrays[f"stat.{name}"] = values
        for block, kinds in batch.tensors.items():
            for kind, values in kinds.items():
                arrays[f"tensor.{kind}.{block}"] = values
        for block, logits in batch.readout.items():
            arrays[f"readout.{block}"] = logits
        tmp = self.dir / f"tmp-{number:06d}.npz"
        final = self.dir / f"{_BATCH_PREFIX}{number:06d}.npz"
        with _removed_on_failure(tmp, self.path):
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)  # atomic: the batch file is whole or absent
            _fsync_dir(self.dir)

    # -- finishing -------------------------------------------------------------------------------

    def finish(self) -> Path:
        """Merge every batch into ``RUN.h5`` (atomically replacing it) and remove the partial folder.

        Until the rename, ``RUN.h5`` is untouched (absent, or the old file of an ``--overwrite`` run);
        a kill at any point leaves the partial folder whole, and ``--resume`` finishes again.
        """
        self.flush()
        recorded = read_partial(self.dir)
        n_planned = int(self.meta.get("n_planned", recorded.n_samples))
        if recorded.n_samples != self.n_done or recorded.n_samples < n_planned:
            raise RecordingError(f"{self.dir} holds {recorded.n_samples} readable samples of {n_planned} (a batch "
                                 "file was lost or damaged); run the same command with --resume to recompute them")
        self._remove_stale(f".{self.path.name}.tmp-*")  # left by a run killed while finishing (we hold the lock)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        replace = bool(self.meta.get("overwrite", True))  # runs begun before the key existed: as they were
        with _removed_on_failure(tmp, self.path):
            write_hdf5(tmp, recorded, complete=True)
            if replace:
                os.replace(tmp, self.path)  # atomic: RUN.h5 is the old file or the whole new one
            installed = replace or _install_new(tmp, self.path)
            _fsync_dir(self.path.parent)
        if not installed:
            raise RecordingError(f"{self.path} appeared during the run and is not replaced without --overwrite; the "
                                 f"recording is kept in {self.dir}: move that file away and run the same command "
                                 "with --resume")
        written_here(self.path)  # opening it again (align --out, a notebook) starts no read-through child
        # Retire the partial folder by renaming it first, so that it never exists half deleted under
        # its own name (a kill during the removal leaves only a hidden folder, removed next time).
        trash = self.path.with_name(f".{self.path.name}.partial-done-{os.getpid()}")
        try:
            os.replace(self.dir, trash)
        except OSError:
            trash = self.dir
        self.close()
        shutil.rmtree(trash, ignore_errors=True)
        self._remove_stale(f".{self.path.name}.partial-done-*")
        return self.path

    def _remove_stale(self, pattern: str) -> None:
        for stale in self.path.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()

    def discard_if_empty(self) -> None:
        """Remove the partial folder of a run that failed before its first batch became durable:
        it holds nothing, and would only make the next attempt ask for --resume or --overwrite."""
        if not self.dir.is_dir():
            return
        with contextlib.suppress(Exception):
            self.flush()
        try:
            self._acquire_lock()  # still ours, or taken back (never another process's)
        except RecordingError:
            return
        if any(self.dir.glob(f"{_BATCH_PREFIX}*.npz")):
            return
        trash = self.path.with_name(f".{self.path.name}.partial-done-{os.getpid()}")
        try:
            os.replace(self.dir, trash)
        except OSError:
            return
        self.close()
        shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None


def _check_output_dir(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        if not parent.exists():
            raise RecordingError(f"cannot write {path}: directory {parent} does not exist; create it first or "
                                 "choose another --out")
        if not parent.is_dir():
            raise RecordingError(f"cannot write {path}: {parent} is not a directory; choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RecordingError(f"cannot write {path}: directory {parent} is not writable; choose another --out")
        if path.is_dir():
            raise RecordingError(f"--out {path} is a directory; give a file name such as {path / 'run.h5'}")
    except OSError as exc:  # e.g. a name too long, a path through a file
        raise _write_error(path, exc, kept=False) from None


def _batch_number(file: Path) -> int | None:
    """K of ``batch-K.npz`` (the run's K-th batch of B samples), None for any other name."""
    digits = file.name[len(_BATCH_PREFIX):-len(".npz")]
    return int(digits) if file.name.startswith(_BATCH_PREFIX) and digits.isdigit() else None


def _install_new(tmp: Path, path: Path) -> bool:
    """Move ``tmp`` to ``path`` unless ``path`` exists (a hard link never replaces); whether it moved."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink()
        return False
    except OSError:  # file systems without hard links: check, then rename
        if path.exists():
            tmp.unlink()
            return False
        os.replace(tmp, path)
        return True
    tmp.unlink()
    return True


def _holds_batches(directory: Path) -> bool:
    """Whether an interrupted run's folder holds recorded work (else it can simply be reused)."""
    return (directory / "meta.json").exists() and any(directory.glob(f"{_BATCH_PREFIX}*.npz"))


def _foreign_entries(directory: Path) -> list[str]:
    """Names in a ``RUN.h5.partial`` folder that a recording never writes there (sorted)."""
    def ours(entry: Path) -> bool:
        name = entry.name
        if name in ("lock", "meta.json") or name.startswith("tmp-"):
            return entry.is_file()
        return name.startswith(_BATCH_PREFIX) and name.endswith(".npz") and entry.is_file()

    try:
        return sorted(entry.name for entry in directory.iterdir() if not ours(entry))
    except OSError:
        return []


def check_can_create(path: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, what :meth:`RunWriter.create` would refuse."""
    path = Path(path)
    _check_output_dir(path)
    directory = partial_dir(path)
    if directory.exists():
        if not directory.is_dir():
            raise RecordingError(f"{directory} is in the way (a file where resprobe keeps the batches of a run); "
                                 "move it or choose another --out")
        if RunWriter.is_locked(directory):
            raise RecordingError(f"{path} is being written by another resprobe process; wait for it or choose "
                                 "another --out")
        foreign = _foreign_entries(directory)
        if foreign:  # the folder is emptied for the new run: never one resprobe did not make
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise RecordingError(f"{directory} holds files resprobe did not write ({shown}), and a recording keeps its "
                                 "batches there; move it or choose another --out")
        if _holds_batches(directory) and not overwrite:
            raise RecordingError(f"an interrupted recording exists at {directory}: finish it with --resume or "
                                 "start anew with --overwrite")
    elif path.exists() and not overwrite:
        raise RecordingError(f"{path} exists: pass --overwrite to replace it (only once the new run is complete), "
                             "or --resume to finish an interrupted run")


# --------------------------------------------------------------------------------------------------
# HDF5


def write_hdf5(path: Path, recorded: Recorded, complete: bool) -> None:
    """Write ``recorded`` as schema 1: chunked, compressed, resizable datasets."""
    import h5py

    n, n_blocks = recorded.n_samples, len(recorded.block_names)
    # HDF5 1.8 file format (readable by every current HDF5): checksummed metadata; fletcher32 on
    # the data, so damage is found when the file is read instead of passing as numbers.
    with h5py.File(path, "w", libver=("v108", "v108")) as f:
        attrs = dict(recorded.attrs)
        attrs.update(format=FORMAT, schema_version=SCHEMA_VERSION, n_done=n, complete=bool(complete))
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)
        blocks = f.create_group("blocks")
        str_dt = h5py.string_dtype()
        blocks.create_dataset("name", data=np.array([b["name"] for b in recorded.blocks], dtype=object), dtype=str_dt)
        blocks.create_dataset("kind", data=np.array([b["kind"] for b in recorded.blocks], dtype=object), dtype=str_dt)
        blocks.create_dataset("stage", data=np.array([b["stage"] for b in recorded.blocks], dtype=np.int64))
        blocks.create_dataset("index", data=np.array([b["index"] for b in recorded.blocks], dtype=np.int64))
        blocks.create_dataset("in_shape", data=np.array([json.dumps(list(b["in_shape"])) for b in recorded.blocks],
                                                        dtype=object), dtype=str_dt)
        blocks.create_dataset("out_shape", data=np.array([json.dumps(list(b["out_shape"])) for b in recorded.blocks],
                                                         dtype=object), dtype=str_dt)
        samples = f.create_group("samples")
        chunk = (max(1, min(n, 4096)),)
        for name, values in (("index", recorded.index), ("label", recorded.label), ("pred", recorded.pred),
                             ("loss", recorded.loss)):
            samples.create_dataset(name, data=values, chunks=chunk, maxshape=(None,), compression="gzip",
                                   compression_opts=4, fletcher32=True)
        stats = f.create_group("stats")
        for name in STAT_NAMES:
            stats.create_dataset(name, data=recorded.stats[name].astype(np.float32),
                                 chunks=(max(1, min(n, 1024)), max(1, n_blocks)), maxshape=(None, n_blocks),
                                 compression="gzip", compression_opts=4, fletcher32=True)
        tensors = getattr(recorded, "tensors", None) or {}
        if tensors:
            group = f.create_group("tensors")
            for block, kinds in tensors.items():
                sub = group.create_group(block)
                for kind, values in kinds.items():
                    sub.create_dataset(kind, data=values, compression="gzip", compression_opts=4,
                                       fletcher32=True)
        if recorded.readout:
            group = f.create_group("readout")
            for block, logits in recorded.readout.items():
                group.create_dataset(block, data=logits.astype(np.float32), compression="gzip", compression_opts=4,
                                     fletcher32=True)
        f.flush()
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _attr(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


# --------------------------------------------------------------------------------------------------
# Reading


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
        stats={s: cat(f"stat.{s}", np.float32, (len(names),)) for s in STAT_NAMES},
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
    from resprobe.hdf5_probe import check_readable

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
    for key in ("preprocessing", "options"):
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
    stats = {s: np.asarray(f["stats"][s][:n_done], dtype=np.float32) for s in STAT_NAMES}
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


# --------------------------------------------------------------------------------------------------
# A whole recording run: loader → recorder → durable batches → RUN.h5


# Ctrl-C during a recording: the batch in flight was finished and made durable (exit status 130).
Interrupted = _Interrupted


@contextlib.contextmanager
def sigint_after_batch() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the run to stop after the current batch; a second one stops at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class RecordResult:
    out: str
    n_samples: int
    complete: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # model, checkpoint, preprocessing of the run

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "n_samples": self.n_samples, "complete": self.complete,
                "seconds": round(self.seconds, 3), **self.provenance}


def _provenance(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a record report says about the model it recorded (as every report that loads a model)."""
    return {key: attrs.get(key) for key in ("model", "checkpoint", "checkpoint_sha256", "weights_sha256",
                                            "preprocessing")}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_recording(
    writer: RunWriter,
    recorder: Any,
    loader: Any,
    numbers: list[int],
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RecordResult:
    """Record the batches ``loader`` yields, which are the run's batches ``numbers`` (those not yet
    durable in ``writer``: all of them, the gaps a resume fills, or this process's share under
    torchrun); finish the file when all are done. Under torchrun every rank makes its batches
    durable and rank 0 merges the run once all have.

    Ctrl-C finishes the batch in flight, makes it durable and raises :class:`Interrupted` (the
    command line exits 130); the merge into ``RUN.h5`` at the end is not interrupted either.
    """
    from resprobe import distributed

    from resprobe.recorder import NonfiniteTally

    start = time.perf_counter()
    names = [b["name"] for b in writer.meta["blocks"]]
    identity = [b.get("kind") == "identity" for b in writer.meta["blocks"]]
    tally = NonfiniteTally(names, identity)
    bad_batches: list[tuple[int, NonfiniteTally]] = []  # (batch number, its tally) where NaN or inf appeared
    batch_size = int(writer.meta.get("options", {}).get("batch_size") or 0)
    planned = iter(numbers)
    several = distributed.is_distributed()

    def interrupted() -> Interrupted:
        writer.flush()
        n_done = writer.durable_samples() if several else writer.n_done
        result = RecordResult(str(writer.path), n_done, False, time.perf_counter() - start,
                              provenance=_provenance(writer.meta.get("attrs", {})))
        return Interrupted(f"interrupted: {n_done} of {writer.meta['n_planned']} samples are recorded in "
                           f"{writer.dir}; finish with `resprobe record --out {writer.path} --resume`", result)

    pending: Any = None  # the batch launched last, not yet written
    launched_numbers: list[int] = []  # batch numbers of the launched, unwritten batches

    def launch(images: Any, labels: Any, indices: Any) -> Any:
        number = next(planned)
        recorder.samples_seen = number * batch_size  # --save-tensors keeps the run's first K samples
        launched_numbers.append(number)
        return recorder.launch_batch(images, labels, indices)

    def write_pending() -> None:
        nonlocal pending
        launched, pending = pending, None
        batch = launched.result()
        number = launched_numbers.pop(0)
        batch_tally = NonfiniteTally(names, identity)
        batch_tally.add(batch)
        if batch_tally.samples:
            bad_batches.append((number, batch_tally))
        tally.merge(batch_tally)
        writer.write_batch(batch, number)
        if progress:
            progress(len(batch))

    try:
        with sigint_after_batch() as stop_requested:
            try:
                for images, labels, indices in loader:
                    # On a GPU the next batch is launched before the previous one is awaited and
                    # written: the device computes one while the host waits for and writes the other.
                    launched = launch(images, labels, indices)
                    if pending is not None:
                        write_pending()
                    pending = launched
                    if not recorder.launches_ahead:
                        write_pending()
                    if stop_requested():
                        if pending is not None:
                            write_pending()
                        raise interrupted()
                if pending is not None:
                    write_pending()
            except Exception as exc:
                if pending is not None:  # what was computed is kept, if it can be
                    with contextlib.suppress(Exception):
                        write_pending()
                # Ctrl-C from a terminal also reaches the loader's worker processes, which then die:
                # that is the interruption, not an error of its own.
                if stop_requested() and not isinstance(exc, ResprobeError):
                    raise interrupted() from exc
                raise
            if several:  # every rank's batches, merged in batch order: the warning one process gives
                tally = NonfiniteTally(names, identity)
                gathered = [b for part in distributed.all_gather(bad_batches) for b in part]
                for _, batch_tally in sorted(gathered, key=lambda b: b[0]):
                    tally.merge(batch_tally)
            messages = tally.messages()
            if warn:
                for message in messages:
                    warn(message)
            if several:
                return _finish_sharded(writer, start, messages)
            out = writer.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.flush()
        writer.close()
        raise
    return RecordResult(str(out), writer.n_done, True, time.perf_counter() - start, messages,
                        _provenance(writer.meta.get("attrs", {})))


def _finish_sharded(writer: RunWriter, start: float, messages: list[str]) -> RecordResult:
    """torchrun: every rank's batches durable, then rank 0 merges ``RUN.h5`` and every rank reports it."""
    from resprobe import distributed

    writer.flush()
    distributed.barrier()  # every batch file is in place

    def merge() -> tuple[str, int]:
        writer.n_done = writer.durable_samples()
        return str(writer.finish()), writer.n_done

    out, n_done = distributed.on_main(merge)
    writer.close()
    return RecordResult(str(out), n_done, True, time.perf_counter() - start, messages,
                        _provenance(writer.meta.get("attrs", {})))


# --------------------------------------------------------------------------------------------------
# The record command as a library function


@dataclass
class RecordOptions:
    """Everything that decides a recording's numbers; stored in the run and reused by ``--resume``.

    ``None`` means "not given": the default, or on resume the stored value.
    """

    model: str | None = None
    checkpoint: str | None = None
    pretrained: bool | None = None
    num_classes: int | None = None
    model_kwargs: dict[str, Any] | None = None
    ema: bool | None = None
    blocks: list[str] | None = None
    input_size: str | None = None
    mean: str | None = None
    std: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    data: str | None = None
    class_map: str | None = None
    limit: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    target: str | None = None
    save_tensors: int | None = None
    tensor_dtype: str | None = None
    precision: str | None = None
    readout: bool | None = None
    labels: str | None = None  # --labels FILE for a flat folder of images
    decode: str | None = None  # where image files are decoded: auto (on CUDA: the device), cpu, device

    DEFAULTS = {"pretrained": False, "ema": False, "seed": 0, "batch_size": 64, "target": "label", "save_tensors": 0,
                "tensor_dtype": "float32", "precision": "fp32", "readout": False, "model_kwargs": {},
                "decode": "auto"}

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def with_defaults(self) -> RecordOptions:
        values = dict(self.__dict__)
        for key, default in self.DEFAULTS.items():
            if values.get(key) is None:
                values[key] = default
        return RecordOptions(**values)


def resolve_stored_paths(stored: Mapping[str, Any], cwd: str | None) -> dict[str, Any]:
    """The stored options with relative file paths (MODEL, --data, --checkpoint, --class-map) made
    absolute against ``cwd``, the working directory of the run that stored them, so that ``--resume``
    works from any directory. Values that are not files there (``timm:resnet18``, ``synthetic:64``) stay."""
    resolved = dict(stored)
    if not cwd:
        return resolved  # a run from before the working directory was stored
    for key in _PATH_OPTIONS:
        value = resolved.get(key)
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            candidate = os.path.join(cwd, value)
            if os.path.exists(candidate):
                resolved[key] = os.path.normpath(candidate)
    return resolved


def merge_resume_options(stored: Mapping[str, Any], given: RecordOptions, path: Path,
                         cwd: str | None = None) -> RecordOptions:
    """``--resume`` reuses the stored options (relative paths resolved against the run's ``cwd``); an
    explicitly given option that differs is refused."""
    stored = resolve_stored_paths(stored, cwd)
    for key, value in given.given().items():
        if key in stored and stored[key] != value and not (key in _PATH_OPTIONS and _same_model(stored[key], value)):
            flag = "MODEL" if key == "model" else "--" + key.replace("_", "-")
            raise RecordingError(f"--resume: {path} was recorded with {flag} {stored[key]!r}, not {value!r}; drop "
                                 f"{flag} or start anew with --overwrite")
    known = {k: stored.get(k) for k in RecordOptions.__dataclass_fields__}
    return RecordOptions(**known).with_defaults()


_PATH_OPTIONS = ("model", "data", "checkpoint", "class_map", "labels")


def _same_model(a: Any, b: Any) -> bool:
    return str(a) == str(b) or (os.path.exists(str(a)) and os.path.exists(str(b))
                                and os.path.samefile(str(a), str(b)))


def record(
    options: RecordOptions,
    out: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    workers: int | None = None,
    trust_checkpoint: bool = False,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    offline: bool = False,
) -> RecordResult:
    """``resprobe record``: one hooked pass over the data into ``out`` (durable, resumable).

    ``progress(done, total)`` is called as samples complete.

    ``resume``: continue the interrupted run at ``out`` with its stored options (given ones must
    match); when nothing was recorded yet (the run was killed before its first batch) and MODEL and
    ``--data`` are given, a new run starts; a complete ``out`` is reported as it is.

    Under torchrun (:mod:`resprobe.distributed`) rank 0 decides, creates or resumes the run and holds
    its lock; every rank records its share of the missing batches into the same partial folder; rank
    0 merges them. A resume may use another number of processes: batch files are numbered by their
    place in the one-process order.
    """
    import torch
    from torch.utils.data import Subset

    from resprobe import distributed
    from resprobe.recorder import Recorder

    out = Path(out)
    if resume and overwrite:
        raise RecordingError("give either --resume or --overwrite, not both")
    _check_option_values(options)
    if workers is not None and workers < 0:
        raise BadValue(f"--workers must be 0 or more, got {workers}")
    writer: RunWriter | None = None

    def decide() -> tuple[str, RecordOptions, RecordResult | None]:
        """``new``, ``resume`` or ``complete`` (with its result), and the options to record with."""
        nonlocal writer
        mode = "resume" if resume else "new"
        if resume:
            state = _resume_state(out)
            if state == "complete":
                return "complete", options, _already_complete(out, options, warn)
            if state == "nothing":
                if options.model is None or options.data is None:
                    raise RecordingError(f"nothing to resume: neither {out} nor {partial_dir(out)} exists; start "
                                         "the recording without --resume")
                if warn:
                    warn(f"nothing of {out} was recorded yet: starting a new recording")
                mode = "new"
        if mode == "resume":
            writer = RunWriter.resume(out)
            try:
                merged = merge_resume_options(writer.meta.get("options", {}), options, out, writer.meta.get("cwd"))
            except BaseException:
                writer.close()
                raise
        else:
            merged = options.with_defaults()
            if merged.model is None or merged.data is None:
                raise RecordingError("record needs MODEL and --data")
            check_can_create(out, overwrite)  # before the model loads: a refusal costs nothing
        if merged.tensor_dtype not in ("float32", "float16"):
            raise RecordingError(f"--tensor-dtype {merged.tensor_dtype!r}: choose float32 or float16")
        return mode, merged, None

    # Rank 0 decides (it alone touches the run's folder until it holds the lock); the others follow.
    mode, options, finished = distributed.on_main(decide)
    if finished is not None:
        return finished
    created_here = False
    try:
        probe, source, readout = open_for_recording(options, device, trust_checkpoint, offline)
        blocks = [b.to_dict() for b in probe.anatomy.blocks]

        def open_writer() -> list[int]:
            nonlocal writer, created_here
            if writer is None:
                meta = {
                    "blocks": blocks,
                    "n_planned": len(source),
                    "options": options.__dict__,
                    "cwd": os.getcwd(),  # what relative paths in the options are relative to (for --resume)
                    "attrs": {
                        "resprobe_version": __version__, "created": now_iso(), **probe.describe(),
                        "data": options.data, "options": options.__dict__, "target": options.target,
                        "device": str(probe.runtime.device), "precision": options.precision,
                        "torch_version": torch.__version__, "n_planned": len(source),
                    },
                }
                writer = RunWriter.create(out, meta, overwrite=overwrite)
                created_here = True
            elif writer.meta["blocks"] != blocks or int(writer.meta["n_planned"]) != len(source):
                raise RecordingError(f"--resume: the model or data no longer match what {out} was recording "
                                     f"({len(source)} samples now, {writer.meta['n_planned']} planned)")
            else:
                check_same_weights(writer.meta.get("attrs", {}).get("weights_sha256"), probe.loaded.weights_sha256,
                                   f"--resume: {out} was recorded")
            return sorted(writer.done)

        done = set(distributed.on_main(open_writer))
        if writer is None:  # torchrun, rank > 0: rank 0 created or resumed the run
            writer = RunWriter.attach(out)
        batch_size = int(options.batch_size)
        ranges = distributed.batch_ranges(len(source), batch_size)
        writer.done = done
        numbers = distributed.my_batches(writer.missing_batches(len(ranges)))
        # The loader yields exactly this process's missing batches: nothing is loaded twice.
        positions = [p for k in numbers for p in ranges[k]]
        remaining = source
        if len(positions) != len(source):
            remaining = replace(source, dataset=Subset(source.dataset, positions))
        loader = probe.loader(remaining, batch_size, workers)
        total = len(source)
        done_count = [sum(len(ranges[k]) for k in done)]

        def advance(n: int) -> None:
            done_count[0] += n
            if progress:
                progress(done_count[0], total)

        if progress and done_count[0]:
            progress(done_count[0], total)
        dtype = torch.float16 if options.tensor_dtype == "float16" else torch.float32
        with Recorder(probe.anatomy, probe.runtime, target=str(options.target), save_tensors=int(options.save_tensors),
                      tensor_dtype=dtype, readout=readout) as recorder:
            return run_recording(writer, recorder, loader, numbers, advance, warn)
    except BaseException:
        if writer is not None and created_here and not distributed.is_distributed():
            writer.discard_if_empty()
        raise
    finally:
        if writer is not None:
            writer.close()


def check_same_weights(recorded: str | None, here: str | None, what: str) -> None:
    """Refuse figures of other weights (``weights_sha256`` differs), whatever the weights' origin: a
    checkpoint changed in place, another random initialization. Recordings made before the
    fingerprint existed carry none and are not checked here."""
    if recorded and here and recorded != here:
        raise RecordingError(f"{what} with other weights (weights_sha256 {recorded[:12]}…, these are {here[:12]}…): "
                             "the checkpoint changed, or a model without weights was initialized otherwise; "
                             "record it again with these weights")


def _check_option_values(options: RecordOptions) -> None:
    """Values that are wrong whatever the model: refused before anything loads."""
    for name in ("batch_size", "limit"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadValue(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if options.save_tensors is not None and options.save_tensors < 0:
        raise BadValue(f"--save-tensors must be 0 or more, got {options.save_tensors}")
    if options.target is not None and options.target not in ("label", "pred"):
        raise BadValue(f"--target {options.target!r}: choose label or pred")


def _resume_state(out: Path) -> str:
    """``partial`` (a run to continue, or one in progress), ``complete`` or ``nothing``."""
    directory = partial_dir(out)
    if directory.is_dir() and ((directory / "meta.json").exists() or RunWriter.is_locked(directory)):
        return "partial"
    return "complete" if out.exists() else "nothing"


def _already_complete(out: Path, options: RecordOptions, warn: Callable[[str], None] | None) -> RecordResult:
    recording = open_recording(out)
    if not recording.complete:
        raise RecordingError(f"{out} is incomplete and no batches are left to resume from; start anew with "
                             "--overwrite")
    stored = recording.attrs.get("options")
    merge_resume_options(stored if isinstance(stored, dict) else {}, options, out)
    if warn:
        warn(f"{out} is already complete: nothing to resume")
    return RecordResult(str(out), recording.n_samples, True, 0.0, provenance=_provenance(recording.attrs))


def open_for_recording(options: RecordOptions, device: str = "auto", trust_checkpoint: bool = False,
                       offline: bool = False) -> tuple[Any, Any, list[str]]:
    """The probe, the (limited) data source and the readout blocks that ``options`` describe."""
    from resprobe.probe import open_probe

    probe = open_probe(str(options.model), options.checkpoint, bool(options.pretrained), options.num_classes,
                       options.model_kwargs, bool(options.ema), trust_checkpoint, options.blocks, options.input_size,
                       options.mean, options.std, options.crop_pct, options.interpolation, device,
                       str(options.precision), offline=offline, seed=int(options.seed or 0))
    probe.decode = str(options.decode or "auto")
    source = probe.data(str(options.data), options.limit, int(options.seed or 0), options.class_map,
                        labels=options.labels)
    last_stage = probe.anatomy.blocks[-1].stage
    readout = [b.name for b in probe.anatomy.blocks if b.stage == last_stage] if options.readout else []
    return probe, source, readout


def record_in_memory(
    options: RecordOptions,
    device: str = "auto",
    workers: int | None = None,
    trust_checkpoint: bool = False,
    progress: Callable[[int, int], None] | None = None,
    offline: bool = False,
) -> Recorded:
    """The same pass as :func:`record`, kept in memory (``align MODEL`` without ``--out``)."""
    from resprobe.distributed import shard_source
    from resprobe.recorder import collect

    _check_option_values(options)
    options = options.with_defaults()
    probe, source, readout = open_for_recording(options, device, trust_checkpoint, offline)
    # torchrun: each rank records its batches, gathered back in one-process order below
    loader = probe.loader(shard_source(source, int(options.batch_size)), int(options.batch_size), workers)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], len(source))

    recorded = collect(probe, loader, str(options.target), readout, advance, warn_nonfinite=True)  # as rp.align
    recorded.attrs = {**probe.describe(), "data": options.data}
    recorded.n_planned = len(source)
    return recorded
