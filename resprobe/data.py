"""Data specs → datasets and loaders, and the preprocessing a model expects (docs/reference.md).

Specs: an image folder (``ImageFolder`` layout) · ``cifar10:DIR[:train|test]`` / ``cifar100:…``
(torchvision's format, never downloaded) · an arrays file ``.npz`` / ``.h5`` with ``images`` (uint8
NHWC, or float NCHW in [0, 1]) and ``labels`` · ``synthetic[:N]``.

Preprocessing rules: arrays are only scaled and normalized, never resized or cropped; images already
of the input size are only normalized; other images get the model's own evaluation transform (timm's
resolved data config, torchvision's weights transforms, or resize to ⌊size/crop_pct⌋ + center crop).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from resprobe.errors import BadValue, DataError
from resprobe.models import LoadedModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SYNTHETIC = 128
_ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")


# --------------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input. ``resize`` names whose eval transform resizes images that
    are not already ``input_size``: ``timm`` (timm's ``create_transform``) or ``torchvision``."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    crop_mode: str = "center"
    resize: str = "torchvision"
    resize_size: int | None = None  # torchvision weights' own resize size, when known

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("input_size", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def default_preprocessing(loaded: LoadedModel) -> Preprocessing:
    """The model's own preprocessing: a resprobe checkpoint's record, timm's resolved data config,
    torchvision's weights transforms, or torchvision's defaults."""
    if loaded.preprocessing:
        return Preprocessing.from_dict(loaded.preprocessing)
    weights = loaded.torchvision_weights
    if weights is not None:
        t = weights.transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0])
        return Preprocessing((3, crop, crop), tuple(t.mean), tuple(t.std), crop / resize,
                             t.interpolation.value, "center", "torchvision", resize)
    model = loaded.model
    if loaded.source in ("timm", "hf-hub") or getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        return Preprocessing(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                             float(cfg.get("crop_pct", 0.875)), str(cfg.get("interpolation", "bilinear")),
                             str(cfg.get("crop_mode", "center")), "timm")
    return Preprocessing()


def parse_input_size(text: str) -> tuple[int, int, int]:
    """``N`` or ``HxW`` → ``(3, H, W)``."""
    try:
        parts = [int(p) for p in text.lower().replace("×", "x").split("x")]
    except ValueError:
        raise BadValue(f"--input-size {text!r}: expected N or HxW, e.g. 32 or 224x192") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise BadValue(f"--input-size {text!r}: expected N or HxW with positive sizes")
    return (3, parts[0], parts[1])


def parse_triplet(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BadValue(f"{option} {text!r}: expected three comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise BadValue(f"{option} {text!r}: expected three finite comma-separated numbers")
    if option == "--std" and min(values) <= 0:
        raise BadValue(f"--std {text!r}: every value must be positive")
    return values


def check_unit_scale(given: Sequence[tuple[str, str, tuple[float, ...]]]) -> None:
    """``(option, text, values)`` of ``--mean`` and ``--std``: values are on the [0, 1] scale, as images
    are scaled to [0, 1] before they are normalized, so 0-255 statistics would be wrong. One error names
    every offending option: all values above 1 get their values divided by 255; values mixing the
    scales (some at most 1, some above) are said to, with no division suggested."""
    whole = [(option, text, values) for option, text, values in given if min(values) > 1]
    mixed = [(option, text) for option, text, values in given if min(values) <= 1 < max(values)]
    problems = []
    if whole:
        named = " and ".join(f"{option} {text}" for option, text, _ in whole)
        scaled = " ".join(f"{option} " + ",".join(f"{v / 255:.4f}" for v in values) for option, _, values in whole)
        problems.append(f"{named} {'are' if len(whole) > 1 else 'is'} on the 0-255 scale, but values are on the "
                        f"[0, 1] scale (images are scaled to [0, 1] before normalizing); divided by 255 that is "
                        f"{scaled}")
    for option, text in mixed:
        problems.append(f"{option} {text} mixes scales (some values at most 1, some above 1): give every value on "
                        "the [0, 1] scale images are normalized on")
    if problems:
        raise BadValue("; ".join(problems))


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def override_preprocessing(
    pre: Preprocessing,
    input_size: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> Preprocessing:
    """Apply the command line's ``--input-size --mean --std --crop-pct --interpolation``."""
    changes: dict[str, Any] = {}
    if input_size:
        changes["input_size"] = parse_input_size(input_size)
        changes["resize_size"] = None
    if mean:
        changes["mean"] = parse_triplet(mean, "--mean")
    if std:
        changes["std"] = parse_triplet(std, "--std")
    check_unit_scale([(f"--{key}", text, changes[key]) for key, text in (("mean", mean), ("std", std)) if text])
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise BadValue(f"--crop-pct {crop_pct}: must be in (0, 1]")
        changes["crop_pct"] = crop_pct
        changes["resize_size"] = None
    if interpolation:
        if interpolation not in _INTERPOLATIONS:
            raise BadValue(f"--interpolation {interpolation!r}: choose one of {', '.join(_INTERPOLATIONS)}")
        changes["interpolation"] = interpolation
    return replace(pre, **changes) if changes else pre


