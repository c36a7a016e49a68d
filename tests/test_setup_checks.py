"""Setups that used to give silently wrong numbers (issue #13 §3): each is now a warning or a one-line
error, and checkpoints record the preprocessing that was really used."""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR10, requires_cifar
from resprobe.data.datasets import DataSource, TensorImages
from resprobe.data.preprocessing import Preprocessing, override_preprocessing
from resprobe.errors import BadValue, DataError
from resprobe.models.loading import LoadOptions, load_model
from resprobe.models.checkpoints import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE_MODEL = str(Path(__file__).resolve().parent.parent / "fixtures" / "tiny_resnet.pt")
FIXTURE_DATA = str(Path(__file__).resolve().parent.parent / "fixtures" / "shapes_test.npz")
TINY = "tinymodels:timm_basic"  # 5 classes, timm's resnet18 config: default input size 224


def one_error_line(result, *expected: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def lossless_pair(tmp_path: Path, n: int = 10, size: int = 32, classes: int = 5) -> tuple[Path, Path]:
    """The same images twice: a uint8 arrays file and a PNG folder (lossless) with labels i % classes."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    arrays = tmp_path / "same.npz"
    np.savez(arrays, images=images, labels=labels)
    folder = tmp_path / "same_png"
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"c{label}" / f"{i:03d}.png")
    return arrays, folder


def png_folder(root: Path, size: int, classes: tuple[str, ...] = ("a", "b"), per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def as_json(result) -> dict:
    return json.loads(result.stdout)


# --------------------------------------------------------------------------------------------------
# 1. Upscaling


def test_upscaled_images_warn_naming_input_size(run, tmp_path):
    folder = png_folder(tmp_path / "small", 16)
    result = run("eval", TINY, "--data", folder, "--device", "cpu", "-f", "json")
    upscale = [w for w in warnings_of(result) if "upscaled" in w]
    assert len(upscale) == 1 and "--input-size 16" in upscale[0] and "16×16" in upscale[0], result.stderr
    assert "14.7×" in upscale[0]  # timm's resnet18 (crop_pct 0.95): resized to ⌊224 / 0.95⌋ = 235 = 14.7 × 16
    chosen = run("eval", TINY, "--data", folder, "--input-size", "16", "--device", "cpu", "-f", "json")
    assert not any("upscaled" in w for w in warnings_of(chosen)), chosen.stderr


def test_options_contradicting_the_checkpoints_preprocessing_warn_and_are_used(run, tmp_path):
    # The fixture records 32×32 inputs, mean 0.5, std 0.25, crop_pct 1, bilinear.
    folder = png_folder(tmp_path / "pngs", 32, classes=("a", "b", "c", "d"))
    args = ["eval", FIXTURE_MODEL, "--data", folder, "--device", "cpu", "-f", "json"]
    recorded = run(*args)
    bigger = run(*args, "--input-size", "64")
    said = [w for w in warnings_of(bigger) if "was made with" in w]
    assert said == [f"warning: {FIXTURE_MODEL} was made with 32×32 inputs; --input-size 64 overrides that (the figures "
                    "may differ from the model's own: leave it out to use what the checkpoint records)"], bigger.stderr
    assert not any("was made with" in w for w in warnings_of(recorded))
    assert as_json(bigger)["preprocessing"]["input_size"] == [3, 64, 64]  # the user may mean it: used
    assert as_json(bigger)["loss"] != as_json(recorded)["loss"]
    several = run(*args, "--mean", "0.5", "--std", "0.2,0.25,0.25", "--crop-pct", "0.9", "--interpolation", "bicubic")
    said = [w for w in warnings_of(several) if "was made with" in w]
    assert len(said) == 1 and "std 0.25,0.25,0.25, crop_pct 1 and bilinear interpolation;" in said[0], said
    assert "--std 0.2,0.25,0.25, --crop-pct 0.9 and --interpolation bicubic override those" in said[0]
    assert "--mean" not in said[0]  # 0.5 is what the checkpoint records
    same = run(*args, "--input-size", "32x32", "--mean", "0.5,0.50001,0.5", "--std", "0.25", "--crop-pct", "1",
               "--interpolation", "bilinear")
    assert not any("was made with" in w for w in warnings_of(same)), same.stderr
    assert as_json(same)["loss"] == pytest.approx(as_json(recorded)["loss"], rel=1e-4)  # mean off by 1e-5


def test_options_contradicting_the_checkpoint_warn_in_the_library():
    from resprobe.probe import open_probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = open_probe(FIXTURE_MODEL, mean="0.4914,0.4822,0.4465", device="cpu")
    said = [str(w.message) for w in caught if "was made with" in str(w.message)]
    assert said == [f"{FIXTURE_MODEL} was made with mean 0.5,0.5,0.5; --mean 0.4914,0.4822,0.4465 overrides that (the "
                    "figures may differ from the model's own: leave it out to use what the checkpoint records)"]
    assert probe.preprocessing.mean == (0.4914, 0.4822, 0.4465)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_probe("tinymodels:timm_basic", input_size="32", device="cpu")  # nothing recorded: nothing to contradict
    assert not any("was made with" in str(w.message) for w in caught)


def test_upscale_threshold_is_the_resize_actually_done():
    from resprobe.data.preprocessing import upscale_warning

    pre = Preprocessing((3, 224, 224), crop_pct=0.875, resize="torchvision")  # resized to 256, cropped to 224

    def source(h: int, w: int) -> DataSource:
        return DataSource("folder", TensorImages(torch.zeros(1, 3, 1, 1), torch.zeros(1)), image_size=(h, w))

    assert upscale_warning(source(128, 128), pre) is None  # 256 / 128 = 2.0: not more than 2×
    assert "2.1×" in upscale_warning(source(120, 300), pre)  # the shorter side decides: 256 / 120
    assert upscale_warning(source(224, 224), pre) is None  # already the input size: only normalized
    assert upscale_warning(source(32, 32), replace_size(pre, 32)) is None
    arrays = DataSource("a.npz", TensorImages(torch.zeros(1, 3, 112, 112), torch.zeros(1)), in_memory=True)
    assert upscale_warning(arrays, pre) is None  # 224 / 112 = 2.0: arrays are judged on their own size, not 256
    arrays = DataSource("a.npz", TensorImages(torch.zeros(1, 3, 100, 300), torch.zeros(1)), in_memory=True)
    assert "2.2× larger" in upscale_warning(arrays, pre)


def test_arrays_far_smaller_than_the_input_size_warn_naming_input_size(run, arrays_file):
    """Arrays are never resized: a 224-px model on 32×32 arrays runs on 32×32 inputs, said as for folders."""
    data = arrays_file(n=4, size=32)
    result = run("eval", TINY, "--data", data, "--device", "cpu", "-f", "json")
    size = [w for w in warnings_of(result) if "never resized" in w]
    assert size == [f"warning: the arrays of {data} are 32×32 but the model's input size is 224×224 (7.0× larger): "
                    "arrays are never resized, so the model runs on 32×32 inputs; if it was trained on 32×32 images, "
                    "pass --input-size 32, else resize the arrays to 224×224"], result.stderr
    chosen = run("eval", TINY, "--data", data, "--input-size", "32", "--device", "cpu", "-f", "json")
    assert not any("never resized" in w for w in warnings_of(chosen)), chosen.stderr
    bigger = run("eval", FIXTURE_MODEL, "--data", arrays_file(n=4, size=48, classes=4, name="big.npz"), "--device", "cpu")
    assert not any("never resized" in w for w in warnings_of(bigger)), bigger.stderr  # 48 for a 32 model: a note
    notes = [line for line in bigger.stderr.splitlines() if line.startswith("preprocessing")]
    assert notes and "48×48 arrays" in notes[0] and "the model's input size is 32×32" in notes[0], bigger.stderr


def replace_size(pre: Preprocessing, n: int) -> Preprocessing:
    return override_preprocessing(pre, input_size=str(n))


@requires_cifar
def test_cifar_jpeg_folder_with_an_imagenet_sized_model_warns(run):
    result = run("eval", "torchvision:resnet18", "--num-classes", "10", "--data", CIFAR10 / "test", "--limit", "4",
                 "--device", "cpu", "-f", "json")
    upscale = [w for w in warnings_of(result) if "upscaled" in w]
    assert len(upscale) == 1 and "32×32" in upscale[0] and "8.0×" in upscale[0] and "--input-size 32" in upscale[0]


# --------------------------------------------------------------------------------------------------
# 2. Checkpoints record the preprocessing used; their eval reproduces the figures


def test_pruned_and_shared_checkpoints_record_the_array_size_and_reproduce_on_images(run, tmp_path):
    arrays, folder = lossless_pair(tmp_path)
    pruned = tmp_path / "pruned.pt"
    ablation = as_json(run("ablate", TINY, "--data", arrays, "--save-pruned", pruned, "--remove-blocks", "layer1.1",
                           "--device", "cpu", "-f", "json"))
    assert ablation["preprocessing"]["input_size"] == [3, 32, 32]
    assert read_checkpoint(pruned)["preprocessing"]["input_size"] == [3, 32, 32]  # not timm's 224
    on_images = as_json(run("eval", pruned, "--data", folder, "--device", "cpu", "-f", "json"))
    assert on_images["preprocessing"]["input_size"] == [3, 32, 32]
    assert on_images["loss"] == pytest.approx(ablation["pruned"]["loss"], abs=1e-5)
    assert on_images["acc"] == ablation["pruned"]["acc"]
    blocks = as_json(run("blocks", pruned, "-f", "json"))
    assert blocks["input_size"] == [3, 32, 32] and blocks["blocks"][0]["in_shape"][-1] == 8  # 32 / 4 (stem)

    shared = tmp_path / "shared.pt"
    share = as_json(run("share", TINY, "--stages", "0", "--out", shared, "--data", arrays, "--device", "cpu",
                        "-f", "json"))
    assert read_checkpoint(shared)["preprocessing"]["input_size"] == [3, 32, 32]
    again = as_json(run("eval", shared, "--data", folder, "--device", "cpu", "-f", "json"))
    assert again["loss"] == pytest.approx(share["eval_shared"]["loss"], abs=1e-5)


def test_finetuned_checkpoint_records_the_array_size(run, tmp_path):
    arrays, folder = lossless_pair(tmp_path)
    out = tmp_path / "ft.pt"
    trained = as_json(run("finetune", TINY, "--data", arrays, "--max-steps", "1", "--batch-size", "4", "--augment",
                          "none", "--out", out, "--device", "cpu", "-f", "json"))
    assert trained["preprocessing"]["input_size"] == [3, 32, 32] and "checkpoint" in trained
    assert read_checkpoint(out)["preprocessing"]["input_size"] == [3, 32, 32]
    on_arrays = as_json(run("eval", out, "--data", arrays, "--device", "cpu", "-f", "json"))
    on_images = as_json(run("eval", out, "--data", folder, "--device", "cpu", "-f", "json"))
    assert on_images["loss"] == pytest.approx(on_arrays["loss"], abs=1e-5)


# --------------------------------------------------------------------------------------------------
# 3. Random weights


def test_random_weights_warn_on_every_command(run, tmp_path, arrays_file):
    data = arrays_file(n=8)
    for args in (["blocks", TINY], ["eval", TINY, "--data", data],
                 ["record", TINY, "--data", data, "--out", tmp_path / "r.h5"]):
        result = run(*args, "--device", "cpu", "-f", "json") if args[0] != "blocks" else run(*args, "-f", "json")
        random = [w for w in warnings_of(result) if "randomly initialized" in w]  # (tmp_path holds "random")
        assert len(random) == 1 and "--checkpoint" in random[0], (args, result.stderr)
    trained = run("eval", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--limit", "8", "--device", "cpu", "-f", "json")
    assert not any("random" in w for w in warnings_of(trained)), trained.stderr


def test_finetune_from_scratch_does_not_warn_about_an_untrained_network(run, tmp_path, arrays_file):
    """Training a randomly initialized model is what finetune is for (docs/paper.md makes ResNet-20 so):
    no "untrained network" warning, one note instead; the commands that analyse the model still warn."""
    data = arrays_file(n=8)
    result = run("finetune", TINY, "--data", data, "--out", tmp_path / "ft.pt", "--max-steps", "1", "-b", "4",
                 "--device", "cpu", "-f", "json")
    assert not [w for w in warnings_of(result) if "random" in w or "untrained" in w], result.stderr
    assert [line for line in result.stderr.splitlines() if "random" in line] == [
        f"{TINY} is randomly initialized: finetune trains it from scratch"]
    quiet = run("finetune", TINY, "--data", data, "--out", tmp_path / "ft2.pt", "--max-steps", "1", "-b", "4",
                "--device", "cpu", "-f", "json", "-q")
    assert "random" not in quiet.stderr
    ablated = run("ablate", TINY, "--data", data, "--device", "cpu", "-f", "json")
    assert [w for w in warnings_of(ablated) if "untrained network" in w], ablated.stderr


def test_random_weights_warn_in_the_library():
    from resprobe.probe import open_probe

    with pytest.warns(UserWarning, match="randomly initialized"):
        open_probe("timm:resnet18", num_classes=3, model_kwargs={"layers": [1, 1, 1, 1]}, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_probe(FIXTURE_MODEL, device="cpu")


# --------------------------------------------------------------------------------------------------
# 4, 10. Values on the 0–255 scale


@pytest.mark.parametrize("option", ["--mean", "--std"])
def test_mean_and_std_above_one_are_refused(run, option):
    value = "125.3,123.0,113.9" if option == "--mean" else "63.0,62.1,66.7"
    result = run("eval", FIXTURE_MODEL, "--data", FIXTURE_DATA, option, value, code=1)
    one_error_line(result, option, "[0, 1] scale")


def test_mean_and_std_both_on_0_255_are_named_in_one_error(run):
    result = run("eval", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--mean", "125.3,123.0,113.9", "--std",
                 "63.0,62.1,66.7", code=1)
    line = one_error_line(result, "--mean 125.3,123.0,113.9 and --std 63.0,62.1,66.7 are on the 0-255 scale")
    # 125.3/255 = 0.49137, 123/255 = 0.48235, 113.9/255 = 0.44667; 63/255 = 0.24706, 62.1/255 = 0.24353,
    # 66.7/255 = 0.26157
    assert line.endswith("divided by 255 that is --mean 0.4914,0.4824,0.4467 --std 0.2471,0.2435,0.2616")


def test_values_mixing_scales_are_said_to_and_not_divided(run):
    result = run("eval", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--std", "0.5,0.5,60", code=1)
    line = one_error_line(result, "--std 0.5,0.5,60 mixes scales (some values at most 1, some above 1)")
    assert "divided by 255" not in line and "0.0020" not in line
    both = one_error_line(run("eval", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--mean", "125.3,123.0,113.9",
                              "--std", "0.5,0.5,60", code=1), "--std 0.5,0.5,60 mixes scales")
    assert "--mean 125.3,123.0,113.9 is on the 0-255 scale" in both and "--std 0.0020" not in both


@pytest.mark.parametrize("images", ["0-255", "normalized"])
def test_float_arrays_outside_0_1_are_refused(run, tmp_path, images):
    rng = np.random.default_rng(0)
    data = rng.random((4, 3, 32, 32)).astype(np.float32)
    data = data * 255 if images == "0-255" else (data - 0.5) / 0.25
    path = tmp_path / "floats.npz"
    np.savez(path, images=data, labels=np.zeros(4, dtype=np.int64))
    one_error_line(run("eval", FIXTURE_MODEL, "--data", path, code=1), "must be in [0, 1]")


def test_float_arrays_slightly_outside_0_1_are_taken_as_they_are(tmp_path):
    """A bicubic resize overshoots [0, 1] (by 0.109 at a hard edge): accepted, values not clamped; 1.2 is not."""
    from resprobe.data.specs import open_data

    rng = np.random.default_rng(0)
    data = rng.random((4, 3, 8, 8)).astype(np.float32)
    data[0, 0, 0, :2] = [-0.109, 1.109]
    np.savez(tmp_path / "overshoot.npz", images=data, labels=np.zeros(4, dtype=np.int64))
    pre = Preprocessing((3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    source = open_data(str(tmp_path / "overshoot.npz"), pre)
    image = source.dataset[0][0]
    assert image[0, 0, :2].tolist() == pytest.approx([(-0.109 - 0.5) / 0.25, (1.109 - 0.5) / 0.25])
    data[0, 0, 0, 0] = 1.2
    np.savez(tmp_path / "beyond.npz", images=data, labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"must be in \[0, 1\].*, 1.2\]"):
        open_data(str(tmp_path / "beyond.npz"), pre)


# --------------------------------------------------------------------------------------------------
# 5. A folder of splits


def test_a_folder_of_splits_is_refused_naming_them(run, tmp_path):
    root = tmp_path / "dataset"
    for split in ("train", "validation", "test"):
        png_folder(root / split, 8, per_class=1)
    line = one_error_line(run("eval", FIXTURE_MODEL, "--data", root, code=1), "test/", "train/", "validation/")
    assert f"--data {root / 'validation'}" in line
    # a class that happens to be called "test" (images only, no class folders in it) is fine
    classes = png_folder(tmp_path / "classes", 32, classes=("test", "train"))
    run("eval", FIXTURE_MODEL, "--data", classes, "--device", "cpu", "-f", "json")


@requires_cifar
def test_the_shared_cifar10_parent_folder_is_refused(run):
    one_error_line(run("eval", FIXTURE_MODEL, "--data", CIFAR10, code=1), "test/, train/")


# --------------------------------------------------------------------------------------------------
# 6, 7. Class counts, preprocessing on stderr and in every report


def test_class_count_mismatch_warns_on_every_command_that_loads_data(run, tmp_path):
    folder = png_folder(tmp_path / "three", 32, classes=("a", "b", "c"), per_class=2)
    commands = {
        "eval": ["eval", FIXTURE_MODEL, "--data", folder],
        "align": ["align", FIXTURE_MODEL, "--data", folder],
        "ablate": ["ablate", FIXTURE_MODEL, "--data", folder],
        "share": ["share", FIXTURE_MODEL, "--data", folder, "--out", tmp_path / "s.pt"],
        "finetune": ["finetune", FIXTURE_MODEL, "--data", folder, "--max-steps", "1", "--out", tmp_path / "f.pt"],
    }
    for name, args in commands.items():
        result = run(*args, "--device", "cpu", "-f", "json")
        mismatch = [w for w in warnings_of(result) if "3 class folders but the model has" in w]
        assert len(mismatch) == 1, (name, result.stderr)


def test_arrays_with_fewer_labels_than_the_classifier_warn_on_every_command(run, tmp_path):
    path = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), labels=np.arange(6) % 3)
    for name in ("eval", "align", "ablate"):
        result = run(name, FIXTURE_MODEL, "--data", path, "--device", "cpu", "-f", "json")
        mismatch = [w for w in warnings_of(result) if "classes" in w]
        assert mismatch == [f"warning: the labels of {path} are 0 to 2 (3 classes) but the model has 4 classes; "
                            "each label is taken as the index of the model's class (give --num-classes 3 if the model "
                            "was trained on these labels)"], (name, result.stderr)
    full = run("eval", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--device", "cpu", "-f", "json")  # labels 0 to 3
    assert not any("classes" in w for w in warnings_of(full)), full.stderr
    np.savez(path, images=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), labels=np.array([0, 2, 2]))
    gaps = run("eval", FIXTURE_MODEL, "--data", path, "--device", "cpu", "-f", "json")  # a subset of a label set
    assert not any("classes" in w for w in warnings_of(gaps)), gaps.stderr


def test_preprocessing_is_printed_once_and_reported(run, tmp_path):
    arrays, folder = lossless_pair(tmp_path, n=4, classes=4)
    result = run("share", FIXTURE_MODEL, "--data", arrays, "--train-data", arrays, "--recalibrate", "4",
                 "--out", tmp_path / "s.pt", "--device", "cpu", "-f", "json")
    notes = [line for line in result.stderr.splitlines() if line.startswith("preprocessing")]
    assert len(notes) == 1 and "32×32 arrays" in notes[0] and "mean 0.5,0.5,0.5" in notes[0], result.stderr
    quiet = run("eval", FIXTURE_MODEL, "--data", folder, "--device", "cpu", "--quiet", "-f", "json")
    assert "preprocessing" not in quiet.stderr
    loud = run("eval", FIXTURE_MODEL, "--data", folder, "--device", "cpu", "-f", "json")
    assert [line for line in loud.stderr.splitlines() if line.startswith("preprocessing")] == [
        f"preprocessing of {folder}: images of 32×32 only normalized (others resized to 32 and center-cropped); "
        "mean 0.5,0.5,0.5, std 0.25,0.25,0.25"]


def test_every_report_that_loads_a_model_names_checkpoint_and_preprocessing(run, tmp_path):
    data = ["--data", FIXTURE_DATA, "--limit", "8", "--device", "cpu", "-f", "json"]
    expected = read_checkpoint(FIXTURE_MODEL)["preprocessing"]
    sha256 = hashlib.sha256(Path(FIXTURE_MODEL).read_bytes()).hexdigest()  # as `sha256sum` gives it
    reports = {
        "blocks": run("blocks", FIXTURE_MODEL, "-f", "json"),
        "eval": run("eval", FIXTURE_MODEL, *data),
        "record": run("record", FIXTURE_MODEL, *data, "--out", tmp_path / "r.h5"),
        "align": run("align", FIXTURE_MODEL, *data),
        "align RUN": run("align", tmp_path / "r.h5", "-f", "json"),
        "ablate": run("ablate", FIXTURE_MODEL, *data),
        "share": run("share", FIXTURE_MODEL, *data, "--out", tmp_path / "s.pt"),
        "finetune": run("finetune", FIXTURE_MODEL, *data, "--max-steps", "1", "--out", tmp_path / "f.pt"),
    }
    for name, result in reports.items():
        payload = as_json(result)
        assert payload["checkpoint"] == FIXTURE_MODEL, name
        assert payload["preprocessing"] == expected, name
        assert payload["checkpoint_sha256"] == sha256, name  # align too (docs/reliability.md lists it)
    csv = run("eval", FIXTURE_MODEL, *data[:-2], "-f", "csv").stdout.splitlines()
    assert csv[0].split(",")[:3] == ["model", "checkpoint", "checkpoint_sha256"] and len(csv) == 2


# --------------------------------------------------------------------------------------------------
# Class folders matched to a checkpoint's class names

NAMES = ["zebra", "apple", "mango", "kiwi"]  # the model's order on purpose: not the sorted one


def named_checkpoint(tmp_path: Path) -> Path:
    """The fixture with class names recorded (as finetune writes them)."""
    obj = torch.load(FIXTURE_MODEL, weights_only=True)
    obj["classes"] = NAMES
    path = tmp_path / "named.pt"
    torch.save(obj, path)
    return path


def hand_loss(model_path: Path, folder: Path) -> float:
    """Mean cross-entropy with labels = the position of the folder's name in NAMES, the images
    normalized by hand (32×32 PNGs: the fixture's mean 0.5, std 0.25, no resize)."""
    model = load_model(str(model_path), LoadOptions()).model.eval()
    images, labels = [], []
    for name in sorted(p.name for p in folder.iterdir()):
        for file in sorted((folder / name).iterdir()):
            pixels = torch.from_numpy(np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255)
            images.append((pixels.permute(2, 0, 1) - 0.5) / 0.25)
            labels.append(NAMES.index(name))
    with torch.no_grad():
        logits = model(torch.stack(images))
    return float(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(labels)))


def test_class_folders_follow_the_checkpoints_class_names(run, tmp_path):
    model = named_checkpoint(tmp_path)
    subset = png_folder(tmp_path / "subset", 32, classes=("mango", "zebra"), per_class=3)
    result = run("eval", model, "--data", subset, "--device", "cpu", "-f", "json")
    assert as_json(result)["loss"] == pytest.approx(hand_loss(model, subset), rel=1e-5)  # mango 2, zebra 0
    assert not any("sorted" in w for w in warnings_of(result)), result.stderr  # no sorted-order guess to warn about
    archive = tmp_path / "subset.tar"  # a tar of the same class folders: matched by name too
    with tarfile.open(archive, "w") as tar:
        for file in sorted(subset.rglob("*.png")):
            tar.add(file, arcname=str(file.relative_to(subset)))
    from_tar = run("eval", model, "--data", archive, "--device", "cpu", "-f", "json")
    assert as_json(from_tar)["loss"] == pytest.approx(as_json(result)["loss"], rel=1e-6)
    unknown = png_folder(tmp_path / "unknown", 32, classes=("apple", "pear", "plum"), per_class=1)
    bad = run("eval", model, "--data", unknown, "--device", "cpu", code=1)
    one_error_line(bad, "the class folders pear, plum are not among the model's 4 classes (zebra, apple, mango, kiwi)",
                   "--class-map")
    # --class-map still decides: here the folders by sorted order, as a model without names would get.
    class_map = tmp_path / "map.txt"
    class_map.write_text("mango\nzebra\n")
    mapped = run("eval", model, "--data", subset, "--class-map", class_map, "--device", "cpu", "-f", "json")
    plain = run("eval", FIXTURE_MODEL, "--data", subset, "--device", "cpu", "-f", "json")  # no names: sorted order
    assert as_json(mapped)["loss"] == pytest.approx(as_json(plain)["loss"], rel=1e-6)
    assert as_json(mapped)["loss"] != pytest.approx(as_json(result)["loss"], rel=1e-3)


def test_finetune_share_and_pruning_keep_the_class_names(run, tmp_path):
    folder = png_folder(tmp_path / "train", 32, classes=("kiwi", "apple", "zebra", "mango"), per_class=2)
    tuned = tmp_path / "tuned.pt"
    run("finetune", FIXTURE_MODEL, "--data", folder, "--max-steps", "1", "--batch-size", "4", "--out", tuned,
        "--device", "cpu", "-q")
    assert torch.load(tuned, weights_only=True)["classes"] == ["apple", "kiwi", "mango", "zebra"]  # as trained
    assert "classes" not in torch.load(FIXTURE_MODEL, weights_only=True)  # trained on arrays: no names
    model = named_checkpoint(tmp_path)
    data = ["--data", FIXTURE_DATA, "--limit", "8", "--device", "cpu", "-q"]
    run("share", model, *data, "--out", tmp_path / "shared.pt")
    run("ablate", model, *data, "--save-pruned", tmp_path / "pruned.pt", "--remove-blocks", "layer1.1")
    for written in ("shared.pt", "pruned.pt"):
        assert torch.load(tmp_path / written, weights_only=True)["classes"] == NAMES, written


def test_damaged_class_names_are_refused(run, tmp_path):
    obj = torch.load(FIXTURE_MODEL, weights_only=True)
    obj["classes"] = ["a", "b", "c"]  # 3 names for 4 classes
    torch.save(obj, tmp_path / "damaged.pt")
    one_error_line(run("blocks", tmp_path / "damaged.pt", code=1), "damaged resprobe checkpoint", "class names")


# --------------------------------------------------------------------------------------------------
# 8. timm train.py checkpoints carry their model kwargs


def test_timm_train_checkpoint_applies_its_model_kwargs(run, tmp_path, monkeypatch, arrays_file):
    import timm

    kwargs = {"channels": [16, 32, 64, 128], "stem_width": 16}  # a quarter-width ResNet-34
    model = timm.create_model("resnet34", num_classes=5, **kwargs)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet34", "state_dict": model.state_dict(),
                "args": argparse.Namespace(model="resnet34", model_kwargs=kwargs, lr=0.1)}, path)
    seen = []
    load = torch.load

    def checked_load(*args, **kw):
        seen.append(kw.get("weights_only"))
        return load(*args, **kw)

    monkeypatch.setattr(torch, "load", checked_load)
    loaded = load_model(str(path))
    assert seen == [True]  # argparse.Namespace is allow-listed: no arbitrary unpickling
    assert loaded.arch["kwargs"] == kwargs and loaded.num_classes == 5
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # --model-kwargs given on the command line take precedence over the checkpoint's
    assert load_model(str(path), LoadOptions(model_kwargs={"drop_rate": 0.1})).arch["kwargs"] == {**kwargs,
                                                                                                 "drop_rate": 0.1}
    result = run("eval", path, "--data", arrays_file(n=4), "--device", "cpu", "-f", "json")
    assert as_json(result)["n"] == 4


