"""Writing a run durably: each completed batch a small HDF5 file renamed into RUN.h5.partial/, merged
into RUN.h5 by rename at the end (DESIGN §3: a kill at any instant loses at most the batch in flight)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from resprobe.errors import RecordingError
from resprobe.recording.hdf5_probe import written_here
from resprobe.recording.reader import (
    _BATCH_PREFIX,
    FORMAT,
    SCHEMA_VERSION,
    _batch_number,
    _os_reason,
    partial_dir,
    read_partial,
    stat_names,
)
from resprobe.recording.recorder import BatchStats, Recorded


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    # Also beside an empty partial folder (a run killed before its first batch): refused now, not at the end.
    if path.exists() and not overwrite:
        raise RecordingError(f"{path} exists: pass --overwrite to replace it (only once the new run is complete), "
                             "or --resume to finish an interrupted run")


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
        for name in stat_names(recorded.stats):
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