def contradicted_preprocessing(recorded: Preprocessing, used: Preprocessing, input_size: str | None = None,
                               mean: str | None = None, std: str | None = None, crop_pct: float | None = None,
                               interpolation: str | None = None) -> list[tuple[str, str]]:
    """The options given that differ from a checkpoint's recorded preprocessing, as pairs of (what the
    checkpoint records, what was given): e.g. ``("32×32 inputs", "--input-size 64")``. Statistics count
    as equal to 4 decimals, as they are usually typed."""

    def close(a: Sequence[float], b: Sequence[float]) -> bool:
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=0, abs_tol=5e-4) for x, y in zip(a, b))

    def size(shape: Sequence[int]) -> str:
        return f"{shape[1]}×{shape[2]}"

    found = []
    if input_size and tuple(used.input_size) != tuple(recorded.input_size):
        _, h, w = used.input_size
        found.append((f"{size(recorded.input_size)} inputs", f"--input-size {h if h == w else f'{h}x{w}'}"))
    if mean and not close(used.mean, recorded.mean):
        found.append((f"mean {_triple(recorded.mean)}", f"--mean {_triple(used.mean)}"))
    if std and not close(used.std, recorded.std):
        found.append((f"std {_triple(recorded.std)}", f"--std {_triple(used.std)}"))
    if crop_pct is not None and not close([used.crop_pct], [recorded.crop_pct]):
        found.append((f"crop_pct {recorded.crop_pct:g}", f"--crop-pct {used.crop_pct:g}"))
    if interpolation and used.interpolation != recorded.interpolation:
        found.append((f"{recorded.interpolation} interpolation", f"--interpolation {used.interpolation}"))
    return found


def contradiction_warning(name: str, found: list[tuple[str, str]]) -> str | None:
    """One warning for every option that contradicts checkpoint ``name``'s recorded preprocessing."""
    if not found:
        return None
    recorded, given = (" and ".join(", ".join(part) for part in (parts[:-1], parts[-1:]) if part)
                       for parts in zip(*found))
    one = len(found) == 1
    return (f"{name} was made with {recorded}; {given} {'overrides that' if one else 'override those'} (the "
            f"figures may differ from the model's own: leave {'it' if one else 'them'} out to use what the checkpoint "
            "records)")


def _resize_transform(pre: Preprocessing) -> Callable[[Any], Tensor]:
    """The evaluation transform for images that are not already of the input size (PIL → tensor)."""
    _, h, w = pre.input_size
    if pre.resize == "timm":
        from timm.data import create_transform

        return create_transform(input_size=pre.input_size, is_training=False, interpolation=pre.interpolation,
                                mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)
    from torchvision import transforms as T

    size = resize_side(pre)
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode(pre.interpolation), antialias=True),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


class ImageTransform:
    """PIL image → normalized tensor; resized only when it is not already of the input size."""

    def __init__(self, pre: Preprocessing):
        from torchvision import transforms as T

        self.pre = pre
        self.size = (pre.input_size[2], pre.input_size[1])  # PIL's (width, height)
        self.plain = T.Compose([T.ToTensor(), T.Normalize(pre.mean, pre.std)])
        self.resized = _resize_transform(pre)

    def __call__(self, image: Any) -> Tensor:
        image = image.convert("RGB")
        return self.plain(image) if image.size == self.size else self.resized(image)


