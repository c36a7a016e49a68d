"""The device data path (resprobe.data.decode), run on CPU tensors: the transform is device-agnostic and
torchvision's decode_jpeg takes device="cpu" as well as "cuda". No GPU is needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODEL, invoke
from PIL import Image

from resprobe.data.preprocessing import ImageTransform, Preprocessing
from resprobe.data.loaders import limit_source, make_loader
from resprobe.data.specs import open_data
from resprobe.data.decode import (
    DeviceTransform,
    EncodedFiles,
    decode_on_device,
    device_loader,
    file_samples,
    jpeg_components,
)
from resprobe.errors import BadValue

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients plus noise: JPEG-compressible, and resizing has something to interpolate."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def pil_pixels(path: Path) -> torch.Tensor:
    """What the CPU path reads (PIL, converted to RGB), computed here without resprobe."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def make_files(root: Path) -> dict[str, Path]:
    """One file of every kind the device decoder takes or refuses, in two class folders."""
    files = {
        "rgb_resize": ("a", "rgb_resize.jpg", smooth_image(48, 60, 0), "RGB", {"quality": 90}),
        "rgb_exact": ("a", "rgb_exact.jpg", smooth_image(32, 32, 1), "RGB", {"quality": 90}),
        "progressive": ("a", "progressive.jpg", smooth_image(40, 36, 2), "RGB", {"progressive": True}),
        "gray": ("b", "gray.jpg", smooth_image(36, 36, 3)[..., 0], "L", {}),
        "cmyk": ("b", "cmyk.jpg", smooth_image(32, 40, 4), "CMYK", {}),
        "png": ("b", "png.png", smooth_image(32, 32, 5), "RGBA", {}),
    }
    paths = {}
    for key, (cls, name, pixels, mode, options) in files.items():
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels)
        if mode == "CMYK":
            image = image.convert("CMYK")
        elif mode == "RGBA":
            image = image.convert("RGBA")
        image.save(path, **options)
        paths[key] = path
    return paths


def test_jpeg_components_reads_the_frame_header(tmp_path):
    paths = make_files(tmp_path)
    assert jpeg_components(paths["rgb_resize"].read_bytes()) == 3
    assert jpeg_components(paths["progressive"].read_bytes()) == 3
    assert jpeg_components(paths["gray"].read_bytes()) == 1
    assert jpeg_components(paths["cmyk"].read_bytes()) == 4
    assert jpeg_components(paths["png"].read_bytes()) is None
    assert jpeg_components(b"\xff\xd8\xff") is None
    assert jpeg_components(paths["rgb_resize"].read_bytes()[:20]) is None  # truncated before the frame header


def test_files_the_device_cannot_decode_are_decoded_as_the_cpu_path_decodes_them(tmp_path):
    paths = make_files(tmp_path)
    samples = [(str(p), i) for i, p in enumerate(paths.values())]
    items = EncodedFiles(samples, range(len(samples)))
    for (key, path), i in zip(paths.items(), range(len(samples))):
        payload, encoded, label, index = items[i]
        assert (label, index) == (i, i)
        if key in ("rgb_resize", "rgb_exact", "progressive"):
            assert encoded and payload.numpy().tobytes() == path.read_bytes()
        else:
            assert not encoded and torch.equal(payload, pil_pixels(path)), key


def test_device_decoding_gives_the_cpu_paths_pixels(tmp_path):
    paths = make_files(tmp_path)
    samples = [(str(p), 0) for p in paths.values()]
    items = EncodedFiles(samples, range(len(samples)))
    batch = [items[i] for i in range(len(items))]
    images = decode_on_device([b[0] for b in batch], [b[1] for b in batch], CPU)
    for image, path in zip(images, paths.values()):
        assert torch.equal(image, pil_pixels(path)), path.name  # libjpeg-turbo both ways on the CPU


def test_a_jpeg_the_device_decoder_refuses_falls_back_to_the_cpu(tmp_path, monkeypatch):
    import torchvision.io

    paths = make_files(tmp_path)
    real = torchvision.io.decode_jpeg
    refused = paths["progressive"].read_bytes()

    def picky(data, mode=None, device="cpu"):
        if isinstance(data, list) or data.numpy().tobytes() == refused:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    keys = ["rgb_resize", "progressive", "png"]
    items = EncodedFiles([(str(paths[k]), 0) for k in keys], range(3))
    batch = [items[i] for i in range(3)]
    images = decode_on_device([b[0] for b in batch], [b[1] for b in batch], CPU)
    for image, key in zip(images, keys):
        assert torch.equal(image, pil_pixels(paths[key])), key


@pytest.mark.parametrize("resize,interpolation", [("timm", "bilinear"), ("timm", "bicubic"),
                                                  ("torchvision", "bilinear")])
