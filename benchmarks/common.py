"""Shared pieces of the CPU benchmarks: the CIFAR-10 arrays file and whole-process measurements."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_TEST = ROOT.parent / "shared" / "cifar10" / "test"
CIFAR_MEAN = "0.4914,0.4822,0.4465"
CIFAR_STD = "0.2470,0.2435,0.2616"


def cifar_arrays(path: Path, n: int = 1000, seed: int = 0) -> Path:
    """``n`` CIFAR-10 test images (32×32, uint8 NHWC) as an arrays file; random images when the
    JPEG copy in ../shared/cifar10 is absent (the timings do not depend on pixel values)."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    if CIFAR10_TEST.is_dir():
        from PIL import Image

        classes = sorted(p.name for p in CIFAR10_TEST.iterdir() if p.is_dir())
        files = [(f, label) for label, c in enumerate(classes) for f in sorted((CIFAR10_TEST / c).iterdir())]
        picked = rng.choice(len(files), size=n, replace=False)
        images = np.stack([np.asarray(Image.open(files[i][0]).convert("RGB")) for i in picked])
        labels = np.array([files[i][1] for i in picked])
    else:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
    np.savez(path, images=images, labels=labels)
    return path


@dataclass
class Measurement:
    seconds: float  # wall time
    cpu_seconds: float  # user + system, far less sensitive than wall time to other processes
    max_rss_mb: float
    stdout: str


class ProcessFailed(SystemExit):
    """A measured process that failed, was killed, or ran past its time limit (``timed_out``)."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


def measure(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> Measurement:
    """One whole process: wall time, and from its own rusage (``os.wait4``) CPU time and peak resident
    memory. Output goes to temporary files, which unlike pipes can never fill up and stall the child.
    A process still running after ``timeout`` seconds is killed (:class:`ProcessFailed`, ``timed_out``).

    ``ru_maxrss`` also counts the resident set the child inherited at fork, before its exec: a peak
    below this process's own (about 0.5 GB once torch is imported) would read as that. The processes
    measured here peak well above it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            timed_out = timeout is not None and seconds >= timeout
            what = f"ran past {timeout:.0f} s" if timed_out else f"failed (exit {code})"
            raise ProcessFailed(f"{' '.join(cmd)} {what}: {err.read().decode()[-2000:]}", timed_out)
        out.seek(0)
        return Measurement(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.read().decode())


def python() -> str:
    return sys.executable
