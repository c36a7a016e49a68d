"""Every bad input ends in one clear line (docs/reference.md; issue 6).

Through the real command line: exit status 1, exactly one non-empty line on stderr that starts with
``error:`` and names the problem, nothing on stdout, no traceback, and nothing left behind that
claims to be complete. Most cases run in-process through typer's CliRunner; a few run
``python -m resprobe`` in a subprocess to check the real streams and exit status, one of them with
the error raised in a data-loader worker process. NaN or inf in the activations is not an error: a
warning names the blocks and samples, exit 0.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tinymodels
from conftest import DATA, FIXTURES, HERE, MODEL, MODEL_KWARGS, ROOT
from resprobe.cli import app
from resprobe.recording.recorder import STAT_NAMES
from resprobe.recording.reader import open_recording, partial_dir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of bad inputs, made once."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = FIXTURES / "tiny_resnet.pt"
    (root / "a_directory").mkdir()
    blob = good.read_bytes()
    (root / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (root / "random.pt").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "empty.pt").write_bytes(b"")
    (root / "random.safetensors").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save(tinymodels.custom_net().state_dict(), root / "other_arch.pt")
    import timm

    ten = timm.create_model("resnet18", num_classes=10, **json.loads(MODEL_KWARGS))
    torch.save(ten.state_dict(), root / "ten_classes.pt")
    # Image folders: empty, without class folders, with one corrupt image among good ones.
    (root / "empty_folder" / "cat").mkdir(parents=True)
    (root / "no_classes").mkdir()
    (root / "no_classes" / "readme.txt").write_text("no class folders here\n")
    from PIL import Image

    for cls in ("cat", "dog"):
        (root / "corrupt" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "corrupt" / cls / f"{i}.png")
    (root / "corrupt" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    # Arrays files.
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "labels_too_big.npz", images=images, labels=np.arange(8) + 2)
    np.savez(root / "negative_labels.npz", images=images, labels=-np.ones(8, dtype=np.int64))
    np.savez(root / "one_channel.npz", images=images[..., :1], labels=np.zeros(8, dtype=np.int64))
    np.savez(root / "one_channel_float.npz", images=rng.random((8, 1, 32, 32), dtype=np.float32),
             labels=np.zeros(8, dtype=np.int64))
    np.savez(root / "channels_last_float.npz", images=rng.random((8, 32, 32, 3), dtype=np.float32),
             labels=np.zeros(8, dtype=np.int64))
    np.savez(root / "three_dims.npz", images=images[..., 0], labels=np.zeros(8, dtype=np.int64))
    np.savez(root / "label_count.npz", images=images, labels=np.zeros(5, dtype=np.int64))
    np.savez(root / "no_labels.npz", images=images)
    np.savez(root / "no_arrays.npz")
    np.savez(root / "zero_images.npz", images=images[:0], labels=np.zeros(0, dtype=np.int64))
    with h5py.File(root / "no_images.h5", "w") as f:
        f["labels"] = np.zeros(8, dtype=np.int64)
    (root / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    # Files given to align.
    (root / "notes.txt").write_text("hello\n")
    (root / "text.h5").write_text("not HDF5\n")
    with h5py.File(root / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    return root


@pytest.fixture(scope="module")
def recording(fixture_run) -> Path:
    """A complete recording (conftest's ``fixture_run``, made once per test run); tests copy it."""
    return fixture_run[0]


def fails(*args: object, expect: str | tuple[str, ...] = ()) -> str:
    """Run the command line in-process; it must fail with one clear line. Returns the message."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 10, lines
    assert result.stdout == "", result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    message = lines[0][len("error: "):]
    for part in (expect,) if isinstance(expect, str) else expect:
        assert part.lower() in message.lower(), (part, message)
    return message


# --------------------------------------------------------------------------------------------------
# Models and checkpoints


@pytest.mark.parametrize("args,expect", [
    (["eval", "timm:resnet18", "--checkpoint", "{bad}/missing.pt"], ("checkpoint not found", "missing.pt")),
    (["eval", "{bad}/missing.pt"], ("not found", "missing.pt")),
    (["eval", "timm:resnet18", "--checkpoint", "{bad}/a_directory"], ("is a directory", "file")),
    (["eval", "{bad}/a_directory"], ("is a directory", "file")),
    (["eval", "{bad}/truncated.pt"], ("truncated.pt", "corrupt or truncated")),
    (["eval", "timm:resnet18", "--checkpoint", "{bad}/truncated.pt"], ("truncated.pt", "corrupt or truncated")),
    (["eval", "timm:resnet18", "--checkpoint", "{bad}/random.pt"], ("random.pt", "not a readable")),
    (["eval", "timm:resnet18", "--checkpoint", "{bad}/empty.pt"], ("empty.pt", "empty")),
    (["eval", "timm:resnet18", "--checkpoint", "{bad}/random.safetensors"], ("random.safetensors", "safetensors")),
    (["eval", "timm:resnet18", "--model-kwargs", MODEL_KWARGS, "--checkpoint", "{bad}/other_arch.pt"],
     ("do not fit", "missing conv1.0.weight", "unexpected stem.weight", "architecture")),
    (["eval", "timm:resnet18", "--model-kwargs", MODEL_KWARGS, "--checkpoint", "{bad}/ten_classes.pt", "--num-classes", "4"],
     ("10-class", "4 classes", "--num-classes 10")),
    (["eval", MODEL, "--num-classes", "10"], ("4 classes", "--num-classes")),
    (["blocks", "resnet181"], ("unknown timm model", "did you mean", "resnet18")),
    (["blocks", "timm:resnet_18"], ("unknown timm model", "resnet18")),
    (["blocks", "torchvision:resnet51"], ("unknown torchvision model", "resnet50")),
    (["blocks", "tinymodels:plain_net"], ("no residual blocks", "PlainNet", "--blocks")),
    (["blocks", "tinymodels:no_such_factory"], ("tinymodels", "no callable")),
    (["blocks", "no_such_module_xyz:build"], ("cannot import", "no_such_module_xyz")),
    (["blocks", MODEL, "--checkpoint", MODEL], ("already a checkpoint", "--checkpoint")),
    (["eval", MODEL, "--num-classes", "0"], ("--num-classes", "at least 1")),
    (["blocks", "timm:resnet18", "--model-kwargs", "{not json"], ("--model-kwargs", "json")),
])
def test_bad_models(bad, args, expect):
    args = [a.format(bad=bad) if isinstance(a, str) and "{bad}" in a else a for a in args]
    if args[0] == "eval":
        args += ["--data", DATA, "--limit", "8"]
    fails(*args, expect=expect)


# --------------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("data,expect", [
    ("{bad}/nowhere", ("data not found", "nowhere")),
    ("{bad}/nowhere.npz", ("not found", "nowhere.npz")),
    ("{bad}/empty_folder", ("no images", "image files")),
    ("{bad}/no_classes", ("no images", "class")),
    ("{bad}/notes.txt", ("not an arrays file",)),
    ("{bad}/labels_too_big.npz", ("label 9", "4 classes")),
    ("{bad}/negative_labels.npz", ("negative label",)),
    ("{bad}/one_channel.npz", ("3 channels", "[8, 32, 32, 1]")),
    ("{bad}/one_channel_float.npz", ("3 channels", "[8, 1, 32, 32]")),
    ("{bad}/channels_last_float.npz", ("NCHW", "3 channels")),
    ("{bad}/three_dims.npz", ("4-D",)),
    ("{bad}/label_count.npz", ("one label per image",)),
    ("{bad}/no_labels.npz", ("'images' and 'labels'", "it has images")),
    ("{bad}/no_arrays.npz", ("'images' and 'labels'",)),
    ("{bad}/no_images.h5", ("'images' and 'labels'",)),
    ("{bad}/zero_images.npz", ("no images",)),
    ("{bad}/garbage.npz", ("not a readable arrays file",)),
    ("synthetic:0", ("at least 1",)),
    ("cifar10:{bad}/a_directory", ("cifar-10-batches-py", "never downloads")),
])
def test_bad_data(bad, data, expect):
    fails("eval", MODEL, "--data", data.format(bad=bad), expect=expect)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_named(bad, workers):
    # With --workers 1 the error is raised in a loader worker process.
    fails("eval", MODEL, "--data", bad / "corrupt", "--workers", workers, "--input-size", "32",
          expect=("broken.png", "cannot read image", "remove or replace"))


def test_corrupt_image_leaves_no_recording_behind(bad, tmp_path):
    out = tmp_path / "run.h5"
    fails("record", MODEL, "--data", bad / "corrupt", "--out", out, expect="broken.png")
    assert not out.exists() and not partial_dir(out).exists()


# --------------------------------------------------------------------------------------------------
# Recordings given to align


@pytest.mark.parametrize("name,expect", [
    ("notes.txt", ("not an HDF5 file", "resprobe record")),
    ("text.h5", ("not an HDF5 file",)),
    ("foreign.h5", ("HDF5 file but not a resprobe recording",)),
    ("a_directory", ("directory, not a recording",)),
    ("missing.h5", ("not found",)),
])
def test_align_refuses_what_is_not_a_recording(bad, name, expect):
    fails("align", bad / name, expect=expect)


def test_align_refuses_newer_and_damaged_recordings(recording, tmp_path):
    newer = tmp_path / "newer.h5"
    shutil.copy(recording, newer)
    with h5py.File(newer, "a") as f:
        f.attrs["schema_version"] = 7
    fails("align", newer, expect=("schema 7", "upgrade resprobe"))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(recording.read_bytes()[: recording.stat().st_size // 2])
    fails("align", truncated, expect=("truncated.h5", "damaged"))
    broken = tmp_path / "broken.h5"
    shutil.copy(recording, broken)
    with h5py.File(broken, "a") as f:
        del f["stats/cos"]
    fails("align", broken, expect=("broken.h5", "damaged"))


def _damage(data: bytes, how: str, where: float) -> bytes:
    """Truncate at, or overwrite 64 bytes at, a fraction of the file (0: just after the signature)."""
    at = 8 + int((len(data) - 72) * where)
    return data[:at] if how == "truncate" else data[:at] + bytes(range(64)) + data[at + 64:]


@pytest.mark.slow
def test_damaged_hdf5_recordings_and_arrays_fail_in_one_line(recording, tmp_path):
    """Whatever the damage (truncated or overwritten in the superblock, the root group, the metadata,
    the data): exit 1 and one line, or for damage that misses everything read, a report (a crash of the
    HDF5 library would end the test run)."""
    from resprobe.data.specs import _load_arrays
    from resprobe.errors import DataError

    arrays = tmp_path / "arrays.h5"
    with h5py.File(arrays, "w") as f:
        f["images"] = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        f["labels"] = np.zeros(16, dtype=np.int64)
    good = {"recording": recording.read_bytes(), "arrays": arrays.read_bytes()}
    failed = 0
    for how in ("truncate", "overwrite"):
        for where in (0.0, 0.02, 0.5, 0.99):
            damaged = tmp_path / f"{how}-{where}.h5"
            damaged.write_bytes(_damage(good["recording"], how, where))
            if CliRunner().invoke(app, ["align", str(damaged)]).exit_code != 0:
                fails("align", damaged, expect=damaged.name)
                failed += 1
            else:
                assert how == "overwrite"
            arrays.write_bytes(_damage(good["arrays"], how, where))
            try:
                _load_arrays(arrays)
            except DataError as exc:
                assert "arrays.h5" in str(exc) and "\n" not in str(exc)
            else:
                assert how == "overwrite"
    assert failed >= 5  # every truncation, and most overwrites


def test_an_hdf5_file_that_sends_the_library_into_a_loop_is_one_line(monkeypatch):
    """fixtures/damaged_loops.h5: a recording of the fixture with bits flipped in its first 4 KiB, on
    which h5py 3.16 / HDF5 2.0.0 reads the root group's attributes for minutes. The child reading it
    first is stopped at its time limit (here shortened to 3 s) and resprobe says so in one line."""
    import resprobe.recording.hdf5_probe as probe

    monkeypatch.setattr(probe, "MIN_SECONDS", 3.0)
    fails("align", FIXTURES / "damaged_loops.h5", expect=("damaged HDF5 file", "did not finish", "after 3 s"))


def test_an_hdf5_library_crash_is_one_line(recording, tmp_path, monkeypatch):
    """The HDF5 library dying on a file (SIGSEGV, abort) happens in the child that reads the file first:
    resprobe says so in one line. (The child is made to die as the library would.)"""
    import resprobe.recording.hdf5_probe as probe

    monkeypatch.setattr(probe, "PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(probe, "_READ_THROUGH", set())  # files read through before this test: again
    message = fails("align", recording, expect=("damaged HDF5 file", "crashed", "signal 11", "record it again"))
    assert str(recording) in message
    arrays = tmp_path / "arrays.h5"
    with h5py.File(arrays, "w") as f:
        f["images"] = np.zeros((4, 32, 32, 3), dtype=np.uint8)
        f["labels"] = np.zeros(4, dtype=np.int64)
    fails("eval", MODEL, "--data", arrays, "--input-size", "32", expect=("arrays.h5", "crashed"))
    monkeypatch.undo()
    assert probe.crash_reason(recording) is None  # the real child reads a good file through


# --------------------------------------------------------------------------------------------------
# Option values


@pytest.mark.parametrize("command", ["eval", "record", "align"])
@pytest.mark.parametrize("option,value", [("--limit", "0"), ("--limit", "-5"), ("--batch-size", "0"),
                                          ("--batch-size", "-2"), ("--workers", "-1")])
def test_bad_numbers(tmp_path, command, option, value):
    out = tmp_path / "run.h5"
    extra = ["--out", out] if command == "record" else []
    fails(command, MODEL, "--data", DATA, option, value, *extra, expect=(option, value))
    assert not out.exists() and not partial_dir(out).exists()


@pytest.mark.parametrize("args,expect", [
    (["--format", "xml"], ("--format", "table, json, csv")),
    (["--device", "tpu"], ("--device",)),
    (["--precision", "fp8"], ("--precision",)),
    (["--input-size", "big"], ("--input-size",)),
    (["--mean", "1,2"], ("--mean",)),
    (["--std", "0,1,1"], ("--std", "positive")),
    (["--target", "maybe"], ("--target",)),
    (["--save-tensors", "-1"], ("--save-tensors",)),
])
def test_bad_option_values(tmp_path, args, expect):
    out = tmp_path / "run.h5"
    fails("record", MODEL, "--data", DATA, "--out", out, *args, expect=expect)
    assert not out.exists() and not partial_dir(out).exists()


def test_usage_errors_exit_2():
    result = CliRunner().invoke(app, ["eval", MODEL, "--no-such-option"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# Output paths and a full disk


def test_bad_output_paths(bad, tmp_path):
    base = ["record", MODEL, "--data", DATA, "--limit", "8"]
    fails(*base, "--out", tmp_path / "missing" / "run.h5", expect=("does not exist", "missing"))
    fails(*base, "--out", bad / "notes.txt" / "run.h5", expect=("not a directory", "notes.txt"))
    fails(*base, "--out", tmp_path, expect=("is a directory", "file name"))
    fails(*base, "--out", "/proc/resprobe-run.h5", expect=("cannot write", "/proc/resprobe-run.h5"))
    fails("align", MODEL, "--data", DATA, "--out", tmp_path / "missing" / "run.h5", expect="does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        fails("record", MODEL, "--data", DATA, "--out", locked / "run.h5", expect=("not writable", "locked"))
    finally:
        locked.chmod(0o755)


def _same_statistics(a: Path, b: Path) -> None:
    x, y = open_recording(a), open_recording(b)
    assert x.complete and y.complete and x.n_samples == y.n_samples
    for name in STAT_NAMES:
        np.testing.assert_allclose(x.stats[name], y.stats[name], rtol=0, atol=1e-6, equal_nan=True, err_msg=name)


def test_full_disk_while_writing_batches_keeps_them_for_resume(tmp_path, monkeypatch):
    whole, out = tmp_path / "whole.h5", tmp_path / "run.h5"
    base = ["record", MODEL, "--data", DATA, "--limit", "64", "--batch-size", "8"]
    assert CliRunner().invoke(app, [*base, "--out", str(whole), "-q"]).exit_code == 0
    savez, calls = np.savez, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return savez(*args, **kwargs)

    monkeypatch.setattr(np, "savez", full_disk)
    message = fails(*base, "--out", out, expect=("disk is full", "--resume", str(partial_dir(out))))
    assert "run.h5" in message
    monkeypatch.undo()
    assert not out.exists()
    assert len(list(partial_dir(out).glob("batch-*.npz"))) == 3  # every batch before the failure
    assert not list(partial_dir(out).glob("tmp-*"))
    assert open_recording(out).complete is False
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--resume", "-f", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["complete"] is True
    _same_statistics(out, whole)


def test_full_disk_while_finishing(tmp_path, monkeypatch):
    from resprobe.recording import writer

    out = tmp_path / "run.h5"

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "write_hdf5", full_disk)
    fails("record", MODEL, "--data", DATA, "--limit", "16", "--batch-size", "8", "--out", out,
          expect=("disk is full", "--resume"))
    monkeypatch.undo()
    assert not out.exists() and not list(tmp_path.glob(".run.h5.tmp-*"))
    assert len(list(partial_dir(out).glob("batch-*.npz"))) == 2
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--resume", "-q"])
    assert result.exit_code == 0 and open_recording(out).complete


# --------------------------------------------------------------------------------------------------
# NaN and inf: a warning, not an error


def test_nan_in_activations_is_a_warning_naming_blocks_and_samples(tmp_path):
    checkpoint = torch.load(MODEL, weights_only=True)
    checkpoint["state_dict"]["layer2.1.bn2.running_var"][:] = -1.0  # sqrt of a negative: NaN from here on
    broken = tmp_path / "nan_model.pt"
    torch.save(checkpoint, broken)
    out = tmp_path / "run.h5"
    result = CliRunner().invoke(app, ["record", str(broken), "--data", DATA, "--limit", "8", "--out", str(out),
                                      "-f", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["complete"] is True
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "NaN or inf" in warning[0]
    assert "block layer2.1" in warning[0] and "8 samples" in warning[0] and "dataset indices" in warning[0]
    report = CliRunner().invoke(app, ["align", str(out), "-f", "json"])
    assert report.exit_code == 0 and json.loads(report.stdout)["complete"] is True
    # align MODEL (in memory) warns the same way
    direct = CliRunner().invoke(app, ["align", str(broken), "--data", DATA, "--limit", "8", "-f", "json"])
    assert direct.exit_code == 0 and "block layer2.1" in direct.stderr


def test_huge_inputs_overflowing_to_inf_are_a_warning(tmp_path):
    data = tmp_path / "huge.npz"
    rng = np.random.default_rng(1)
    np.savez(data, images=rng.random((4, 3, 32, 32)).astype(np.float32), labels=np.zeros(4, dtype=np.int64))
    # Float arrays must be in [0, 1]: a tiny --std makes the normalized inputs huge (up to 1e38).
    result = CliRunner().invoke(app, ["align", MODEL, "--data", str(data), "--mean", "0", "--std", "1e-38",
                                      "-f", "json"])
    assert result.exit_code == 0, result.stderr
    assert "NaN or inf" in result.stderr and "layer1.0" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# The real process: streams, exit status, --debug


def run(*args: object, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "resprobe", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow  # real processes
@pytest.mark.parametrize("args,expect", [
    (["blocks", "{bad}/truncated.pt"], "corrupt or truncated"),
    (["blocks", "tinymodels:plain_net"], "no residual blocks"),
    (["eval", MODEL, "--data", "{bad}/corrupt", "--workers", "1", "--input-size", "32"], "broken.png"),
])
def test_real_process_one_line_exit_1(bad, args, expect):
    proc = run(*[a.format(bad=bad) if "{bad}" in a else a for a in args])
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(bad):
    result = CliRunner().invoke(app, ["blocks", str(bad / "truncated.pt"), "--debug"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")