def test_device_transform_matches_the_cpu_transform(resize, interpolation):
    pre = Preprocessing(input_size=(3, 32, 32), interpolation=interpolation, resize=resize, crop_pct=0.9,
                        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    transform = DeviceTransform.for_preprocessing(pre)
    cpu = ImageTransform(pre)
    exact = smooth_image(32, 32, 0)  # already of the input size: only scaled and normalized, bit for bit
    assert torch.equal(transform([torch.from_numpy(exact).permute(2, 0, 1)])[0], cpu(Image.fromarray(exact)))
    for h, w in ((48, 60), (70, 41), (20, 24)):  # resized (down and up) and cropped
        pixels = smooth_image(h, w, h)
        ours = transform([torch.from_numpy(pixels).permute(2, 0, 1)])[0]
        theirs = cpu(Image.fromarray(pixels))
        assert ours.shape == theirs.shape == (3, 32, 32)
        # in 8-bit levels: tensor resize rounds differently from PIL's by at most one level
        levels = (ours - theirs).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255
        assert levels.max() <= 1.0 + 1e-4, levels.max()


def test_no_device_transform_where_tensors_cannot_follow_the_cpu_path():
    assert DeviceTransform.for_preprocessing(Preprocessing(interpolation="lanczos")) is None
    assert DeviceTransform.for_preprocessing(Preprocessing(crop_mode="squash", resize="timm")) is None
    assert DeviceTransform.for_preprocessing(Preprocessing(input_size=(3, 224, 192), resize="timm")) is None
    tv = DeviceTransform.for_preprocessing(Preprocessing(input_size=(3, 224, 192), resize_size=256))
    assert tv is not None and tv.resize_size == 256


def test_device_loader_yields_the_cpu_loaders_batches(tmp_path):
    make_files(tmp_path / "images")
    pre = Preprocessing(input_size=(3, 32, 32))
    source = limit_source(open_data(str(tmp_path / "images"), pre, 2), 5, seed=3)
    fast = device_loader(source, pre, CPU, batch_size=2, workers=0, decode="device")
    assert fast is not None
    reference = list(make_loader(source, batch_size=2, workers=0))
    ours = list(fast)
    assert len(ours) == len(reference) == len(fast)
    paths = [p for p, _ in file_samples(source)[0]]
    for (img_a, lab_a, idx_a), (img_b, lab_b, idx_b) in zip(ours, reference):
        assert torch.equal(lab_a, lab_b) and torch.equal(idx_a, idx_b)
        for image_a, image_b, index in zip(img_a, img_b, idx_b.tolist()):
            with Image.open(paths[index]) as im:
                same_size = im.size == (32, 32)
            if same_size:
                assert torch.equal(image_a, image_b), paths[index]
            else:
                levels = (image_a - image_b).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255
                assert levels.max() <= 1.0 + 1e-4, paths[index]


def test_device_loader_follows_nested_subsets(tmp_path):
    from dataclasses import replace

    from torch.utils.data import Subset

    make_files(tmp_path / "images")
    pre = Preprocessing(input_size=(3, 32, 32))
    source = limit_source(open_data(str(tmp_path / "images"), pre, 2), 4, seed=1)
    resumed = replace(source, dataset=Subset(source.dataset, range(2, 4)))  # as record --resume builds it
    expected = [int(i) for _, _, i in (resumed.dataset[k] for k in range(2))]
    samples, indices = file_samples(resumed)
    assert indices == expected


def test_where_the_cpu_path_is_kept(tmp_path, arrays_file):
    make_files(tmp_path / "images")
    pre = Preprocessing(input_size=(3, 32, 32))
    folder = open_data(str(tmp_path / "images"), pre, 2)
    assert device_loader(folder, pre, CPU) is None  # auto: only on CUDA
    assert device_loader(folder, pre, CPU, decode="cpu") is None
    assert device_loader(open_data(str(arrays_file()), pre, 5), pre, CPU, decode="device") is None
    with pytest.raises(BadValue, match="--decode"):
        device_loader(folder, pre, CPU, decode="gpu")


def test_eval_decode_device_equals_decode_cpu_for_images_of_the_input_size(tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            path = tmp_path / "images" / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(smooth_image(32, 32, i + 10 * len(cls))).save(path, quality=85)
    common = ["--data", tmp_path / "images", "--device", "cpu", "--workers", "0", "-f", "json"]
    cpu = json.loads(invoke("eval", MODEL, *common, "--decode", "cpu").stdout)
    device = json.loads(invoke("eval", MODEL, *common, "--decode", "device").stdout)
    assert cpu == device
    result = invoke("eval", MODEL, *common, "--decode", "gpu", code=1)
    assert result.stderr.startswith("error: --decode 'gpu'") and result.stderr.count("\n") == 1




def test_progress_bars_show_the_rate_and_an_eta():
    from rich.progress import Progress, TimeRemainingColumn

    from resprobe.cli import RateColumn, make_progress

    assert any(isinstance(c, RateColumn) for c in make_progress(False).columns)
    assert any(isinstance(c, TimeRemainingColumn) for c in make_progress(False).columns)
    progress = Progress()
    images, steps = progress.add_task("eval", total=100), progress.add_task("train", total=10, unit="step")
    for task in (images, steps):
        progress.tasks[task].start_time = 0.0
    progress.tasks[images]._progress.extend([_sample(0.0, 0), _sample(2.0, 50)])
    progress.tasks[steps]._progress.extend([_sample(0.0, 0), _sample(4.0, 2)])
    assert str(RateColumn().render(progress.tasks[images])) == "25.0 img/s"  # 50 images in 2 s
    assert str(RateColumn().render(progress.tasks[steps])) == "0.5 step/s"


def _sample(timestamp: float, completed: float):
    from rich.progress import ProgressSample

    return ProgressSample(timestamp, completed)
