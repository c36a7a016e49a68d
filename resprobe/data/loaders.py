"""Sample selection (`--limit`, seeded) and DataLoaders (workers, per-rank shards)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from resprobe.data.datasets import DataSource
from resprobe.errors import BadValue


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


def _collate(batch: Sequence[tuple[Tensor, int, int]]) -> tuple[Tensor, ...]:
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    index = torch.tensor([b[2] for b in batch], dtype=torch.long)
    warned = [w for b in batch for w in getattr(b, "warned", ())]
    # A worker's warnings ride along as a fourth element, which the loader takes off (_RankLoader).
    return (images, labels, index, warned) if warned else (images, labels, index)


def _reraised(batches: Iterator[tuple[Tensor, ...]]) -> Iterator[tuple[Tensor, ...]]:
    """Batches as (images, labels, indices), the warnings raised in worker processes raised here, once
    each: a worker's own stderr is not the command's, and under torchrun only rank 0 speaks."""
    seen: set[tuple[str, type[Warning]]] = set()
    for batch in batches:
        if len(batch) == 4:
            for message, category in batch[3]:
                if (message, category) not in seen:
                    seen.add((message, category))
                    warnings.warn(message, category, stacklevel=2)
            batch = batch[:3]
        yield batch


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
        return _reraised(super().__iter__())


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
