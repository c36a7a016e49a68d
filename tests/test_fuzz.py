"""Property-based fuzzing of every loader of untrusted files (issue 6): checkpoints (zip and legacy
``torch.save``, safetensors, resprobe checkpoints built into models), HDF5 recordings and interrupted
runs' folders, arrays files (.npz, .h5), truncated, bit-flipped, overwritten or random. Whatever the
bytes, the only exception that may come out is resprobe's own (``ResprobeError``); anything else
must be a successful load. Derandomized and small, so the suite stays fast and reproducible.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from resprobe.align import align_report
from resprobe.data.preprocessing import Preprocessing
from resprobe.data.specs import open_data
from resprobe.errors import ResprobeError
from resprobe.models.loading import LoadOptions, load_model
from resprobe.models.checkpoints import extract_state_dict, read_checkpoint, save_resprobe_checkpoint
from resprobe.recording.recorder import STAT_NAMES, Recorded
from resprobe.recording.reader import open_recording, read_partial
from resprobe.recording.writer import write_hdf5

FUZZ = settings(derandomize=True, max_examples=30, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PRE = Preprocessing(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


pytestmark = pytest.mark.usefixtures("one_thread", "hdf5_in_process")


@pytest.fixture(scope="module")
def hdf5_in_process():
    """HDF5 files are read here without the child process that first reads them for crashes (one
    Python start per example would make this module minutes long); the property is about the
    exceptions of the in-process reader. test_bad_inputs.py covers the child."""
    import resprobe.recording.hdf5_probe

    saved = resprobe.recording.hdf5_probe.crash_reason
    resprobe.recording.hdf5_probe.crash_reason = lambda path: None
    yield
    resprobe.recording.hdf5_probe.crash_reason = saved


@pytest.fixture(scope="module")
def work() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="resprobe-fuzz-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Mutations of a valid file


@st.composite
def mutations(draw, size: int):
    """A function that damages bytes: truncation, bit flips, an overwritten run, or random bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "random"]))
    if kind == "truncate":
        cut = draw(st.integers(0, max(0, size - 1)))
        return f"truncate {cut}", lambda b: b[:cut]
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), min_size=1, max_size=8))

        def flip(b: bytes) -> bytes:
            out = bytearray(b)
            for position, bit in flips:
                out[position] ^= 1 << bit
            return bytes(out)

        return f"flip {flips}", flip
    if kind == "overwrite":
        start = draw(st.integers(0, size - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        return f"overwrite {start} {junk!r}", lambda b: b[:start] + junk + b[start + len(junk):]
    junk = draw(st.binary(min_size=0, max_size=512))
    return f"random {junk!r}", lambda b: junk


def damaged_copy(source: Path, target: Path, mutate) -> Path:
    target.write_bytes(mutate(source.read_bytes()))
    return target


def only_resprobe_errors(action, what: str):
    """Run ``action``: a result, or a ResprobeError (returns None); anything else fails the test."""
    try:
        return action()
    except ResprobeError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip() or "Caught" in message, (what, message)
        return None
    except Exception as exc:  # noqa: BLE001 - the property under test
        pytest.fail(f"{what}: {type(exc).__name__} escaped: {exc}")


# --------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def checkpoints(work) -> dict[str, Path]:
    from safetensors.torch import save_file

    loaded = load_model("tinymodels:custom_net", LoadOptions(num_classes=3))
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    files = {
        "resprobe": save_resprobe_checkpoint(work / "resprobe.pt", loaded),
        "state_dict": work / "state_dict.pt",
        "legacy": work / "legacy.pt",
        "safetensors": work / "weights.safetensors",
    }
    torch.save(state, files["state_dict"])
    torch.save({"state_dict": state, "epoch": 1}, files["legacy"], _use_new_zipfile_serialization=False)
    save_file(state, str(files["safetensors"]))
    return files


@pytest.mark.parametrize("form", ["resprobe", "state_dict", "legacy", "safetensors"])
def test_damaged_checkpoints(checkpoints, work, form):
    source = checkpoints[form]

    @FUZZ
    @given(mutation=mutations(source.stat().st_size))
    def check(mutation):
        what, mutate = mutation
        path = damaged_copy(source, work / f"damaged{''.join(source.suffixes)}", mutate)
        obj = only_resprobe_errors(lambda: read_checkpoint(path), f"read_checkpoint {form} {what}")
        if obj is not None:
            only_resprobe_errors(lambda: extract_state_dict(obj, source=str(path)), f"extract {form} {what}")
        if form == "resprobe":  # all the way to a model, as MODEL
            only_resprobe_errors(lambda: load_model(str(path)), f"load_model {what}")
        else:
            only_resprobe_errors(lambda: load_model("tinymodels:custom_net", LoadOptions(checkpoint=str(path))),
                                 f"--checkpoint {form} {what}")

    check()


@FUZZ
@given(content=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from([".pt", ".pth", ".safetensors", ".bin"]))
def test_random_checkpoints(work, content, suffix):
    path = work / f"random{suffix}"
    path.write_bytes(content)
    only_resprobe_errors(lambda: read_checkpoint(path), f"random {suffix} {content[:32]!r}")
    only_resprobe_errors(lambda: read_checkpoint(path, trust_checkpoint=False), "again")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(field=st.sampled_from(["arch", "state_dict", "recipes", "format_version", "preprocessing"]), value=json_values)
def test_resprobe_checkpoints_with_odd_fields(checkpoints, work, field, value):
    """Valid pickles with damaged metadata: weights_only lets them through, the loader must not trip."""
    obj = torch.load(checkpoints["resprobe"], weights_only=True)
    obj[field] = value
    path = work / "odd.pt"
    torch.save(obj, path)
    only_resprobe_errors(lambda: load_model(str(path)), f"{field}={value!r}")


# --------------------------------------------------------------------------------------------------
# Recordings


@pytest.fixture(scope="module")
def recording(work) -> Path:
    rng = np.random.default_rng(0)
    n, names = 12, ["layer1.0", "layer1.1", "layer2.0"]
    blocks = [{"name": name, "stage": int(name[5]) - 1, "index": int(name[-1]),
               "kind": "transition" if name == "layer2.0" else "identity", "in_shape": [4, 4, 4],
               "out_shape": [8, 2, 2] if name == "layer2.0" else [4, 4, 4]} for name in names]
    recorded = Recorded(block_names=names, blocks=blocks, index=np.arange(n), label=rng.integers(0, 3, n),
                        pred=rng.integers(0, 3, n), loss=rng.random(n, dtype=np.float32),
                        stats={s: rng.standard_normal((n, 3)).astype(np.float32) for s in STAT_NAMES},
                        attrs={"model": "m", "data": "d", "options": {"batch_size": 4}, "preprocessing": {},
                               "created": "2026-01-01T00:00:00+00:00", "n_planned": n},
                        n_planned=n, readout={"layer2.0": rng.random((n, 3), dtype=np.float32)})
    path = work / "valid.h5"
    write_hdf5(path, recorded, complete=True)
    assert open_recording(path).complete
    return path


@FUZZ
@given(data=st.data())
def test_damaged_recordings(recording, work, data):
    what, mutate = data.draw(mutations(recording.stat().st_size))
    path = damaged_copy(recording, work / "damaged.h5", mutate)
    loaded = only_resprobe_errors(lambda: open_recording(path, load_tensors=True), f"open_recording {what}")
    if loaded is not None:
        only_resprobe_errors(lambda: align_report(loaded), f"align_report {what}")


@FUZZ
@given(meta=json_values, batch=st.binary(max_size=300))
def test_damaged_partial_folders(work, meta, batch):
    folder = work / "fuzz.h5.partial"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "batch-000000.npz").write_bytes(batch)
    loaded = only_resprobe_errors(lambda: read_partial(folder), f"meta {meta!r}")
    if loaded is not None:
        only_resprobe_errors(lambda: align_report(loaded), f"align_report meta {meta!r}")


# --------------------------------------------------------------------------------------------------
# Arrays files


@pytest.fixture(scope="module")
def arrays(work) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 2, 1])
    np.savez(work / "valid.npz", images=images, labels=labels)
    with h5py.File(work / "valid.h5", "w") as f:
        f["images"], f["labels"] = images, labels
    return {"npz": work / "valid.npz", "h5": work / "valid.h5"}


