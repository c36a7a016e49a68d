"""Data specs and the preprocessing rules of docs/reference.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR10, requires_cifar
from resprobe.data.preprocessing import Preprocessing, override_preprocessing
from resprobe.data.loaders import limit_source, make_loader, select_indices
from resprobe.data.specs import open_data
from resprobe.errors import BadValue, DataError
from resprobe.evaluate import evaluate
from resprobe.models.loading import LoadOptions, load_model
from resprobe.probe import open_probe
from resprobe.runtime import make_runtime

PRE = Preprocessing((3, 224, 224), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.875, "bilinear", "center", "timm")


def first_batch(source, n=64):
    return next(iter(make_loader(source, n)))


def test_arrays_are_never_resized(arrays_file):
    path = arrays_file(n=6, size=16)
    images, labels, index = first_batch(open_data(str(path), PRE))
    raw = np.load(path)["images"]
    assert images.shape == (6, 3, 16, 16)
    want = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255 - torch.tensor(PRE.mean).view(1, 3, 1, 1)) \
        / torch.tensor(PRE.std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, want)
    assert labels.tolist() == np.load(path)["labels"].tolist()
    assert index.tolist() == list(range(6))


def test_float_nchw_arrays_and_h5(tmp_path):
    import h5py

    images = np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["images"], f["labels"] = images, np.array([0, 1, 2, 3])
    got, labels, _ = first_batch(open_data(str(tmp_path / "a.h5"), PRE))
    torch.testing.assert_close(got[:, 0], (torch.from_numpy(images[:, 0]) - 0.5) / 0.2)


def write_folder(root, sizes, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_images_of_the_input_size_are_only_normalized(tmp_path):
    root = write_folder(tmp_path / "imgs", [(32, 32)])
    pre = override_preprocessing(PRE, input_size="32")
    images, labels, _ = first_batch(open_data(str(root), pre))
    raw = np.array(Image.open(root / "a" / "0.png").convert("RGB"))
    want = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - torch.tensor(PRE.mean).view(3, 1, 1)) \
        / torch.tensor(PRE.std).view(3, 1, 1)
    torch.testing.assert_close(images[0], want, rtol=0, atol=1e-6)
    assert labels.tolist() == [0, 1]


def test_other_images_get_the_models_transform(tmp_path):
    from timm.data import create_transform
    from torchvision import transforms as T

    root = write_folder(tmp_path / "imgs", [(50, 40)])
    image = Image.open(root / "a" / "0.png").convert("RGB")
    pre = override_preprocessing(PRE, input_size="32")
    got, _, _ = first_batch(open_data(str(root), pre))
    want = create_transform(input_size=(3, 32, 32), interpolation="bilinear", mean=PRE.mean, std=PRE.std,
                            crop_pct=0.875)(image)
    torch.testing.assert_close(got[0], want)
    tv = Preprocessing((3, 32, 32), PRE.mean, PRE.std, 0.875, "bilinear", "center", "torchvision")
    got, _, _ = first_batch(open_data(str(root), tv))
    want = T.Compose([T.Resize(36, antialias=True), T.CenterCrop(32), T.ToTensor(), T.Normalize(PRE.mean, PRE.std)])
    torch.testing.assert_close(got[0], want(image))  # ⌊32 / 0.875⌋ = 36


def test_model_presets():
    timm_model = open_probe("timm:resnet18", num_classes=10, device="cpu")
    assert timm_model.preprocessing.input_size == (3, 224, 224)
    assert timm_model.preprocessing.interpolation == "bicubic" and timm_model.preprocessing.crop_pct == 0.95
    tv = open_probe("torchvision:resnet18", num_classes=10, device="cpu", input_size="32", mean="0.5,0.5,0.5")
    assert tv.preprocessing.input_size == (3, 32, 32) and tv.preprocessing.mean == (0.5, 0.5, 0.5)
    assert tv.preprocessing.resize == "torchvision" and tv.preprocessing.crop_pct == 0.875


def test_resprobe_checkpoints_carry_their_preprocessing():
    from conftest import FIXTURES

    probe = open_probe(str(FIXTURES / "tiny_resnet.pt"), device="cpu")
    assert probe.preprocessing.input_size == (3, 32, 32) and probe.preprocessing.mean == (0.5, 0.5, 0.5)


def test_limit_selects_the_documented_samples(arrays_file):
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    assert select_indices(24, 10, seed=3) == sorted(perm[:10].tolist())
    source = limit_source(open_data(str(arrays_file()), PRE), 10, seed=3)
    _, _, index = first_batch(source)
    assert index.tolist() == sorted(perm[:10].tolist())
    with pytest.raises(BadValue):
        select_indices(24, 0)


def test_wnid_folders_map_to_imagenet_indices(tmp_path):
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    root = write_folder(tmp_path / "inet", [(8, 8)], classes=(wnids[3], wnids[500]))
    _, labels, _ = first_batch(open_data(str(root), override_preprocessing(PRE, input_size="8"), model_classes=1000))
    assert labels.tolist() == [3, 500]


def test_class_map_and_mismatch_warning(tmp_path):
    root = write_folder(tmp_path / "imgs", [(8, 8)], classes=("cat", "dog"))
    (tmp_path / "map.json").write_text(json.dumps({"dog": 0, "cat": 4}))
    pre = override_preprocessing(PRE, input_size="8")
    _, labels, _ = first_batch(open_data(str(root), pre, 5, class_map=str(tmp_path / "map.json")))
    assert labels.tolist() == [4, 0]
    source = open_data(str(root), pre, model_classes=5)
    assert any("2 class folders" in note for note in source.notes)


def test_synthetic_is_deterministic():
    pre = override_preprocessing(PRE, input_size="8")
    a, b = first_batch(open_data("synthetic:10", pre, 4)), first_batch(open_data("synthetic:10", pre, 4))
    torch.testing.assert_close(a[0], b[0])
    assert a[0].shape == (10, 3, 8, 8) and a[1].max() < 4


@pytest.mark.parametrize("spec,match", [("missing_dir", "not found"), ("cifar10:/nonexistent", "cifar-10-batches-py"),
                                         ("synthetic:x", "synthetic")])
def test_bad_specs(spec, match):
    with pytest.raises(DataError, match=match):
        open_data(spec, PRE)


def test_eval_matches_a_hand_written_loop(arrays_file):
    import tinymodels

    path = arrays_file(n=20, classes=5)
    probe = open_probe("tinymodels:timm_basic", device="cpu", input_size="32")
    result = evaluate(probe.model, probe.loader(probe.data(str(path)), 7), make_runtime("cpu"))
    raw = np.load(path)
    x = (torch.from_numpy(raw["images"]).permute(0, 3, 1, 2).float() / 255 - torch.tensor(probe.preprocessing.mean)
         .view(1, 3, 1, 1)) / torch.tensor(probe.preprocessing.std).view(1, 3, 1, 1)
    y = torch.from_numpy(raw["labels"])
    model = tinymodels.timm_basic()
    with torch.no_grad():
        logits = model(x)
    assert result.n == 20
    assert result.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert result.acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    top5 = logits.topk(5, 1).indices
    assert result.top5 == pytest.approx(float((top5 == y[:, None]).any(1).float().mean()))


@requires_cifar
def test_real_cifar10_folder():
    loaded = load_model("timm:resnet18", LoadOptions(num_classes=10))
    del loaded
    pre = override_preprocessing(PRE, input_size="32")
    source = limit_source(open_data(str(CIFAR10 / "test"), pre, model_classes=10), 40, seed=0)
    images, labels, index = first_batch(source)
    assert images.shape == (40, 3, 32, 32)
    assert source.class_names[:3] == ["airplane", "automobile", "bird"]
    assert labels.max() < 10 and len(set(index.tolist())) == 40


def _palette_folder(tmp_path, n: int = 6):
    """Class folders of 32×32 images, two of them palette PNGs with transparency in bytes: PIL warns
    when it converts those to RGB (in the loader's worker process when --workers ≥ 1)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = tmp_path / "data" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        if i < 2:
            image.convert("P").save(folder / f"{i}.png", transparency=b"\x00" * 4)
        else:
            image.save(folder / f"{i}.png")
    return tmp_path / "data"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_warning_raised_in_a_loader_worker_reaches_the_user_once(tmp_path, workers):
    """Issue 22 item 12: a worker process's warning was printed nowhere (its stderr is not the command's
    report, and under torchrun only rank 0 speaks); it is raised again in the main process, once."""
    from conftest import MODEL, invoke

    data = _palette_folder(tmp_path)
    result = invoke("eval", MODEL, "--data", data, "--workers", workers, "--batch-size", "2", "--device", "cpu")
    lines = [line for line in result.stderr.splitlines() if "Palette images with Transparency" in line]
    assert len(lines) == 1, result.stderr