def resize_side(pre: Preprocessing) -> int:
    """The side the shorter image side is resized to before the center crop (timm's and torchvision's
    evaluation transforms both resize to ⌊size / crop_pct⌋ unless the weights name their own size)."""
    _, h, w = pre.input_size
    return pre.resize_size or int(math.floor(min(h, w) / pre.crop_pct))


MAX_UPSCALE = 2.0


def upscale_warning(source: DataSource, pre: Preprocessing) -> str | None:
    """A warning when the images (judged by the first one) are upscaled more than 2× to the input size:
    e.g. 32×32 CIFAR images given to a model whose default input is 224 — most likely a model trained
    on 32×32 images whose checkpoint does not say so. Arrays, never resized, are warned about when the
    input size is more than 2× theirs (the model then runs on inputs far smaller than its own)."""
    if source.in_memory:
        return _small_arrays_warning(source, pre)
    if source.image_size is None:
        return None
    h, w = source.image_size
    _, size_h, size_w = pre.input_size
    if (h, w) == (size_h, size_w) or min(h, w) < 1:
        return None  # only normalized
    side = resize_side(pre)
    factor = side / min(h, w)
    if factor <= MAX_UPSCALE:
        return None
    return (f"the images are {h}×{w} (the first of {source.spec}) but the model's input size is {size_h}×{size_w}: "
            f"they are upscaled {factor:.1f}× (resized to {side}, center-cropped to {size_h}×{size_w}); if the "
            f"model was trained on {h}×{w} images, pass --input-size {h if h == w else f'{h}x{w}'}")


def _array_size(source: DataSource) -> tuple[int, int] | None:
    """(H, W) of in-memory arrays (all of one size), or None when there are none."""
    return tuple(int(v) for v in source.dataset[0][0].shape[-2:]) if len(source) else None  # type: ignore[return-value]


def _small_arrays_warning(source: DataSource, pre: Preprocessing) -> str | None:
    size = _array_size(source)
    _, size_h, size_w = pre.input_size
    if size is None or size == (size_h, size_w) or min(size) < 1:
        return None
    h, w = size
    factor = min(size_h, size_w) / min(h, w)
    if factor <= MAX_UPSCALE:
        return None  # the preprocessing note names the model's size
    return (f"the arrays of {source.spec} are {h}×{w} but the model's input size is {size_h}×{size_w} ({factor:.1f}× "
            f"larger): arrays are never resized, so the model runs on {h}×{w} inputs; if it was trained on {h}×{w} "
            f"images, pass --input-size {h if h == w else f'{h}x{w}'}, else resize the arrays to {size_h}×{size_w}")


def describe_preprocessing(source: DataSource, pre: Preprocessing) -> str:
    """One line saying what the data goes through, for stderr."""
    stats = f"mean {_triple(pre.mean)}, std {_triple(pre.std)}"
    if source.in_memory:
        _, h, w = pre.input_size
        size = _array_size(source) or (h, w)
        other = f" (the model's input size is {h}×{w})" if size != (h, w) else ""
        return (f"preprocessing of {source.spec}: {size[0]}×{size[1]} arrays scaled to [0, 1] and normalized ({stats}), "
                f"never resized{other}")
    _, h, w = pre.input_size
    resize = (f"images not {h}×{w} resized to {resize_side(pre)} ({pre.interpolation}) and center-cropped to "
              f"{h}×{w}")
    if source.image_size is not None and source.image_size == (h, w):
        resize = f"images of {h}×{w} only normalized (others resized to {resize_side(pre)} and center-cropped)"
    return f"preprocessing of {source.spec}: {resize}; {stats}"


