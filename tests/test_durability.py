"""Interrupted recordings lose nothing (docs/reference.md): real processes killed at several points.

``resprobe record`` runs in a subprocess and is stopped with SIGINT (finish the batch, make it durable,
exit 130, report ``complete: false``) or SIGKILL: from outside at an arbitrary moment of the run, and
from inside at exact points (right after ``meta.json``, between a batch's temporary file and its
rename, in the middle of the final merge, between the merge's rename and the removal of the partial
folder). Every time, ``align RUN.h5`` must not call the file complete unless it is, and ``--resume``
must give statistics equal (1e-6) to an uninterrupted run.

The subprocesses run the real command line through a small driver that can add a sleep to each batch
(so that a signal sent from outside lands part-way) or SIGKILL itself at one of those points.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import DATA, FIXTURES, MODEL, ROOT
from resprobe.cli import app
from resprobe.recording.recorder import STAT_NAMES
from resprobe.recording.reader import open_recording, partial_dir

BATCH = 16
N = 256
RECORD = ["record", MODEL, "--data", DATA, "--batch-size", str(BATCH), "-f", "json"]

DRIVER = r'''
import os, signal, sys, time

point = os.environ.get("KILL_AT", "")
slow = float(os.environ.get("SLOW_BATCH", "0") or 0)

import resprobe.recording.recorder as recorder
import resprobe.recording.writer as store


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if slow:
    launch_batch = recorder.Recorder.launch_batch

    def slow_batch(self, *args, **kwargs):
        time.sleep(slow)
        return launch_batch(self, *args, **kwargs)

    recorder.Recorder.launch_batch = slow_batch

real_replace = os.replace

if point == "after-meta":
    write_json = store.RunWriter._write_json

    def patched_json(self, name, data, **kwargs):
        write_json(self, name, data, **kwargs)
        if name == "meta.json":
            die()

    store.RunWriter._write_json = patched_json
elif point.startswith("before-batch-rename:"):
    target = "batch-%06d.npz" % int(point.split(":")[1])

    def patched_replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == target:
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = patched_replace
elif point in ("finish-torn", "finish-before-rename"):
    write_hdf5 = store.write_hdf5

    def patched_write(path, *args, **kwargs):
        write_hdf5(path, *args, **kwargs)
        if point == "finish-torn":  # a merge cut off half-way
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
        die()

    store.write_hdf5 = patched_write
elif point == "finish-after-rename":
    def patched_replace(src, dst, *args, **kwargs):
        if str(src).endswith(".partial"):  # RUN.h5 is in place; the partial folder is about to go
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = patched_replace

from resprobe.cli import app

app(prog_name="resprobe")
'''


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # real processes, killed and resumed


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def start(driver: Path, out: Path, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(driver), *RECORD, "--out", str(out), *args], cwd=out.parent,
                            env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def wait_for_batches(out: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``count`` batches are durable (the process is then part-way through the run)."""
    target = partial_dir(out) / f"batch-{count - 1:06d}.npz"
    deadline = time.monotonic() + timeout
    while not target.exists():
        assert proc.poll() is None, f"the recording ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no batch was written in time"
        time.sleep(0.005)


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the same recording."""
    out = tmp_path_factory.mktemp("reference") / "whole.h5"
    assert json.loads(cli(*RECORD, "--out", out).stdout)["complete"] is True
    return out


def assert_same_statistics(path: Path, reference: Path) -> None:
    a, b = open_recording(path), open_recording(reference)
    assert a.complete and a.n_samples == b.n_samples == N
    for name in STAT_NAMES:
        np.testing.assert_allclose(a.stats[name], b.stats[name], rtol=0, atol=1e-6, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.pred, b.pred)
    np.testing.assert_allclose(a.loss, b.loss, rtol=0, atol=1e-6)


def assert_reported_incomplete(out: Path) -> int:
    """``align RUN.h5`` on an interrupted run: complete false, and a warning."""
    result = cli("align", out, "-f", "json")
    payload = json.loads(result.stdout)
    assert payload["complete"] is False
    assert "warning" in result.stderr and "incomplete" in result.stderr
    assert not out.exists() or not open_recording(out).complete
    return payload["n_samples"]


def resume(out: Path, *args: str) -> dict:
    payload = json.loads(cli("record", "--out", out, "--resume", "-f", "json", *args).stdout)
    assert payload["complete"] is True and payload["n_samples"] == N
    assert not partial_dir(out).exists()
    return payload


# --------------------------------------------------------------------------------------------------


def test_sigint_finishes_the_batch_exits_130_and_resumes(tmp_path, driver, reference):
    out = tmp_path / "run.h5"
    proc = start(driver, out, SLOW_BATCH="0.05")
    wait_for_batches(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    report = json.loads(stdout)
    assert report["complete"] is False and 2 * BATCH <= report["n_samples"] < N
    assert report["n_samples"] % BATCH == 0  # the batch in flight was finished, not dropped half-way
    assert "--resume" in stderr.strip().splitlines()[-1]
    batches = sorted(partial_dir(out).glob("batch-*.npz"))
    assert len(batches) * BATCH == report["n_samples"]  # durable: everything reported is on disk
    assert not list(partial_dir(out).glob("tmp-*"))
    assert not out.exists()
    assert assert_reported_incomplete(out) == report["n_samples"]
    resume(out)
    assert_same_statistics(out, reference)


def test_sigkill_mid_run_a_second_writer_is_refused_and_resume_completes(tmp_path, driver, reference):
    out = tmp_path / "run.h5"
    proc = start(driver, out, SLOW_BATCH="0.05")
    try:
        wait_for_batches(out, 3, proc)
        # While the first process writes, a second one is refused, whatever it asks for.
        for extra in ((), ("--overwrite",)):
            refused = cli(*RECORD, "--out", out, *extra, code=1)
            assert "another resprobe process" in refused.stderr
        refused = cli("record", "--out", out, "--resume", code=1)
        assert "another resprobe process" in refused.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    done = assert_reported_incomplete(out)
    assert 3 * BATCH <= done < N
    # --resume reuses the stored options; a conflicting one is refused, a matching one accepted
    refused = cli("record", "--out", out, "--resume", "--batch-size", "8", code=1)
    assert "--batch-size" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    refused = cli("record", MODEL, "--data", str(FIXTURES / "other.npz"), "--out", out, "--resume", code=1)
    assert "--data" in refused.stderr
    resume(out, MODEL, "--data", DATA, "--batch-size", str(BATCH))
    assert_same_statistics(out, reference)


@pytest.mark.parametrize("point", ["after-meta", "before-batch-rename:3"])
def test_sigkill_at_start_and_between_write_and_rename(tmp_path, driver, reference, point):
    out = tmp_path / "run.h5"
    code, _, _ = finish(start(driver, out, KILL_AT=point))
    assert code == -signal.SIGKILL
    done = assert_reported_incomplete(out)
    if point == "after-meta":
        assert done == 0
    else:
        assert done == 3 * BATCH  # batches 0-2 durable; batch 3 never renamed
        assert list(partial_dir(out).glob("tmp-*"))  # its temporary file is left for resume to discard
    resume(out)
    assert_same_statistics(out, reference)


@pytest.mark.parametrize("point", ["finish-torn", "finish-before-rename", "finish-after-rename"])
def test_sigkill_while_finishing_and_overwrite_keeps_the_old_file(tmp_path, driver, reference, point):
    out = tmp_path / "run.h5"
    # An older, complete recording of fewer samples, to be replaced with --overwrite.
    cli(*RECORD, "--out", out, "--limit", "32")
    old = out.read_bytes()
    code, _, _ = finish(start(driver, out, "--overwrite", KILL_AT=point))
    assert code == -signal.SIGKILL
    assert partial_dir(out).is_dir()
    assert not list(out.parent.glob("*.partial-done-*"))
    if point == "finish-after-rename":
        # The new file is in place and complete; only the clean-up was cut off.
        result = cli("align", out, "-f", "json")
        assert json.loads(result.stdout)["complete"] is True and json.loads(result.stdout)["n_samples"] == N
        assert "newer, unfinished" not in result.stderr
    else:
        assert out.read_bytes() == old  # the old file stays until the new run is complete
        result = cli("align", out, "-f", "json")
        assert json.loads(result.stdout)["n_samples"] == 32  # the report is of the old, complete file...
        assert "newer, unfinished run" in result.stderr  # ...and says so
    resume(out)
    assert_same_statistics(out, reference)
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # a merge's leftovers are removed


def test_resume_of_a_complete_run_or_of_nothing(tmp_path, reference):
    # Killed before anything durable: --resume with MODEL and --data starts the run.
    out = tmp_path / "run.h5"
    partial_dir(out).mkdir()
    (partial_dir(out) / "lock").write_text("")
    result = cli("record", MODEL, "--data", DATA, "--batch-size", str(BATCH), "--out", out, "--resume", "-f", "json")
    assert json.loads(result.stdout)["complete"] is True and "starting a new recording" in result.stderr
    assert_same_statistics(out, reference)
    # Already complete: nothing to do, reported as it is; a conflicting option is still refused.
    again = cli("record", "--out", out, "--resume", "-f", "json")
    assert json.loads(again.stdout) == {**json.loads(again.stdout), "complete": True, "n_samples": N}
    assert "already complete" in again.stderr
    cli("record", "--out", out, "--resume", "--limit", "8", code=1)
    # Nothing at all and no MODEL: one line saying so.
    missing = cli("record", "--out", tmp_path / "none.h5", "--resume", code=1)
    assert "nothing to resume" in missing.stderr


def test_a_partial_folder_resprobe_did_not_make_is_never_emptied(tmp_path):
    """A new run empties RUN.h5.partial for its batches: a folder of that name holding other files (the
    user's) is refused, with or without --overwrite, and left as it was."""
    out = tmp_path / "run.h5"
    partial_dir(out).mkdir()
    (partial_dir(out) / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = cli("record", MODEL, "--data", DATA, "--limit", "8", "--out", out, *extra, code=1)
        assert result.stderr == (f"error: {partial_dir(out)} holds files resprobe did not write (notes.txt), and a "
                                 "recording keeps its batches there; move it or choose another --out\n")
    assert [p.name for p in partial_dir(out).iterdir()] == ["notes.txt"] and not out.exists()
    assert (partial_dir(out) / "notes.txt").read_text() == "mine"


def test_a_file_that_appears_during_a_run_is_not_replaced_without_overwrite(tmp_path):
    """RUN.h5 absent when the run starts, written by someone else while it records: the finished run does
    not replace it (a hard link installs RUN.h5); its batches stay in the partial folder, and --resume
    finishes once the file is moved away. With --overwrite the run replaces it."""
    from resprobe.errors import RecordingError
    from resprobe.record import RecordOptions, record

    out = tmp_path / "run.h5"
    options = RecordOptions(model=MODEL, data=DATA, limit=32, seed=0, batch_size=16)

    def appear(done: int, total: int) -> None:
        if not out.exists():
            out.write_bytes(b"someone else's file")

    with pytest.raises(RecordingError, match="appeared during the run and is not replaced without --overwrite"):
        record(options, out, device="cpu", progress=appear)
    assert out.read_bytes() == b"someone else's file" and partial_dir(out).is_dir()
    assert not list(tmp_path.glob(".run.h5.tmp-*"))
    out.rename(tmp_path / "theirs.h5")
    result = record(options, out, resume=True, device="cpu")
    assert result.complete and open_recording(out).n_samples == 32 and not partial_dir(out).exists()

    again = tmp_path / "again.h5"
    result = record(options, again, overwrite=True, device="cpu",
                    progress=lambda done, total: again.exists() or again.write_bytes(b"x"))
    assert result.complete and open_recording(again).n_samples == 32
