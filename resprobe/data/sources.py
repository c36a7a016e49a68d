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


def _devkit_classes(labels_file: Path, files: list[Path]) -> list[tuple[str, str, str]]:
    """(path, wnid, where) per image, from the devkit's ILSVRC2012_IDs through its ``meta.mat``."""
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
    rows = []
    for path, pos in zip(files, positions):
        if pos >= len(ids):
            raise DataError(f"--labels {labels_file} has {len(ids)} lines; no label for {path.name}")
        wnid = id_to_wnid.get(ids[pos])
        if wnid is None or wnid not in index:
            raise DataError(f"--labels {labels_file}: ILSVRC2012_ID {ids[pos]} (for {path.name}) is not one of the "
                            "1000 classes in meta.mat")
        rows.append((str(path), wnid, f"--labels {labels_file} line {pos + 1}"))
    return rows


def _csv_classes(labels_file: Path, files: list[Path]) -> list[tuple[str, str, str]]:
    """(path, class, where) per image from a CSV of file name and class; ``where`` names the file's own
    line (blank lines and a header counted, as an editor shows them)."""
    try:
        with open(labels_file, newline="") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, row) for row in reader if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"--labels {labels_file}: not a readable CSV ({type(exc).__name__})") from None
    present = {p.name for p in files} | {p.stem for p in files}
    if rows and Path(rows[0][1][0].strip()).name not in present:
        # a header (ImageId,PredictionString or file,label), or a row for an image that is not here:
        # either way it labels nothing (class names are allowed, so the class cannot tell a header)
        rows = rows[1:]
    if not rows:
        raise DataError(f"--labels {labels_file} holds no labels")
    by_name: dict[str, tuple[str, str]] = {}
    for line, row in rows:
        where = f"--labels {labels_file} line {line}"
        if len(row) < 2 or not row[1].split():
            raise DataError(f"{where}: expected FILE,CLASS")
        # LOC_val_solution.csv: "n01751748 12 34 56 78 n01751748 ...": the first token is the class
        by_name[Path(row[0].strip()).name] = (row[1].split()[0], where)
    samples, missing = [], []
    for path in files:
        found = by_name.get(path.name, by_name.get(path.stem))
        if found is None:
            missing.append(path.name)
        else:
            samples.append((str(path), *found))
    if missing:
        raise DataError(f"--labels {labels_file} has no label for {len(missing)} image(s), e.g. {missing[0]}")
    return samples


