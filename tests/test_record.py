"""The recording: HDF5 round trip, resume equality, provenance, partial runs."""

from __future__ import annotations

import importlib
import h5py
import numpy as np
import pytest

from conftest import DATA, MODEL
from resprobe.align import summarize
from resprobe.errors import RecordingError
from resprobe.recording.recorder import STAT_NAMES
from resprobe.record import RecordOptions, record, record_in_memory
from resprobe.recording.reader import open_recording, partial_dir


def options(**kw) -> RecordOptions:
    return RecordOptions(model=MODEL, data=DATA, limit=kw.pop("limit", 40), batch_size=kw.pop("batch_size", 8), **kw)


class Crash(Exception):
    pass


def crash_after(samples: int):
    def progress(done: int, total: int) -> None:
        if done >= samples:
            raise Crash

    return progress


def test_round_trip_equals_in_memory(tmp_path):
    out = tmp_path / "run.h5"
    result = record(options(save_tensors=3), out, device="cpu")
    assert result.complete and result.n_samples == 40 and not partial_dir(out).exists()
    on_disk = open_recording(out, load_tensors=True)
    in_memory = record_in_memory(options(), device="cpu")
    for name in STAT_NAMES:
        np.testing.assert_array_equal(on_disk.stats[name], in_memory.stats[name])
    np.testing.assert_array_equal(on_disk.index, in_memory.index)
    assert summarize(on_disk)["blocks"] == summarize(in_memory)["blocks"]
    assert on_disk.tensors["layer1.0"]["grad"].shape == (3, 16, 8, 8)
    with h5py.File(out) as f:
        assert f.attrs["format"] == "resprobe-record" and f.attrs["schema_version"] == 1
        assert bool(f.attrs["complete"]) and f.attrs["n_done"] == 40 and f.attrs["n_planned"] == 40
        assert len(f.attrs["checkpoint_sha256"]) == 64
        for key in ("model", "data", "preprocessing", "options", "target", "device", "precision", "torch_version",
                    "created", "resprobe_version"):
            assert key in f.attrs, key
        assert f["stats/cos"].shape == (40, 10) and f["stats/cos"].chunks is not None
        assert f["stats/cos"].maxshape == (None, 10)
        assert list(f["blocks/name"].asstr()[()])[:2] == ["layer1.0", "layer1.1"]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole.h5"
    record(options(), whole, device="cpu")
    out = tmp_path / "run.h5"
    with pytest.raises(Crash):
        record(options(), out, device="cpu", progress=crash_after(16))
    partial = open_recording(out)
    assert not partial.complete and 16 <= partial.n_samples < 40
    assert summarize(partial)["complete"] is False
    reported: list[tuple[int, int]] = []
    result = record(RecordOptions(), out, resume=True, device="cpu", progress=lambda *p: reported.append(p))
    assert result.complete and result.n_samples == 40
    # Progress counts the samples already on disk once, then each new batch, up to the total.
    assert reported[0][0] == partial.n_samples and reported[-1] == (40, 40)
    assert all(a[0] < b[0] for a, b in zip(reported, reported[1:]))
    assert_same_stats(open_recording(whole), open_recording(out))


def assert_same_stats(a, b) -> None:
    """Two recordings of the same samples agree to 1e-6 (the resume equality the docs promise)."""
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_allclose(b.loss, a.loss, rtol=0, atol=1e-6)
    for name in STAT_NAMES:
        np.testing.assert_allclose(a.stats[name], b.stats[name], rtol=0, atol=1e-6, equal_nan=True)


def test_resume_refuses_conflicting_options(tmp_path):
    out = tmp_path / "run.h5"
    with pytest.raises(Crash):
        record(options(), out, device="cpu", progress=crash_after(8))
    with pytest.raises(RecordingError, match="--batch-size"):
        record(RecordOptions(batch_size=4), out, resume=True, device="cpu")
    result = record(RecordOptions(batch_size=8, data=DATA), out, resume=True, device="cpu")
    assert result.complete


def test_existing_output_is_never_replaced_silently(tmp_path):
    out = tmp_path / "run.h5"
    record(options(limit=8), out, device="cpu")
    before = out.read_bytes()
    with pytest.raises(RecordingError, match="--overwrite"):
        record(options(limit=8), out, device="cpu")
    assert out.read_bytes() == before
    # --overwrite keeps the old file until the new run is complete
    with pytest.raises(Crash):
        record(options(limit=16), out, overwrite=True, device="cpu", progress=crash_after(8))
    assert out.read_bytes() == before
    assert open_recording(out).complete
    with pytest.raises(RecordingError, match="nothing to resume"):
        record(RecordOptions(), tmp_path / "nothing.h5", resume=True, device="cpu")


