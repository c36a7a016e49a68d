"""DataSource (a dataset ready for a loader, and what resprobe reports about it) and the dataset wrappers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from resprobe.errors import DataError


class WarnedSample(tuple):
    """A sample, as a tuple, with the warnings its loading raised in a loader's worker process."""

    def __new__(cls, item: tuple, warned: list[tuple[str, type[Warning]]]) -> WarnedSample:
        sample = super().__new__(cls, item)
        sample.warned = warned
        return sample


class IndexedDataset(Dataset):
    """Wraps a dataset of (image, label) so that items carry their index, and names bad files."""

    def __init__(self, base: Any, describe: Callable[[int], str] | None = None):
        self.base = base
        self.describe = describe

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        if torch.utils.data.get_worker_info() is None:
            return self._item(index)
        # In a loader's worker process a warning (PIL's, a transform's) would be printed by the worker or
        # lost: it travels with the sample to the main process instead (data/loaders.py re-raises it).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            item = self._item(index)
        return WarnedSample(item, [(str(w.message), w.category) for w in caught]) if caught else item

    def _item(self, index: int) -> tuple[Tensor, int, int]:
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

        from resprobe.data.sources import LabelledFiles

        dataset: Any = self.dataset
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        base = getattr(dataset, "base", None) if isinstance(dataset, IndexedDataset) else None
        return base.samples if isinstance(base, (ImageFolder, LabelledFiles)) else None
