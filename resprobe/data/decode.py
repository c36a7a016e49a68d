"""Images decoded and resized on the device, so that the CPU does not starve a GPU (docs/gpu.md).

On CUDA, loader workers only read files: JPEG bytes go to the GPU in batches and are decoded there
(``torchvision.io.decode_jpeg(device=...)``), then resized, center-cropped and normalized on the
device. Files the GPU decoder cannot take — not a JPEG (PNG, ...), or a JPEG with other than three
colour components (grayscale, CMYK) — are decoded on the CPU exactly as the CPU path decodes them
(PIL, converted to RGB), and a JPEG the device decoder still refuses falls back the same way.

The transform is device-agnostic (CPU tensors in tests): images already of the input size are only
scaled and normalized with the CPU path's arithmetic (bit-identical); others are resized with
torchvision's tensor resize (antialiased), which is close to, not identical with, PIL's resize, and
nvJPEG's IDCT can differ from libjpeg's by a level. Use ``decode="cpu"`` for the CPU path's pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from resprobe.data.datasets import DataSource
from resprobe.data.loaders import loader_workers
from resprobe.data.preprocessing import Preprocessing, resize_side
from resprobe.errors import BadValue, DataError

DECODE_MODES = ("auto", "cpu", "device")
_TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_components(data: bytes | memoryview) -> int | None:
    """The number of colour components a JPEG's frame header declares, or None for anything that is
    not a JPEG (or a damaged one): 3 for YCbCr/RGB, 1 for grayscale, 4 for CMYK/YCCK."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # standalone markers carry no length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            return data[pos + 9] if pos + 9 < len(data) else None
        if marker == 0xDA or length < 2:  # start of scan before any frame header: damaged
            return None
        pos += 2 + length
    return None


def pil_rgb(data: bytes) -> Tensor:
    """CHW uint8 RGB pixels as the CPU path reads a file (torchvision's ``pil_loader``: PIL, RGB)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class EncodedFiles(Dataset):
    """Items ``(payload, encoded, label, index)``: a JPEG's bytes for the device decoder
    (``encoded``), or the pixels decoded here when the device decoder cannot read the file."""

    def __init__(self, samples: Sequence[tuple[str, int]], indices: Sequence[int]):
        self.samples = samples
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, bool, int, int]:
        index = self.indices[i]
        path, label = self.samples[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            if jpeg_components(data) == 3:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, int(label), index
            return pil_rgb(data), False, int(label), index
        except Exception as exc:  # noqa: BLE001 - OSError, PIL's errors for corrupt files
            from resprobe.data.datasets import _image_error

            raise DataError(f"cannot read image {path}: {_image_error(exc)}; remove or replace the file") from None


def _collate(batch: Sequence[tuple[Tensor, bool, int, int]]) -> tuple[list[Tensor], list[bool], Tensor, Tensor]:
    return ([b[0] for b in batch], [b[1] for b in batch], torch.tensor([b[2] for b in batch], dtype=torch.long),
            torch.tensor([b[3] for b in batch], dtype=torch.long))


@dataclass(frozen=True)
class DeviceTransform:
    """The CPU path's evaluation transform on uint8 CHW tensors, wherever they are: resize the shorter
    side to ``resize_size``, center-crop to the input size, scale to [0, 1], normalize."""

    size: tuple[int, int]  # (H, W)
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_preprocessing(cls, pre: Preprocessing) -> DeviceTransform | None:
        """The same transform as ``data.ImageTransform``, or None where tensors cannot do it exactly
        so (timm's non-square keep-ratio resize, other crop modes, PIL-only filters)."""
        _, h, w = pre.input_size
        if pre.crop_mode != "center" or pre.interpolation not in _TENSOR_INTERPOLATIONS:
            return None
        if pre.resize == "timm":
            if h != w:
                return None
            size = math.floor(h / pre.crop_pct)
        else:
            size = resize_side(pre)
        return cls((h, w), size, pre.interpolation, tuple(pre.mean), tuple(pre.std))

    def resize_crop(self, image: Tensor) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        if tuple(image.shape[-2:]) == self.size:  # already of the input size: never resized
            return image
        image = F.resize(image, [self.resize_size], interpolation=InterpolationMode(self.interpolation),
                         antialias=True)
        return F.center_crop(image, list(self.size))

    def __call__(self, images: Sequence[Tensor]) -> Tensor:
        batch = torch.stack([self.resize_crop(image) for image in images])
        # ToTensor's and Normalize's arithmetic, in the same order: x / 255, then (x - mean) / std
        batch = batch.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std)


