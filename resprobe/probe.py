"""One object that holds what every command starts from: the model, its preprocessing, its blocks,
and where it runs. The command line builds one per invocation; a notebook can do the same::

    from resprobe.probe import open_probe
    probe = open_probe("timm:resnet18", num_classes=10, input_size="32")
    probe.anatomy.names                     # ['layer1.0', 'layer1.1', ...]
    source = probe.data("cifar10:~/data", limit=500)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from resprobe.blocks import Anatomy, discover_blocks
from resprobe.data import (
    DataSource,
    Preprocessing,
    check_labels_fit,
    default_preprocessing,
    limit_source,
    make_loader,
    open_data,
    override_preprocessing,
)
from resprobe.models import LoadedModel, LoadOptions, load_model
from resprobe.runtime import Runtime, make_runtime


@dataclass
class Probe:
    loaded: LoadedModel
    preprocessing: Preprocessing
    anatomy: Anatomy
    runtime: Runtime
    blocks_globs: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def num_classes(self) -> int | None:
        return self.loaded.num_classes

    def data(self, spec: str, limit: int | None = None, seed: int = 0, class_map: str | None = None) -> DataSource:
        """Open ``--data SPEC`` with this model's preprocessing; checks that labels fit the classifier."""
        source = open_data(spec, self.preprocessing, self.num_classes, class_map, seed)
        check_labels_fit(source, self.num_classes)
        return limit_source(source, limit, seed)

    def loader(self, source: DataSource, batch_size: int = 64, workers: int | None = None) -> DataLoader:
        return make_loader(source, batch_size, workers, self.runtime.device)

    def describe(self) -> dict[str, Any]:
        """Provenance for reports and recordings."""
        return {
            "model": str(self.loaded.spec),
            "checkpoint": self.loaded.checkpoint,
            "checkpoint_sha256": self.loaded.checkpoint_sha256,
            "preprocessing": self.preprocessing.to_dict(),
        }


def open_probe(
    model: str,
    checkpoint: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    ema: bool = False,
    trust_checkpoint: bool = False,
    blocks: list[str] | None = None,
    input_size: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> Probe:
    """Load MODEL, resolve its preprocessing (with overrides) and find its residual blocks."""
    runtime = make_runtime(device, precision)
    loaded = load_model(model, LoadOptions(checkpoint, pretrained, num_classes, dict(model_kwargs or {}), ema,
                                           trust_checkpoint))
    pre = override_preprocessing(default_preprocessing(loaded), input_size, mean, std, crop_pct, interpolation)
    anatomy = discover_blocks(loaded.model, pre.input_size, blocks)
    loaded.model.requires_grad_(False)
    runtime.prepare(loaded.model)
    return Probe(loaded, pre, anatomy, runtime, blocks)