def test_train_checkpoint_model_kwargs_that_load_files_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": {"fc.weight": torch.zeros(2, 4)},
                "args": argparse.Namespace(model_kwargs={"pretrained_cfg_overlay": {"file": "/etc/passwd"}})}, path)
    with pytest.raises(Exception, match="would load other files"):
        load_model(str(path))


# --------------------------------------------------------------------------------------------------
# 9. ablate --recording must be of this run


def test_ablate_refuses_a_recording_of_another_run(run, tmp_path):
    args = [FIXTURE_MODEL, "--data", FIXTURE_DATA, "--limit", "16", "--device", "cpu"]
    same = tmp_path / "same.h5"
    run("record", *args, "--out", same, "--quiet")
    accepted = as_json(run("ablate", *args, "--recording", same, "-f", "json"))
    assert accepted["proxies"]["source"] == str(same)

    pred = tmp_path / "pred.h5"
    run("record", *args, "--target", "pred", "--out", pred, "--quiet")
    one_error_line(run("ablate", *args, "--recording", pred, code=1), "--target pred")

    one_error_line(run("ablate", *args[:3], "--limit", "12", "--device", "cpu", "--recording", same, code=1),
                   "other samples")
    one_error_line(run("ablate", *args, "--seed", "1", "--recording", same, code=1), "other samples")
    one_error_line(run("ablate", *args, "--mean", "0.4,0.4,0.4", "--recording", same, code=1), "other preprocessing")

    other_weights = tmp_path / "other.pt"
    checkpoint = torch.load(FIXTURE_MODEL, weights_only=True)
    checkpoint["state_dict"]["fc.weight"] += 0.01
    torch.save(checkpoint, other_weights)
    one_error_line(run("ablate", other_weights, *args[1:], "--recording", same, code=1), "other weights")

    relabelled = tmp_path / "relabelled.npz"
    with np.load(FIXTURE_DATA) as f:
        np.savez(relabelled, images=f["images"], labels=(f["labels"] + 1) % 4)
    one_error_line(run("ablate", FIXTURE_MODEL, "--data", relabelled, *args[3:], "--recording", same, code=1),
                   "--data")