def decode_on_device(payloads: Sequence[Tensor], encoded: Sequence[bool], device: torch.device) -> list[Tensor]:
    """uint8 CHW RGB images on ``device``: JPEG bytes decoded there in one batch, the rest moved there.

    A batch the device decoder refuses is decoded one image at a time, and an image it still
    refuses is decoded on the CPU as the CPU path would (PIL), so one odd file never stops a run.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list[Tensor | None] = [None if enc else p.to(device, non_blocking=True) for p, enc in zip(payloads, encoded)]
    todo = [i for i, enc in enumerate(encoded) if enc]
    if todo:
        try:
            decoded = decode_jpeg([payloads[i] for i in todo], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(todo, decoded):
                images[i] = image
        except RuntimeError:
            for i in todo:
                images[i] = decode_one(payloads[i], device)
    return [image for image in images if image is not None]


def decode_one(payload: Tensor, device: torch.device) -> Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(payload, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return pil_rgb(payload.numpy().tobytes()).to(device)


class DeviceDecodedLoader:
    """Batches ``(images, labels, indices)`` like ``data.make_loader``'s, decoded and transformed on
    ``device``; worker processes only read files (and decode the few the device cannot)."""

    def __init__(self, loader: DataLoader, transform: DeviceTransform, device: torch.device):
        self.loader, self.transform, self.device = loader, transform, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        from resprobe.distributed import diverge

        diverge()  # this rank's own batches from here on (an error may be this rank's alone)
        for payloads, encoded, labels, index in self.loader:
            images = decode_on_device(payloads, encoded, self.device)
            yield self.transform(images), labels, index


def file_samples(source: DataSource) -> tuple[list[tuple[str, int]], list[int]] | None:
    """``(samples, indices)``: the files of an image-file source and which of them (after ``--limit``
    and resuming) the loader visits, or None for data that is not image files on disk."""
    samples = source.samples
    if samples is None:
        return None
    dataset: Any = source.dataset
    chain: list[Sequence[int]] = []
    while isinstance(dataset, Subset):
        chain.append(dataset.indices)
        dataset = dataset.dataset
    indices: Sequence[int] = range(len(samples))
    for level in reversed(chain):  # the innermost Subset picks from the base first
        indices = [indices[i] for i in level]
    return list(samples), list(indices)


def device_loader(source: DataSource, pre: Preprocessing, device: torch.device, batch_size: int = 64,
                  workers: int | None = None, decode: str = "auto") -> DeviceDecodedLoader | None:
    """The device-decoding loader for ``source``, or None where the CPU path is used: ``decode="cpu"``,
    ``"auto"`` off CUDA, data that is not image files, or a preprocessing tensors cannot reproduce."""
    if decode not in DECODE_MODES:
        raise BadValue(f"--decode {decode!r}: choose one of {', '.join(DECODE_MODES)}")
    if decode == "cpu" or (decode == "auto" and device.type != "cuda"):
        return None
    files = file_samples(source)
    transform = DeviceTransform.for_preprocessing(pre)
    if files is None or transform is None:
        return None
    workers = loader_workers(source, batch_size, workers)
    samples, indices = files
    loader = DataLoader(EncodedFiles(samples, indices), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, prefetch_factor=4 if workers > 0 else None)
    return DeviceDecodedLoader(loader, transform, device)
