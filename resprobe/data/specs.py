"""Data specs (`--data`): image folders, arrays files, CIFAR, tar, hfds, synthetic, to a DataSource."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from resprobe.data.datasets import DataSource, IndexedDataset, TensorImages
from resprobe.data.preprocessing import ImageTransform, Preprocessing, normalize
from resprobe.errors import DataError

DEFAULT_SYNTHETIC = 128
_ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")


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

        from resprobe.recording.hdf5_probe import check_readable

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

    from resprobe.data.sources import class_mapping

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
    """``--labels`` folders, ``.tar`` archives and ``hfds:`` datasets (resprobe.data.sources), or None."""
    from resprobe.data import sources

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


def warn_notes(source: DataSource) -> None:
    for note in source.notes:
        warnings.warn(note, stacklevel=2)