def test_foreign_files_are_refused(tmp_path):
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(RecordingError, match="not an HDF5"):
        open_recording(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(RecordingError, match="not a resprobe recording"):
        open_recording(tmp_path / "other.h5")
    out = tmp_path / "run.h5"
    record(options(limit=8), out, device="cpu")
    with h5py.File(out, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(RecordingError, match="newer"):
        open_recording(out)


@pytest.mark.parametrize("crash", [False, True])
def test_launching_ahead_as_on_a_gpu_records_the_same(tmp_path, monkeypatch, crash):
    """The order a GPU run takes (batch k+1 launched before batch k is awaited and written), on the
    CPU: the same recording; a crash keeps every batch whose results were taken, and resumes."""
    from resprobe.recording.recorder import Recorder

    whole = tmp_path / "whole.h5"
    record(options(), whole, device="cpu")
    monkeypatch.setattr(Recorder, "launches_ahead", property(lambda self: True))
    out = tmp_path / "ahead.h5"
    if crash:
        with pytest.raises(Crash):
            record(options(), out, device="cpu", progress=crash_after(16))
        assert 16 <= open_recording(out).n_samples < 40
        record(RecordOptions(), out, resume=True, device="cpu")
    else:
        record(options(), out, device="cpu")
    a, b = open_recording(whole), open_recording(out)
    assert b.complete and b.n_samples == 40
    for name in STAT_NAMES:
        np.testing.assert_allclose(a.stats[name], b.stats[name], rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(a.index, b.index)


@pytest.mark.slow
def test_slow_disk_keeps_at_most_one_batch_pending(tmp_path, monkeypatch, one_thread):
    """With a writer slower than the model, the recorder waits: no more than ``max_pending`` (1) batches
    are ever queued or being written, and the recording is still whole."""
    import time

    from resprobe.recording.writer import RunWriter

    write_file, write_batch = RunWriter._write_batch_file, RunWriter.write_batch
    outstanding = []

    def slow_file(self, number, batch):
        time.sleep(0.3)  # a slow disk: much slower than computing a batch of the tiny model
        write_file(self, number, batch)

    def counting(self, batch, number=None):
        write_batch(self, batch, number)
        outstanding.append(sum(not future.done() for future in self._pending))

    monkeypatch.setattr(RunWriter, "_write_batch_file", slow_file)
    monkeypatch.setattr(RunWriter, "write_batch", counting)
    out = tmp_path / "run.h5"
    result = record(options(limit=16, batch_size=4), out, device="cpu")
    assert result.complete and result.n_samples == 16 and len(outstanding) == 4
    assert max(outstanding) <= RunWriter.max_pending == 1
    monkeypatch.undo()
    on_disk, in_memory = open_recording(out), record_in_memory(options(limit=16, batch_size=4), device="cpu")
    np.testing.assert_array_equal(on_disk.index, in_memory.index)
    np.testing.assert_array_equal(on_disk.stats["cos"], in_memory.stats["cos"])


@pytest.mark.slow
def test_resume_from_another_directory_with_relative_paths(tmp_path, monkeypatch):
    """MODEL and --data given relative to the first run's directory: --resume from elsewhere (no options
    repeated, or the same files named relative to the new directory) finishes the same recording."""
    import shutil

    first, other = tmp_path / "first", tmp_path / "other"
    (first / "inputs").mkdir(parents=True)
    other.mkdir()
    shutil.copy(MODEL, first / "inputs" / "model.pt")
    shutil.copy(DATA, first / "inputs" / "data.npz")
    whole = tmp_path / "whole.h5"
    record(options(), whole, device="cpu")
    out = tmp_path / "run.h5"
    relative = RecordOptions(model="inputs/model.pt", data="inputs/data.npz", limit=40, batch_size=8)
    monkeypatch.chdir(first)
    with pytest.raises(Crash):
        record(relative, out, device="cpu", progress=crash_after(16))
    monkeypatch.chdir(other)
    result = record(RecordOptions(), out, resume=True, device="cpu")
    assert result.complete and result.n_samples == 40
    a, b = open_recording(whole), open_recording(out)
    for name in STAT_NAMES:
        np.testing.assert_array_equal(a.stats[name], b.stats[name])
    # The same files named from the new directory are the same options, not a conflict.
    out2 = tmp_path / "run2.h5"
    monkeypatch.chdir(first)
    with pytest.raises(Crash):
        record(relative, out2, device="cpu", progress=crash_after(16))
    monkeypatch.chdir(other)
    again = RecordOptions(model="../first/inputs/model.pt", data="../first/inputs/data.npz", limit=40, batch_size=8)
    assert record(again, out2, resume=True, device="cpu").complete


def test_a_recording_written_here_is_not_read_through_again(tmp_path, monkeypatch):
    """The HDF5 read-through child is for files from outside: the recording this process has just
    written opens without one; a copy of it (another file, as far as anyone knows) is read through,
    once; changing the written file makes it a file from outside again."""
    import shutil
    import subprocess

    import resprobe.recording.hdf5_probe as hdf5_probe

    children = []
    real_run = subprocess.run

    def counted(command, *args, **kwargs):
        children.append(command[-1])
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(hdf5_probe.subprocess, "run", counted)
    out = tmp_path / "run.h5"
    record(options(limit=16), out, device="cpu")
    assert open_recording(out).complete and children == []
    copy = tmp_path / "copy.h5"
    shutil.copy(out, copy)
    open_recording(copy)
    open_recording(copy)
    assert children == [str(copy)]
    with h5py.File(out, "a") as f:
        f.attrs["note"] = "touched"
    open_recording(out)
    assert children == [str(copy), str(out)]


# --------------------------------------------------------------------------------------------------
# The weights fingerprint: a resume or an ablate --recording of other weights is refused (issue 22)

RANDOM_KWARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "stem_width": 4, "zero_init_last": False}


def random_options(**kw) -> RecordOptions:
    """A timm model without weights (its initialization comes from --seed)."""
    return RecordOptions(model="timm:resnet18", num_classes=4, model_kwargs=RANDOM_KWARGS, input_size="32", data=DATA,
                         limit=24, batch_size=8, **kw)


def test_recordings_carry_the_fingerprint_of_the_weights_used(tmp_path):
    import torch

    from resprobe.models.fingerprint import state_dict_sha256

    out = tmp_path / "run.h5"
    result = record(options(limit=8), out, device="cpu")
    # the fixture's weights as stored in the file, hashed without loading them into a model
    stored = torch.load(MODEL, map_location="cpu", weights_only=True)["state_dict"]
    with h5py.File(out) as f:
        assert f.attrs["weights_sha256"] == state_dict_sha256(stored)
    assert result.to_dict()["weights_sha256"] == state_dict_sha256(stored)


def test_resume_of_a_model_without_weights_continues_the_same_network(tmp_path):
    whole = tmp_path / "whole.h5"
    record(random_options(), whole, device="cpu")
    out = tmp_path / "run.h5"
    with pytest.raises(Crash):
        record(random_options(), out, device="cpu", progress=crash_after(8))
    record(RecordOptions(), out, resume=True, device="cpu")
    a, b = open_recording(whole), open_recording(out)
    assert a.attrs["weights_sha256"] == b.attrs["weights_sha256"]
    assert_same_stats(a, b)


def test_resume_refuses_a_checkpoint_changed_in_place(tmp_path):
    import torch

    from resprobe.models.loading import LoadOptions, load_model

    weights = tmp_path / "w.pt"

    def save(seed: int) -> None:
        model = load_model("timm:resnet18", LoadOptions(num_classes=4, model_kwargs=RANDOM_KWARGS, seed=seed)).model
        torch.save(model.state_dict(), weights)

    save(0)
    out = tmp_path / "run.h5"
    with pytest.raises(Crash):
        record(random_options(checkpoint=str(weights)), out, device="cpu", progress=crash_after(8))
    save(1)  # other weights under the same name
    with pytest.raises(RecordingError, match="other weights") as refused:
        record(RecordOptions(), out, resume=True, device="cpu")
    assert "\n" not in str(refused.value)
    save(0)  # the weights it was recording: the resume goes on
    assert record(RecordOptions(), out, resume=True, device="cpu").complete


def test_a_run_from_before_the_fingerprint_still_resumes(tmp_path):
    import json

    out = tmp_path / "run.h5"
    with pytest.raises(Crash):
        record(options(), out, device="cpu", progress=crash_after(8))
    meta_file = partial_dir(out) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["attrs"]["weights_sha256"]
    meta_file.write_text(json.dumps(meta))
    assert record(RecordOptions(), out, resume=True, device="cpu").complete


def test_an_existing_output_beside_an_empty_partial_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """A run killed before its first batch leaves an empty RUN.h5.partial: an existing RUN.h5 is refused
    at once (before the model loads), as without that folder, and stays as it was."""
    store = importlib.import_module("resprobe.record")  # `resprobe.record` is rp.record, the function

    out = tmp_path / "run.h5"
    record(options(limit=8), out, device="cpu")
    before = out.read_bytes()
    partial_dir(out).mkdir()

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(store, "open_for_recording", must_not_load)
    with pytest.raises(RecordingError, match=r"exists: pass --overwrite.*--resume"):
        record(options(limit=8), out, device="cpu")
    assert out.read_bytes() == before