def open_arrays(path: Path, what: str) -> None:
    source = only_resprobe_errors(lambda: open_data(str(path), PRE, 3), what)
    if source is not None:  # a successful load gives usable samples
        image, label, index = source.dataset[0]
        assert image.shape[0] == 3 and image.dtype == torch.float32 and isinstance(label, int) and label >= 0


@pytest.mark.parametrize("form", ["npz", "h5"])
def test_damaged_arrays_files(arrays, work, form):
    source = arrays[form]

    @FUZZ
    @given(mutation=mutations(source.stat().st_size))
    def check(mutation):
        what, mutate = mutation
        open_arrays(damaged_copy(source, work / f"damaged.{form}", mutate), f"{form} {what}")

    check()


dtypes = st.sampled_from([np.uint8, np.int16, np.float16, np.float32, np.float64, np.bool_, np.int64, np.complex64])


@FUZZ
@given(images=hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=5, max_side=4)),
       labels=hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=2, max_side=5)),
       form=st.sampled_from(["npz", "h5"]))
def test_arrays_of_any_shape_and_type(work, images, labels, form):
    path = work / f"shaped.{form}"
    if form == "npz":
        np.savez(path, images=images, labels=labels)
    else:
        with h5py.File(path, "w") as f:
            f["images"], f["labels"] = images, labels
    open_arrays(path, f"{form} images {images.dtype}{list(images.shape)} labels {labels.dtype}{list(labels.shape)}")
