"""Reading HDF5 files that may be damaged without risking the process.

HDF5 files are parsed by the HDF5 C library, and a damaged file can make it crash (a segmentation
fault or an abort, which no ``try``/``except`` turns into an error message). So before resprobe
reads an HDF5 file in its own process, a short child process reads all of it first — the superblock,
every group, attribute and dataset — and resprobe reads the file only if the child survived. Errors
that the child meets as Python exceptions are left to the reader in resprobe's process, which
explains them in one line; a child that dies is reported here, in one line too.

The child costs one Python start and one ``import h5py`` (about 0.3 s) and reads the file once more,
once per unchanged file and process, and only for files from outside: a recording this process has
just written (:func:`written_here`) is not read through. Under torchrun, where every rank opens the
same file, rank 0 alone reads it through and tells the others.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Every attribute and every dataset, whole (the reader reads slices of the same chunks). Python
# exceptions are swallowed so that a readable part after an unreadable one is still exercised; only
# the process dying (a signal, an abort) gives a non-zero status.
PROBE = r"""
import sys
try:
    import h5py

    def visit(name, obj):
        try:
            for _ in obj.attrs.items():
                pass
            if isinstance(obj, h5py.Dataset):
                obj[()]
        except Exception:
            pass

    with h5py.File(sys.argv[1], "r") as f:
        for _ in f.attrs.items():
            pass
        f.visititems(visit)
except BaseException:
    pass
sys.exit(0)
"""


# Files already read through by a child, by (device, inode, size, modification time): a process that
# opens the same unchanged file again (a notebook, ablate after align) does not start another child.
_READ_THROUGH: set[tuple[int, int, int, int]] = set()


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# Some damage sends the HDF5 library into a loop instead of a crash (seen: a bit flip that made reading
# the root group's attributes run for minutes on a 136 KB file). A whole read of a sound file takes
# far less than this: a minute to start, plus the file read at 20 MB/s.
MIN_SECONDS, BYTES_PER_SECOND = 60.0, 20e6


def time_limit(size: int) -> float:
    return MIN_SECONDS + size / BYTES_PER_SECOND


def crash_reason(path: str | Path) -> str | None:
    """``None`` when the HDF5 library reads all of ``path`` in a child process without dying;
    otherwise how the child ended (e.g. ``"signal 11"``, or that it had not finished in time)."""
    if not sys.executable:  # embedded interpreter: no child can be started, read in-process
        return None
    identity = _identity(Path(path))
    if identity is not None and identity in _READ_THROUGH:
        return None
    timeout = time_limit(identity[2] if identity is not None else 0)
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:  # the child is killed by subprocess.run
        return f"it had not finished after {timeout:.0f} s"
    except OSError:
        return None  # cannot start a process here: read in-process as before
    if proc.returncode == 0:
        if identity is not None and identity == _identity(Path(path)):  # unchanged while it was read
            _READ_THROUGH.add(identity)
        return None
    return f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"


def written_here(path: str | Path) -> None:
    """``path`` is a whole HDF5 file this process has just written with h5py (and renamed into place):
    as long as it stays unchanged, reading it needs no child."""
    identity = _identity(Path(path))
    if identity is not None:
        _READ_THROUGH.add(identity)


def check_readable(path: str | Path, error: type[Exception], what: str) -> None:
    """Raise ``error`` (one line) when reading ``path`` would crash the HDF5 library. Where every rank
    of a torchrun run opens the file together, rank 0 alone starts the child."""
    from resprobe import distributed

    if distributed.in_lockstep():
        reason = distributed.on_main(lambda: crash_reason(path))
    else:
        reason = crash_reason(path)
    if reason is not None:
        verb = "did not finish reading it" if reason.startswith("it had not") else "crashed reading it"
        raise error(f"{path} is a damaged HDF5 file: the HDF5 library {verb} ({reason}); {what}")