def _triple(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def normalize(images: Tensor, pre: Preprocessing) -> Tensor:
    mean = torch.tensor(pre.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


# --------------------------------------------------------------------------------------------------
# Datasets: every item is (image, label, index)


class IndexedDataset(Dataset):
    """Wraps a dataset of (image, label) so that items carry their index, and names bad files."""

    def __init__(self, base: Any, describe: Callable[[int], str] | None = None):
        self.base = base
        self.describe = describe

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        try:
            image, label = self.base[index]
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            where = self.describe(index) if self.describe else f"sample {index}"
            raise DataError(f"cannot read image {where}: {_image_error(exc)}; remove or replace the file") from None
        return image, int(label), index


def _image_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if text.startswith("cannot identify image file"):
        return "not an image, or a corrupt one"
    if "truncated" in text.lower():
        return "the image file is truncated"
    return text or type(exc).__name__


class TensorImages(Dataset):
    """Images already in memory as a float tensor [N, C, H, W], normalized."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], int(self.labels[index]), index


@dataclass
class DataSource:
    """A dataset ready for a loader, and what resprobe reports about it."""

    spec: str
    dataset: Dataset
    num_classes: int | None = None
    class_names: list[str] | None = None
    in_memory: bool = False
    notes: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (H, W) of the first stored image, for images that get resized
    label_names: list[str] | None = None  # the class name of each label 0..n-1, when each has exactly one

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def samples(self) -> list[tuple[str, int]] | None:
        """(file, label) per index of the whole source (before ``--limit``) when it is image files on disk
        (a folder; a flat folder with ``--labels``), which a device can decode; None for other data."""
        from torchvision.datasets import ImageFolder

        from resprobe.sources import LabelledFiles

        dataset: Any = self.dataset
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        base = getattr(dataset, "base", None) if isinstance(dataset, IndexedDataset) else None
        return base.samples if isinstance(base, (ImageFolder, LabelledFiles)) else None


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
                if not {"images", "labels"} <= keys:
                    raise DataError(f"{path} must hold arrays 'images' and 'labels' (it has {', '.join(sorted(keys)) or 'none'})")
                return np.asarray(f["images"]), np.asarray(f["labels"])
        import h5py

        from resprobe.hdf5_probe import check_readable

        check_readable(path, DataError, "write it again")  # a crash in a child process, not here
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
            if not {"images", "labels"} <= keys:
                raise DataError(f"{path} must hold datasets 'images' and 'labels' (it has {', '.join(sorted(keys)) or 'none'})")
            return np.asarray(f["images"][()]), np.asarray(f["labels"][()])
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/h5py/zipfile raise many types for corrupt files
        raise DataError(f"{path} is not a readable arrays file (corrupt or truncated): {type(exc).__name__}") from None


# How far float images may lie outside [0, 1] and still be taken as [0, 1] images. A bicubic resize
# overshoots: by a few 1e-3 on photos, by 0.109 on a hard 0/1 edge upscaled 7× (torch's bicubic; 0.073
# antialiased; measured 2026-12-08). 0-255 floats (any pixel of 2/255 or more) and normalized images
# (about -2.1 to 2.6 with ImageNet statistics) are far outside it, over a whole array.
FLOAT_SLACK = 0.15


def arrays_to_tensor(images: np.ndarray, path: str = "arrays") -> Tensor:
    """uint8 NHWC → float NCHW in [0, 1]; float NCHW is taken as it is (must already be in [0, 1], give
    or take ``FLOAT_SLACK``)."""
    if images.ndim != 4:
        raise DataError(f"{path}: 'images' must be 4-D (uint8 NHWC or float NCHW), got shape {list(images.shape)}")
    if images.dtype == np.uint8:
        if images.shape[-1] != 3:
            raise DataError(f"{path}: uint8 'images' must be NHWC with 3 channels, got shape {list(images.shape)}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if np.issubdtype(images.dtype, np.floating):
        if images.shape[1] != 3:
            raise DataError(f"{path}: float 'images' must be NCHW with 3 channels, got shape {list(images.shape)}")
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if not torch.isfinite(tensor).all():
            raise DataError(f"{path}: 'images' holds NaN or infinite values")
        low, high = (float(tensor.min()), float(tensor.max())) if tensor.numel() else (0.0, 0.0)
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            # 0-255 floats, or images already normalized: normalizing them again gives wrong numbers.
            raise DataError(f"{path}: float 'images' must be in [0, 1] (they are scaled and normalized by resprobe; "
                            f"up to {FLOAT_SLACK:g} outside is taken as it is), but they range over [{low:g}, "
                            f"{high:g}]; store uint8 NHWC, or floats divided by 255 and not yet normalized")
        return tensor  # values slightly outside [0, 1] are kept: clamping would change the user's images
    raise DataError(f"{path}: 'images' must be uint8 or float, got {images.dtype}")


def _check_labels(labels: np.ndarray, n: int, path: str) -> Tensor:
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path}: 'labels' must be 1-D with one label per image ({n}), got shape {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise DataError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    if n and labels.min() < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}")
    return torch.from_numpy(labels.astype(np.int64))


def _arrays_source(spec: str, path: Path, pre: Preprocessing, model_classes: int | None = None) -> DataSource:
    images, labels = _load_arrays(path)
    tensor = arrays_to_tensor(images, str(path))
    if len(tensor) == 0:
        raise DataError(f"{path} holds no images")
    label_tensor = _check_labels(labels, len(tensor), str(path))
    n_classes = int(label_tensor.max()) + 1
    notes = []
    # Warned when the labels are a whole set 0..n-1 (each present) of fewer classes than the model's,
    # as CIFAR-10 arrays under a 1000-class head: a subset of a larger label set (ImageNet labels 3,
    # 17, 900) leaves gaps and is not. More labels than classes is check_labels_fit's error.
    if model_classes is not None and n_classes < model_classes and len(torch.unique(label_tensor)) == n_classes:
        notes.append(f"the labels of {spec} are 0 to {n_classes - 1} ({n_classes} classes) but the model has "
                     f"{model_classes} classes; each label is taken as the index of the model's class (give "
                     f"--num-classes {n_classes} if the model was trained on these labels)")
    return DataSource(spec, TensorImages(normalize(tensor, pre), label_tensor), num_classes=n_classes, in_memory=True,
                      notes=notes)


def _synthetic_source(spec: str, n: int, pre: Preprocessing, num_classes: int | None, seed: int) -> DataSource:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *pre.input_size, generator=generator)
    labels = torch.randint(0, num_classes or 10, (n,), generator=generator)
    return DataSource(spec, TensorImages(normalize(images, pre), labels), num_classes=num_classes, in_memory=True)


def _cifar_source(spec: str, kind: str, rest: str, pre: Preprocessing, model_classes: int | None = None) -> DataSource:
    from torchvision.datasets import CIFAR10, CIFAR100

    root, _, split = rest.rpartition(":") if rest.endswith((":train", ":test")) else (rest, "", "test")
    if not root:
        raise DataError(f"{spec}: give the directory, e.g. {kind}:~/data/cifar")
    root_path = Path(root).expanduser()
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if root_path.name == folder:
        root_path = root_path.parent
    if not (root_path / folder).is_dir():
        raise DataError(f"{spec}: no {folder}/ under {root_path} (torchvision's format; resprobe never downloads)")
    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    try:
        dataset = cls(str(root_path), train=(split == "train"), download=False, transform=ImageTransform(pre))
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{spec}: cannot read the {kind} files under {root_path}: {str(exc).splitlines()[0]}") from None
    notes = []
    if model_classes is not None and len(dataset.classes) != model_classes:
        notes.append(f"{spec} has {len(dataset.classes)} classes but the model has {model_classes}; labels follow "
                     f"{kind}'s order (give --num-classes {len(dataset.classes)} if the model was trained on {kind})")
    return DataSource(spec, IndexedDataset(dataset), num_classes=len(dataset.classes), class_names=list(dataset.classes),
                      notes=notes, image_size=(int(dataset.data.shape[1]), int(dataset.data.shape[2])),
                      label_names=list(dataset.classes))


def _read_class_map(path: str) -> dict[str, int]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--class-map {path}: file not found")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"--class-map {path}: invalid JSON ({exc.msg})") from None
        if isinstance(data, list):
            return {str(name): i for i, name in enumerate(data)}
        if isinstance(data, dict):
            return {str(k): int(v) for k, v in data.items()}
        raise DataError(f"--class-map {path}: expected a list of names or a {{name: index}} object")
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    return {name: i for i, name in enumerate(names)}


_SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev")


def check_not_split_parent(spec: str, path: Path) -> None:
    """A folder whose sub-folders are splits (``train/``, ``val/``, ``test/``...), each a folder of class
    folders, would be read as a dataset with one class per split: refused, naming the splits."""
    try:
        subfolders = sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return  # ImageFolder says what is wrong with the folder
    splits = [p for p in subfolders if p.name.lower() in _SPLIT_NAMES and _holds_folders(p)]
    if not splits:
        return
    names = ", ".join(f"{p.name}/" for p in splits)
    preference = ("val", "validation", "valid", "test", "eval", "dev", "testing")  # evaluation splits first
    choose = min(splits, key=lambda p: preference.index(p.name.lower()) if p.name.lower() in preference else 99)
    raise DataError(f"--data {spec} holds the splits {names} (each a folder of class folders), not one folder per "
                    f"class: choose one, e.g. --data {path / choose.name}")


def _holds_folders(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:  # the entries' types come with the listing: no stat per file
            return any(entry.is_dir() for entry in entries)
    except OSError:
        return False


def _folder_source(spec: str, path: Path, pre: Preprocessing, model_classes: int | None,
                   class_map: str | None, model_names: Sequence[str] | None = None) -> DataSource:
    from torchvision.datasets import ImageFolder

    from resprobe.sources import class_mapping

    check_not_split_parent(spec, path)
    try:
        folder = ImageFolder(str(path), transform=ImageTransform(pre))
    except (FileNotFoundError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        if text.startswith("Found no valid file"):
            detail = "its class folders hold no image files (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)"
        elif text.startswith("Couldn't find any class folder"):
            detail = "it has no class sub-folders"
        else:
            detail = text or type(exc).__name__
        raise DataError(f"--data {path}: no images: {detail}; an image folder holds one sub-folder of images per "
                        "class (ImageFolder layout)") from None
    names = folder.classes
    mapping, notes = class_mapping(names, model_classes, _read_class_map(class_map) if class_map else None,
                                   str(path), "class folders", model_names)
    if mapping != folder.class_to_idx:
        folder.samples = [(p, mapping[names[t]]) for p, t in folder.samples]
        folder.targets = [t for _, t in folder.samples]
    samples = folder.samples

    def describe(i: int) -> str:
        return samples[i][0]

    n_classes = (max(folder.targets) + 1) if folder.targets else len(names)
    by_label = sorted(mapping, key=mapping.__getitem__)
    label_names = by_label if sorted(mapping.values()) == list(range(len(names))) else None  # one name per label
    return DataSource(spec, IndexedDataset(folder, describe), num_classes=n_classes, class_names=list(names), notes=notes,
                      image_size=_first_image_size(samples[0][0]) if samples else None, label_names=label_names)


def _first_image_size(path: str) -> tuple[int, int] | None:
    """(H, W) of one image, from its header only (nothing decoded): the cheap sample for the upscale check."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - a bad file is named when the loader reads it
        return None
    return int(height), int(width)


def open_data(
    spec: str,
    pre: Preprocessing,
    model_classes: int | None = None,
    class_map: str | None = None,
    seed: int = 0,
    labels: str | None = None,
    offline: bool = False,
    model_names: Sequence[str] | None = None,
) -> DataSource:
    """Turn a ``--data`` SPEC into a dataset of (normalized image, label, index); ``offline``: an
    ``hfds:`` hub dataset only from the local cache (as ``HF_HUB_OFFLINE=1``); ``model_names``: the
    model's class names by index, which class names (folders, a tar's folders, an ``hfds:`` ClassLabel,
    a ``--labels`` file) are matched to by name (unless ``class_map``)."""
    spec = spec.strip()
    imagenet_style = _imagenet_style_source(spec, pre, model_classes, class_map, labels, offline, model_names)
    if imagenet_style is not None:
        return imagenet_style
    if not spec:
        raise DataError("empty --data: give an image folder, an arrays file, cifar10:DIR or synthetic[:N]")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        _, _, count = spec.partition(":")
        try:
            n = int(count) if count else DEFAULT_SYNTHETIC
        except ValueError:
            raise DataError(f"--data {spec}: expected synthetic or synthetic:N") from None
        if n < 1:
            raise DataError(f"--data {spec}: N must be at least 1")
        return _synthetic_source(spec, n, pre, model_classes, seed)
    for kind in ("cifar10", "cifar100"):
        if spec.startswith(kind + ":"):
            return _cifar_source(spec, kind, spec[len(kind) + 1 :], pre, model_classes)
    path = Path(spec).expanduser()
    if path.suffix.lower() in _ARRAY_SUFFIXES:
        source = _arrays_source(spec, path, pre, model_classes)
    elif path.is_dir():
        source = _folder_source(spec, path, pre, model_classes, class_map, model_names)
    elif path.exists():
        raise DataError(f"--data {spec}: a file, but not an arrays file (.npz, .h5); give a folder or an arrays file")
    else:
        raise DataError(f"data not found: {spec}")
    return source


def _imagenet_style_source(spec: str, pre: Preprocessing, model_classes: int | None, class_map: str | None,
                           labels: str | None, offline: bool = False,
                           model_names: Sequence[str] | None = None) -> DataSource | None:
    """``--labels`` folders, ``.tar`` archives and ``hfds:`` datasets (resprobe.sources), or None."""
    from resprobe import sources

    path = Path(spec).expanduser()
    if spec.startswith("hfds:"):
        if labels:
            raise DataError("--labels is for a flat folder of images; hfds: datasets carry their labels")
        mapping = _read_class_map(class_map) if class_map else None
        rows, names, notes, n_classes = sources.open_hfds(spec, ImageTransform(pre), model_classes, mapping, offline,
                                                          model_names)
        return DataSource(spec, IndexedDataset(rows, lambda i: sources.describe_row(rows, i, spec)),
                          num_classes=n_classes, class_names=names, notes=notes, image_size=rows.image_size())
    if path.suffix.lower() == ".tar" and path.is_file():
        if labels:
            raise DataError("--labels is for a flat folder of images; a tar's class folders are its labels")
        mapping = _read_class_map(class_map) if class_map else None
        tar, names, notes = sources.open_tar(path, ImageTransform(pre), model_classes, mapping, model_names)
        assert tar.remap is not None
        return DataSource(spec, IndexedDataset(tar, tar.filename), num_classes=max(tar.remap.values()) + 1,
                          class_names=names, notes=notes, image_size=tar.image_size())
    if labels:
        if not path.is_dir():
            raise DataError(f"--labels needs --data to be a folder of images, not {spec}")
        mapping = _read_class_map(class_map) if class_map else None
        samples = sources.labelled_folder_samples(path, labels, model_classes, mapping, model_names)
        files = sources.LabelledFiles(samples, ImageTransform(pre))
        return DataSource(spec, IndexedDataset(files, lambda i: samples[i][0]),
                          num_classes=max(label for _, label in samples) + 1)
    return None


def check_labels_fit(source: DataSource, model_classes: int | None) -> None:
    """Labels outside the classifier are an error, found before any work starts."""
    if model_classes is None or source.num_classes is None:
        return
    if source.num_classes > model_classes:
        raise DataError(f"{source.spec} has label {source.num_classes - 1} but the model's classifier has "
                        f"{model_classes} classes (pass --num-classes or another --class-map)")


def select_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """docs/reference.md: ``sorted(torch.randperm(n, generator=Generator().manual_seed(seed))[:limit])``."""
    if limit is None:
        return list(range(n))
    if limit < 1:
        raise BadValue(f"--limit must be at least 1, got {limit}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(int(i) for i in perm[:limit])


def limit_source(source: DataSource, limit: int | None, seed: int = 0) -> DataSource:
    if limit is None:
        return source
    return replace(source, dataset=Subset(source.dataset, select_indices(len(source), limit, seed)))


def _collate(batch: Sequence[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    index = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, labels, index


def default_workers(source: DataSource) -> int:
    if source.in_memory:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def loader_workers(source: DataSource, batch_size: int, workers: int | None) -> int:
    """The worker processes for a loader of ``source`` (``--workers``, or the default), after checking
    ``--batch-size`` and ``--workers``."""
    if batch_size < 1:
        raise BadValue(f"--batch-size must be at least 1, got {batch_size}")
    workers = default_workers(source) if workers is None else workers
    if workers < 0:
        raise BadValue(f"--workers must be 0 or more, got {workers}")
    return workers


class _RankLoader(DataLoader):
    """A DataLoader that marks, when first iterated, that this rank works on its own batches from
    here on (:func:`resprobe.distributed.diverge`: an error after it may be this rank's alone)."""

    def __iter__(self):  # type: ignore[override]
        from resprobe.distributed import diverge

        diverge()
        return super().__iter__()


def make_loader(
    source: DataSource,
    batch_size: int = 64,
    workers: int | None = None,
    device: torch.device | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A loader of (images, labels, indices) batches; pinned memory and prefetching on CUDA."""
    workers = loader_workers(source, batch_size, workers)
    cuda = device is not None and device.type == "cuda"
    return _RankLoader(
        source.dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
        pin_memory=cuda, persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
        generator=generator, drop_last=drop_last,
    )


def warn_notes(source: DataSource) -> None:
    for note in source.notes:
        warnings.warn(note, stacklevel=2)