def _integer(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _labels_of_classes(rows: list[tuple[str, str, str]], labels_file: Path, model_classes: int | None,
                       class_map: dict[str, int] | None,
                       model_names: Sequence[str] | None) -> list[tuple[str, int]]:
    """(path, label) from (path, class, where): an integer is the class index itself; a name goes
    through ``--class-map``, else the checkpoint's class names (:func:`class_mapping`, as class folders
    do), else it must be a wnid (the 1000-class ImageNet order)."""
    names = sorted({value for _, value, _ in rows if _integer(value) is None})
    mapping = None
    if names and (class_map is not None or model_names):
        mapping, _ = class_mapping(names, model_classes, class_map, str(labels_file), "classes", model_names)
    index = imagenet_index() if mapping is None and any(is_wnid(n) for n in names) else {}
    samples = []
    for path, value, where in rows:
        label = _integer(value)
        if label is not None:
            if label < 0:
                raise DataError(f"{where}: negative class {label}")
        elif mapping is not None:
            label = mapping[value]
        elif is_wnid(value):
            if value not in index:
                raise DataError(f"{where}: wnid {value} is not one of the 1000 ImageNet classes")
            label = index[value]
        else:
            raise DataError(f"{where}: class {value!r} is neither a wnid (n01440764) nor an integer; give "
                            "--class-map to map class names to the model's classes")
        samples.append((path, label))
    return samples


def labelled_folder_samples(folder: Path, labels_file: str | Path, model_classes: int | None = None,
                            class_map: dict[str, int] | None = None,
                            model_names: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """(path, class index) for every image of a flat folder, from a devkit ground-truth file or a CSV;
    class names are matched as class folders' are (``class_map``, then ``model_names``)."""
    labels_path = Path(labels_file).expanduser()
    if not labels_path.is_file():
        raise DataError(f"--labels {labels_file}: file not found")
    files = image_files(folder)
    if not files:
        raise DataError(f"--data {folder}: no image files directly in it for --labels to label")
    read = _csv_classes if labels_path.suffix.lower() == ".csv" else _devkit_classes
    return _labels_of_classes(read(labels_path, files), labels_path, model_classes, class_map, model_names)


# --------------------------------------------------------------------------------------------------
# Class names → labels, for every source whose classes have names (folders, tars, hfds: datasets)


def class_mapping(names: Sequence[str], model_classes: int | None, class_map: dict[str, int] | None,
                  where: str, kind: str = "classes",
                  model_names: Sequence[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Class name → label, and notes for the user: ``--class-map``, the model's own class names (a
    resprobe checkpoint trained on class folders records them), the 1000-class ImageNet order for
    classes named by wnids under a 1000-class model, or else the position in ``names`` (sorted order)."""
    if class_map is not None:
        missing = [n for n in names if n not in class_map]
        if missing:
            raise DataError(f"--class-map has no entry for {kind} {', '.join(missing[:4])} of {where}")
        return {n: class_map[n] for n in names}, []
    if model_names:
        known = {n: i for i, n in enumerate(model_names)}
        unknown = [n for n in names if n not in known]
        if unknown:
            more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
            one = "class" if kind == "classes" else kind.rstrip("s")
            what = f"the {one} {unknown[0]} is not" if len(unknown) == 1 else \
                f"the {kind} {', '.join(unknown[:4])}{more} are not"
            raise DataError(f"{where}: {what} among the model's {len(model_names)} classes "
                            f"({', '.join(model_names[:6])}{', ...' if len(model_names) > 6 else ''}); "
                            "give --class-map to map them")
        return {n: known[n] for n in names}, []
    if model_classes == 1000 and names and all(is_wnid(n) for n in names):
        return imagenet_index(), [f"{kind} named by ImageNet wnids: labels follow the 1000-class ImageNet order"]
    notes = []
    if model_classes is not None and len(names) != model_classes:
        notes.append(f"{len(names)} {kind} but the model has {model_classes} classes; labels follow sorted order "
                     "(give --class-map to change this)")
    return {n: i for i, n in enumerate(names)}, notes


# --------------------------------------------------------------------------------------------------
# Images of a timm reader: a .tar of an image folder, a Hugging Face dataset


class ReaderImages(Dataset):
    """The images of a timm reader (``timm.data.create_dataset(...).reader``), decoded here with PIL as
    RGB (torchvision's ``pil_loader``), in ``order`` and with labels through ``remap``.

    timm's ``ImageDataset`` is not used to decode: it replaces an image it cannot read by the next
    sample (and its label) with only a log line, which would change the figures silently. Here an
    unreadable image is an error naming it.
    """

    def __init__(self, reader: Any, transform: Callable[[Any], Any], order: list[int] | None = None,
                 remap: dict[int, int] | None = None):
        self.reader, self.transform, self.remap = reader, transform, remap
        self.order = order if order is not None else list(range(len(reader)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        file, target = self.reader[self.order[index]]
        with file, Image.open(file) as image:  # file: a tar member, a BytesIO of a dataset's bytes, a file
            rgb = image.convert("RGB")
        return self.transform(rgb), self.remap[int(target)] if self.remap is not None else int(target)

    def filename(self, index: int) -> str:
        return str(self.reader.filename(self.order[index]))

    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the first image, for the upscale check (read from its header only)."""
        from PIL import Image

        if not self.order:
            return None
        try:
            file, _ = self.reader[self.order[0]]
            with file, Image.open(file) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - a bad file is named when the loader reads it
            return None
        return int(height), int(width)


def open_tar(path: Path, transform: Callable[[Any], Any], model_classes: int | None,
             class_map: dict[str, int] | None,
             model_names: Sequence[str] | None = None) -> tuple[ReaderImages, list[str], list[str]]:
    """A tar of ``CLASS/IMAGE`` files, read by timm's tar reader, in the image folder's order with its
    labels: the dataset, its class names and notes for the user.

    timm sorts a tar's classes and files by natural key; ``ImageFolder`` sorts plainly. The order and
    labels here are the unpacked folder's, so that a tar and its folder give the same ``--limit``
    samples and the same figures.
    """
    from timm.data import create_dataset

    try:
        base = create_dataset("", root=str(path), split="validation")
    except Exception as exc:  # noqa: BLE001 - tarfile.ReadError, an empty archive (ValueError from zip)
        raise DataError(f"--data {path}: not a readable tar of an image folder ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no images'})") from None
    reader = base.reader
    timm_names = {idx: name for name, idx in reader.class_name_to_idx.items()}
    names = sorted(timm_names.values())
    mapping, notes = class_mapping(names, model_classes, class_map, str(path), "class folders", model_names)
    remap = {idx: mapping[name] for idx, name in timm_names.items()}
    paths = [str(reader.filename(i)) for i in range(len(reader))]
    targets = [int(t) for t in reader.targets]
    # ImageFolder's order: classes sorted by name, then the files within each class by path
    order = sorted(range(len(reader)), key=lambda i: (timm_names[targets[i]], paths[i]))
    return ReaderImages(reader, transform, order, remap), names, notes


# --------------------------------------------------------------------------------------------------
# A Hugging Face dataset, through timm's reader

_IMAGE_KEYS = ("image", "img")
_LABEL_KEYS = ("label", "labels")


def _hf_dataset_path(name: str, spec: str, offline: bool) -> str:
    """What ``datasets.load_dataset`` is given for NAME: a local folder as it is (parquet, arrow or image
    files, or a ``DatasetDict.save_to_disk`` folder); a hub id as it is, or, offline, its cached snapshot
    folder, so that nothing asks the network (datasets would retry the hub for half a minute)."""
    from resprobe.models.hub import hf_cache_dir, is_offline

    local = Path(name).expanduser()
    if local.exists():
        if (local / "state.json").is_file() and (local / "dataset_info.json").is_file():
            raise DataError(f"--data {spec}: a Dataset written by save_to_disk, which datasets.load_dataset (timm's "
                            "reader) does not read; write DatasetDict({'validation': ds}).save_to_disk(DIR) or "
                            "ds.to_parquet('DIR/validation.parquet') instead")
        return str(local)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise DataError(f"--data {spec}: folder not found: {local}")
    if not is_offline(offline):
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type="dataset", cache_dir=str(hf_cache_dir()), local_files_only=True)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, an invalid repo id (HFValidationError)
        raise DataError(f"offline: the Hugging Face dataset {name} is not in the local cache ({hf_cache_dir()}); "
                        "run once without --offline (and without HF_HUB_OFFLINE=1) to download it, or give "
                        "hfds:FOLDER holding its files") from None


def _hf_columns(features: Any, spec: str) -> tuple[str, str]:
    """The image and label columns: ``image`` (or ``img``, or the only image column) and ``label`` (or
    ``labels``, or the only class-label column)."""
    import datasets

    columns = ", ".join(features) or "none"
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    image = next((k for k in _IMAGE_KEYS if k in images), images[0] if len(images) == 1 else None)
    if image is None:
        raise DataError(f"--data {spec}: {'several image columns' if images else 'no image column'} (its columns: "
                        f"{columns}); resprobe reads a column named image or img")
    class_labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    label = next((k for k in _LABEL_KEYS if k in features), class_labels[0] if len(class_labels) == 1 else None)
    if label is None:
        raise DataError(f"--data {spec}: no label column (its columns: {columns}); resprobe reads a column named "
                        "label or labels, or the only class-label column")
    feature = features[label]
    if not (isinstance(feature, datasets.ClassLabel)
            or (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))):
        raise DataError(f"--data {spec}: its {label} column holds {feature}, not class labels or integers")
    return image, label


def describe_row(rows: ReaderImages, index: int, spec: str) -> str:
    """A dataset row for an error: its image's file name where the dataset keeps one."""
    name = rows.reader.filename(rows.order[index])  # the image path, or None for bytes stored without one
    return f"row {index} of {spec}" + (f" ({name})" if name else "")


def open_hfds(spec: str, transform: Callable[[Any], Any], model_classes: int | None = None,
              class_map: dict[str, int] | None = None, offline: bool = False,
              model_names: Sequence[str] | None = None) -> tuple[ReaderImages, list[str] | None, list[str], int]:
    """``hfds:NAME[:split]`` (split ``validation`` by default) through timm's reader (``timm.data.create_dataset``),
    in the dataset's row order: the images, the class names (None for plain integer labels), notes for
    the user and the number of classes."""
    rest = spec[len("hfds:"):]
    name, _, split = rest.partition(":")
    if not name:
        raise DataError(f"--data {spec}: give the dataset's name, e.g. hfds:timm/mini-imagenet:validation")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {spec}: Hugging Face datasets need the 'datasets' package: "
                        "pip install 'resprobe[hf]'") from None
    from timm.data import create_dataset

    path = _hf_dataset_path(name, spec, offline)
    try:
        # read once for its columns; timm's reader then loads it again from datasets' cache
        columns = _hf_columns(datasets.load_dataset(path, split=split or "validation").features, spec)
        base = create_dataset("hfds/" + path, split=split or "validation", input_key=columns[0],
                              target_key=columns[1])
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (not found, offline, no such split)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "; validation is the default split: name another as hfds:NAME:SPLIT" \
            if not split and "Unknown split" in text else ""
        raise DataError(f"--data {spec}: cannot open the Hugging Face dataset ({type(exc).__name__}: {text[:200]})"
                        f"{hint}") from None
    reader = base.reader
    values = list(reader.dataset[columns[1]])
    if not values:
        raise DataError(f"--data {spec}: the split holds no rows")
    if any(v is None for v in values):
        raise DataError(f"--data {spec}: {sum(v is None for v in values)} row(s) have no {columns[1]}")
    labels = [int(v) for v in values]
    if min(labels) < 0:
        raise DataError(f"--data {spec}: label {min(labels)} in column {columns[1]}: the split is not labelled (as "
                        "the test split of ILSVRC/imagenet-1k); choose a labelled split, e.g. :validation")
    feature = reader.dataset.features[columns[1]]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        mapping, notes = class_mapping(names, model_classes, class_map, spec, "classes", model_names)
        remap = {i: mapping[n] for i, n in enumerate(names)}
        return ReaderImages(reader, transform, remap=remap), names, notes, max(remap.values()) + 1
    if class_map is not None:
        raise DataError(f"--class-map maps class names, but the labels of {spec} are plain integers")
    return ReaderImages(reader, transform), None, [], max(labels) + 1
