"""ImageNet-style data as users hold it (docs/reference.md ``--data``), beside data.py's folders and arrays:

- a flat folder of images with ``--labels FILE``: the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (one 1-based ILSVRC2012_ID a line, in sorted file order; the devkit's ``meta.mat`` beside it maps
  the IDs to wnids), or a CSV of file name and class (``LOC_val_solution.csv``, whose
  ``PredictionString`` starts with the wnid, or ``file,label`` with a wnid or an integer);
- a ``.tar`` of an image folder, read by timm's tar reader (``timm.data.create_dataset``), with the
  labels and sample order of the same folder unpacked;
- ``hfds:NAME[:split]``, a Hugging Face dataset through timm's reader (``pip install 'resprobe[hf]'``).

wnids map to the 1000-class ImageNet order through ``timm.data.ImageNetInfo``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from resprobe.errors import DataError

_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})$")
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


def is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def imagenet_index() -> dict[str, int]:
    """wnid → index in the 1000-class ImageNet order that timm and torchvision models use."""
    from timm.data import ImageNetInfo

    return {w: i for i, w in enumerate(ImageNetInfo().label_names())}


# --------------------------------------------------------------------------------------------------
# A flat folder of images with a labels file


class LabelledFiles(Dataset):
    """(path, label) pairs read with PIL as RGB, through ``transform`` (torchvision's ``pil_loader``)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Any], Any]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import pil_loader

        path, label = self.samples[index]
        return self.transform(pil_loader(path)), label


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (the suffixes ``ImageFolder`` takes), sorted by name (the
    devkit's order)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS),
                  key=lambda p: p.name)


def read_devkit_meta(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID → wnid from the devkit's ``meta.mat`` (its leaf synsets, as torchvision reads it)."""
    try:
        from scipy import io as sio
    except ImportError:
        raise DataError(f"reading {path} needs scipy (pip install scipy)") from None
    try:
        synsets = sio.loadmat(str(path), squeeze_me=True)["synsets"]
        table = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for files of another kind
        raise DataError(f"{path} is not the ILSVRC2012 devkit's meta.mat ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not table:
        raise DataError(f"{path} lists no leaf synsets: not the ILSVRC2012 devkit's meta.mat")
    return table


def _devkit_labels(labels_file: Path, files: list[Path]) -> list[tuple[str, int]]:
    meta = labels_file.parent / "meta.mat"
    if not meta.is_file():
        raise DataError(f"--labels {labels_file}: the devkit's ILSVRC2012_IDs need its meta.mat beside the file "
                        f"(not found: {meta}); keep the devkit's data/ folder together, or give a CSV of file "
                        "name and wnid such as LOC_val_solution.csv")
    id_to_wnid = read_devkit_meta(meta)
    index = imagenet_index()
    try:
        ids = [int(line) for line in labels_file.read_text().split()]
    except ValueError:
        raise DataError(f"--labels {labels_file}: expected one integer ILSVRC2012_ID a line") from None
    numbered = [_VAL_NAME.match(p.stem) for p in files]
    if all(numbered):  # ILSVRC2012_val_00000001.JPEG is line 1, whichever files are present
        positions = [int(m.group(1)) - 1 for m in numbered]  # type: ignore[union-attr]
    elif len(files) == len(ids):
        positions = list(range(len(files)))
    else:
        raise DataError(f"--labels {labels_file} has {len(ids)} labels for {len(files)} images whose names are not "
                        "ILSVRC2012_val_NNNNNNNN: the devkit's order cannot be matched")
    samples = []
    for path, pos in zip(files, positions):
        if pos >= len(ids):
            raise DataError(f"--labels {labels_file} has {len(ids)} lines; no label for {path.name}")
        wnid = id_to_wnid.get(ids[pos])
        if wnid is None or wnid not in index:
            raise DataError(f"--labels {labels_file}: ILSVRC2012_ID {ids[pos]} (for {path.name}) is not one of the "
                            "1000 classes in meta.mat")
        samples.append((str(path), index[wnid]))
    return samples


def _class_index(value: str, index: dict[str, int], where: str) -> int:
    value = value.strip()
    if is_wnid(value):
        if value not in index:
            raise DataError(f"{where}: wnid {value} is not one of the 1000 ImageNet classes")
        return index[value]
    try:
        label = int(value)
    except ValueError:
        raise DataError(f"{where}: class {value!r} is neither a wnid (n01440764) nor an integer") from None
    if label < 0:
        raise DataError(f"{where}: negative class {label}")
    return label


def _csv_labels(labels_file: Path, files: list[Path]) -> list[tuple[str, int]]:
    try:
        with open(labels_file, newline="") as fh:
            rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"--labels {labels_file}: not a readable CSV ({type(exc).__name__})") from None
    if rows and len(rows[0]) >= 2 and not is_wnid(rows[0][1].split()[0] if rows[0][1].split() else "") \
            and not rows[0][1].strip().isdigit():
        rows = rows[1:]  # a header: ImageId,PredictionString or file,label
    if not rows:
        raise DataError(f"--labels {labels_file} holds no labels")
    index = imagenet_index()
    by_name: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        if len(row) < 2 or not row[1].split():
            raise DataError(f"--labels {labels_file} line {n}: expected FILE,CLASS")
        # LOC_val_solution.csv: "n01751748 12 34 56 78 n01751748 ...": the first token is the class
        by_name[Path(row[0].strip()).name] = _class_index(row[1].split()[0], index, f"--labels {labels_file} line {n}")
    samples, missing = [], []
    for path in files:
        label = by_name.get(path.name, by_name.get(path.stem))
        if label is None:
            missing.append(path.name)
        else:
            samples.append((str(path), label))
    if missing:
        raise DataError(f"--labels {labels_file} has no label for {len(missing)} image(s), e.g. {missing[0]}")
    return samples


def labelled_folder_samples(folder: Path, labels_file: str | Path) -> list[tuple[str, int]]:
    """(path, class index) for every image of a flat folder, from a devkit ground-truth file or a CSV."""
    labels_path = Path(labels_file).expanduser()
    if not labels_path.is_file():
        raise DataError(f"--labels {labels_file}: file not found")
    files = image_files(folder)
    if not files:
        raise DataError(f"--data {folder}: no image files directly in it for --labels to label")
    if labels_path.suffix.lower() == ".csv":
        return _csv_labels(labels_path, files)
    return _devkit_labels(labels_path, files)


# --------------------------------------------------------------------------------------------------
# A .tar of an image folder, through timm's reader


class TarImages(Dataset):
    """timm's ``ImageDataset`` over a ``.tar``, in the image folder's order with its labels.

    timm sorts a tar's classes and files by natural key; ``ImageFolder`` sorts plainly. ``order``
    and ``remap`` give the tar the folder's sample order and class indices, so that a tar and its
    unpacked folder give the same ``--limit`` samples and the same figures.
    """

    def __init__(self, base: Any, order: list[int], remap: dict[int, int], names: list[str]):
        self.base, self.order, self.remap, self.names = base, order, remap, names

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.base[self.order[index]]
        return image, self.remap[int(target)]

    def filename(self, index: int) -> str:
        return str(self.base.filename(self.order[index]))


def open_tar(path: Path, transform: Callable[[Any], Any], model_classes: int | None,
             class_map: dict[str, int] | None) -> tuple[TarImages, list[str], list[str]]:
    """A tar of ``CLASS/IMAGE`` files: the dataset, its class names and notes for the user."""
    from timm.data import create_dataset

    try:
        base = create_dataset("", root=str(path), split="validation", transform=transform)
    except Exception as exc:  # noqa: BLE001 - tarfile.ReadError, an empty archive (ValueError from zip)
        raise DataError(f"--data {path}: not a readable tar of an image folder ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no images'})") from None
    reader = base.reader
    timm_names = {idx: name for name, idx in reader.class_name_to_idx.items()}
    names = sorted(timm_names.values())
    notes: list[str] = []
    if class_map is not None:
        missing = [n for n in names if n not in class_map]
        if missing:
            raise DataError(f"--class-map has no entry for class(es) {', '.join(missing[:4])} of {path}")
        mapping = class_map
    elif model_classes == 1000 and names and all(is_wnid(n) for n in names):
        mapping = imagenet_index()
        notes.append("classes named by ImageNet wnids: labels follow the 1000-class ImageNet order")
    else:
        mapping = {n: i for i, n in enumerate(names)}
        if model_classes is not None and len(names) != model_classes:
            notes.append(f"{len(names)} classes in {path} but the model has {model_classes} classes; labels follow "
                         "sorted class order (give --class-map to change this)")
    remap = {idx: mapping[name] for idx, name in timm_names.items()}
    paths = [str(base.filename(i)) for i in range(len(base))]
    targets = [int(t) for t in reader.targets]
    # ImageFolder's order: classes sorted by name, then the files within each class by path
    order = sorted(range(len(base)), key=lambda i: (timm_names[targets[i]], paths[i]))
    return TarImages(base, order, remap, names), names, notes


# --------------------------------------------------------------------------------------------------
# A Hugging Face dataset, through timm's reader


class HfImages(Dataset):
    def __init__(self, base: Any):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.base[index]
        return image, int(target)


def open_hfds(spec: str, transform: Callable[[Any], Any]) -> tuple[HfImages, list[str] | None]:
    """``hfds:NAME[:split]`` (split ``validation`` by default) through ``timm.data.create_dataset``."""
    rest = spec[len("hfds:"):]
    name, _, split = rest.partition(":")
    if not name:
        raise DataError(f"--data {spec}: give the dataset's name, e.g. hfds:timm/mini-imagenet:validation")
    try:
        import datasets  # noqa: F401  timm's reader needs it
    except ImportError:
        raise DataError(f"--data {spec}: Hugging Face datasets need the 'datasets' package: "
                        "pip install 'resprobe[hf]'") from None
    from timm.data import create_dataset

    try:
        base = create_dataset("hfds/" + name, root=None, split=split or "validation", transform=transform)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (not found, offline, no split)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"--data {spec}: cannot open the Hugging Face dataset ({type(exc).__name__}: {text[:200]})") \
            from None
    names = None
    try:
        feature = base.reader.dataset.features[base.reader.label_key]
        names = list(feature.names)
    except Exception:  # noqa: BLE001 - a dataset whose labels are plain integers
        names = None
    return HfImages(base), names