def test_recording_check_compares_labels_in_the_library(tmp_path):
    """Same spec, same samples, other labels (the file was replaced): refused too."""
    from resprobe.ablate_proxies import check_recording_fits
    from resprobe.errors import RecordingError
    from resprobe.probe import open_probe
    from resprobe.record import RecordOptions, record_in_memory

    probe = open_probe(FIXTURE_MODEL, device="cpu")
    source = probe.data(FIXTURE_DATA, limit=8)
    recorded = record_in_memory(RecordOptions(model=FIXTURE_MODEL, data=FIXTURE_DATA, limit=8), "cpu")
    check_recording_fits(recorded, "memory", probe, source.dataset, FIXTURE_DATA)
    recorded.label = (np.asarray(recorded.label) + 1) % 4
    with pytest.raises(RecordingError, match="other labels"):
        check_recording_fits(recorded, "memory", probe, source.dataset, FIXTURE_DATA)


def test_library_errors_are_resprobe_errors():
    with pytest.raises(BadValue):
        override_preprocessing(Preprocessing(), mean="0.5,0.5,255")
    with pytest.raises(DataError):
        from resprobe.data.specs import arrays_to_tensor

        arrays_to_tensor(np.full((1, 3, 2, 2), 2.0, dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# --limit above the data set's size (trial finding 7)


def test_a_limit_above_the_data_size_is_noted_once_and_n_is_the_real_count(run):
    real = len(np.load(FIXTURE_DATA)["labels"])  # 256
    args = ("eval", FIXTURE_MODEL, "--data", FIXTURE_DATA, "--device", "cpu", "-f", "json")
    result = run(*args, "--limit", "1000")
    assert json.loads(result.stdout)["n"] == real
    note = f"{FIXTURE_DATA} holds {real} samples, fewer than the 1000 asked for: all {real} are used"
    assert [line for line in result.stderr.splitlines() if "asked for" in line] == [note]
    assert "asked for" not in run(*args, "--limit", "1000", "-q").stderr  # a note: --quiet drops it
    assert "asked for" not in run(*args, "--limit", str(real)).stderr  # exactly the data set: nothing to say


# --------------------------------------------------------------------------------------------------
# Fixed-size models (ViT, Swin): the input size comes from the model as built

VIT = "timm:vit_tiny_patch16_224"
VIT_SMALL = {"depth": 2, "embed_dim": 16, "num_heads": 2}


def test_a_fixed_size_model_at_another_input_size_says_which_model_kwargs(run):
    result = run("blocks", VIT, "--model-kwargs", json.dumps(VIT_SMALL), "--input-size", "32", code=1)
    line = one_error_line(result, "224×224", "--input-size 32", "--model-kwargs", '"img_size": 32')
    assert "AssertionError" not in line


def test_a_fixed_size_model_at_another_array_size_says_which_model_kwargs(run, arrays_file):
    result = run("eval", VIT, "--model-kwargs", json.dumps(VIT_SMALL), "--data", arrays_file(n=4, size=32),
                 "--device", "cpu", code=1)
    one_error_line(result, "224×224", "32×32", '"img_size": 32')


def test_a_model_built_for_32px_takes_32px_by_default(run, tmp_path):
    kwargs = json.dumps({**VIT_SMALL, "img_size": 32, "patch_size": 4})
    blocks = as_json(run("blocks", VIT, "--model-kwargs", kwargs, "-f", "json"))
    assert blocks["preprocessing"]["input_size"] == [3, 32, 32]
    run("share", VIT, "--model-kwargs", kwargs, "--stages", "0", "--out", tmp_path / "s.pt")


@pytest.mark.parametrize("name,kwargs,example", [
    ("regnety_002", {}, "s1.b1.conv3.bn.weight"),
    ("cspresnet50", {}, "stages.0.blocks.0.conv3.bn.weight"),
    ("convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}, "stages.0.blocks.0.gamma"),
])
def test_random_weights_warning_says_why_branches_are_zero(name, kwargs, example):
    """timm's zero_init_last (RegNetY, CSPNet) and ConvNeXt's layer scale (1e-6) make every branch output
    (nearly) zero: the warning says why every alignment is '—' and every removal cost 0."""
    from resprobe.probe import open_probe

    with pytest.warns(UserWarning, match="randomly initialized") as caught:
        probe = open_probe(f"timm:{name}", num_classes=3, model_kwargs=kwargs, device="cpu", input_size="32")
    message = next(str(w.message) for w in caught if "randomly initialized" in str(w.message))
    assert "zero-initialized" in message and example in message, message
    # independent check of the claim: the named scale really is (nearly) zero in the built model
    assert probe.model.get_parameter(example).abs().max() <= 1e-4


def test_random_weights_warning_is_silent_about_branches_that_are_not_zero():
    from resprobe.probe import open_probe

    with pytest.warns(UserWarning, match="randomly initialized") as caught:
        open_probe("torchvision:resnet18", num_classes=3, device="cpu", input_size="32")
    assert not any("zero-initialized" in str(w.message) for w in caught)
