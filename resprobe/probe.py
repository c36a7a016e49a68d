"""One object that holds what every command starts from: the model, its preprocessing, its blocks,
and where it runs. The command line builds one per invocation; a notebook can do the same::

    from resprobe.probe import open_probe
    probe = open_probe("timm:resnet18", num_classes=10, input_size="32")
    probe.anatomy.names                     # ['layer1.0', 'layer1.1', ...]
    source = probe.data("cifar10:~/data", limit=500)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from resprobe.data.datasets import DataSource
from resprobe.data.loaders import limit_source, make_loader
from resprobe.data.preprocessing import (
    Preprocessing,
    contradicted_preprocessing,
    contradiction_warning,
    default_preprocessing,
    describe_preprocessing,
    override_preprocessing,
    upscale_warning,
)
from resprobe.data.specs import check_labels_fit, open_data, warn_notes
from resprobe.errors import ModelError
from resprobe.models.blocks import Anatomy, discover_blocks, require_blocks
from resprobe.models.build import built_input_size, input_size_mismatch
from resprobe.models.fingerprint import weights_fingerprint
from resprobe.models.loading import LoadedModel, LoadOptions, load_model
from resprobe.runtime import Runtime, make_runtime

# Notes for the user (the preprocessing used): the command line shows them on stderr unless --quiet.
log = logging.getLogger("resprobe")


@dataclass
class Probe:
    loaded: LoadedModel
    preprocessing: Preprocessing
    runtime: Runtime
    blocks_globs: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sample_shape: tuple[int, ...] | None = None  # the data's own (C, H, W) when it is never resized
    input_size_given: bool = False  # --input-size: the user chose it, upscaling is not a surprise
    decode: str = "auto"  # where image files are decoded: "auto" (on CUDA: the device), "cpu", "device"
    offline: bool = False  # --offline: hfds: hub datasets from the local cache only, as the weights
    loss_fn: Any = None  # per-sample loss (outputs, targets) -> [B] of every pass (rp.align(loss=)); None: cross-entropy
    _anatomy: Anatomy | None = field(default=None, repr=False)
    _noted: set[str] = field(default_factory=set, repr=False)

    @property
    def anatomy(self) -> Anatomy:
        """The model's blocks, discovered on first use with one dummy sample of the shape the data
        really has (arrays are never resized, so that can differ from the model's input size)."""
        if self._anatomy is None:
            shape = self.sample_shape or self.preprocessing.input_size
            self._anatomy = discover_blocks(self.loaded.model, shape, self.blocks_globs)
        return self._anatomy

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def num_classes(self) -> int | None:
        return self.loaded.num_classes

    def data(self, spec: str, limit: int | None = None, seed: int = 0, class_map: str | None = None,
             labels: str | None = None) -> DataSource:
        """Open ``--data SPEC`` with this model's preprocessing; checks that labels fit the classifier."""
        source = open_data(spec, self.preprocessing, self.num_classes, class_map, seed, labels=labels,
                           offline=self.offline, model_names=self.loaded.classes)
        check_labels_fit(source, self.num_classes)
        warn_notes(source)  # e.g. a class count that differs from the head: said by every command
        if source.in_memory and self.sample_shape is None and len(source):
            self.sample_shape = tuple(source.dataset[0][0].shape)
            if len(self.sample_shape) == 3:  # arrays are never resized: a fixed-size model must fit them
                _require_fitting_size(self.loaded, self.sample_shape[-2:], f"the data ({spec})")
        if not self.input_size_given:
            message = upscale_warning(source, self.preprocessing)
            if message:
                warnings.warn(message, stacklevel=2)
        self._note(describe_preprocessing(source, self.preprocessing))
        if limit is not None and limit > len(source):  # capped, as documented; said, not silent
            self._note(f"{spec} holds {len(source)} samples, fewer than the {limit} asked for: all {len(source)} "
                       "are used")
        return limit_source(source, limit, seed)

    @property
    def preprocessing_used(self) -> Preprocessing:
        """The preprocessing the data really went through: arrays are never resized, so their own size
        is the input size (a checkpoint written from a run on 32×32 arrays records input size 32)."""
        shape = self.sample_shape
        if shape is None or tuple(shape) == tuple(self.preprocessing.input_size) or len(shape) != 3:
            return self.preprocessing
        return replace(self.preprocessing, input_size=tuple(int(v) for v in shape), resize_size=None)

    def _note(self, message: str) -> None:
        if message not in self._noted:  # once per command, however often the same kind of data opens
            self._noted.add(message)
            log.info(message)

    def loader(self, source: DataSource, batch_size: int = 64, workers: int | None = None) -> Iterable:
        """Batches of (images, labels, indices); image files are decoded on the device where
        :mod:`resprobe.data.decode` can (CUDA, by default), in CPU worker processes otherwise."""
        from resprobe.data.decode import device_loader

        on_device = device_loader(source, self.preprocessing, self.runtime.device, batch_size, workers, self.decode)
        return on_device if on_device is not None else make_loader(source, batch_size, workers, self.runtime.device)

    def describe(self) -> dict[str, Any]:
        """Provenance for reports and recordings."""
        return {
            "model": str(self.loaded.spec),
            "checkpoint": self.loaded.checkpoint,
            "checkpoint_sha256": self.loaded.checkpoint_sha256,
            "weights_sha256": self.loaded.weights_sha256,
            "preprocessing": self.preprocessing_used.to_dict(),
        }


def _warn_contradicted(loaded: LoadedModel, pre: Preprocessing, *given: Any) -> None:
    """An option that contradicts a resprobe checkpoint's recorded preprocessing is used (the user may
    mean it), but said: the model was made, and its figures are usually wanted, with the recorded one."""
    if loaded.preprocessing:
        found = contradicted_preprocessing(Preprocessing.from_dict(loaded.preprocessing), pre, *given)
        message = contradiction_warning(loaded.checkpoint or str(loaded.spec), found)
        if message:
            warnings.warn(message, stacklevel=3)


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
    offline: bool = False,
    for_training: bool = False,
    seed: int = 0,
) -> Probe:
    """Load MODEL and resolve its preprocessing (with overrides); ``probe.anatomy`` has its blocks.

    Random weights are warned about (figures of an untrained network are rarely meant), except
    ``for_training``: a model about to be trained (``finetune`` from scratch) starts from them.
    ``seed`` (``--seed``) seeds the initialization of whatever no weights cover."""
    runtime = make_runtime(device, precision)
    loaded = load_model(model, LoadOptions(checkpoint, pretrained, num_classes, dict(model_kwargs or {}), ema,
                                           trust_checkpoint, offline, seed))
    loaded.weights_sha256 = weights_fingerprint(loaded, ema, seed)  # as loaded, before anything moves them
    if not for_training:  # finetune makes its ranks' weights equal itself
        _check_same_weights_on_every_rank(loaded.weights_sha256)
    pre = override_preprocessing(built_size_preprocessing(loaded), input_size, mean, std, crop_pct, interpolation)
    _require_fitting_size(loaded, tuple(pre.input_size[-2:]), f"--input-size {input_size}" if input_size else
                          "its default input size")
    _warn_contradicted(loaded, pre, input_size, mean, std, crop_pct, interpolation)
    require_blocks(loaded.model, blocks)  # a model without residual blocks fails now, not later
    if randomly_initialized(loaded, pretrained) and not for_training:
        warnings.warn(random_weights_message(loaded), stacklevel=2)
    loaded.model.requires_grad_(False)
    runtime.prepare(loaded.model)
    return Probe(loaded, pre, runtime, blocks, input_size_given=bool(input_size), offline=offline)


def _check_same_weights_on_every_rank(weights_sha256: str) -> None:
    """Under torchrun every rank must analyse the same network, or the merged figures mix networks
    (a model whose own code draws its initialization from an unseeded source)."""
    from resprobe import distributed
    from resprobe.errors import ModelError

    if not distributed.in_lockstep():
        return
    fingerprints = distributed.all_gather(weights_sha256)
    if len(set(fingerprints)) > 1:
        raise ModelError("the torchrun processes built different weights (weights_sha256 "
                         f"{', '.join(f[:12] + '…' for f in dict.fromkeys(fingerprints))}); give the weights as "
                         "--checkpoint PATH or make the model's construction deterministic")


def built_size_preprocessing(loaded: LoadedModel) -> Preprocessing:
    """The model's preprocessing at the input size it is built for: a ViT built with
    ``--model-kwargs '{"img_size": 32}'`` takes 32×32 by default, whatever its pretrained config says."""
    pre = default_preprocessing(loaded)
    built = built_input_size(loaded.model)
    if loaded.preprocessing or built is None or tuple(pre.input_size[-2:]) == built:
        return pre
    return replace(pre, input_size=(pre.input_size[0], *built), resize_size=None)


def _require_fitting_size(loaded: LoadedModel, size: tuple[int, ...], given: str) -> None:
    """A fixed-size model (ViT, Swin) at another size: one line naming --model-kwargs, not timm's assert."""
    message = input_size_mismatch(loaded, int(size[0]), int(size[1]), given)
    if message:
        raise ModelError(message)


def randomly_initialized(loaded: LoadedModel, pretrained: bool = False) -> bool:
    """No weights given: no checkpoint, no --pretrained, no torchvision weights enum."""
    return not pretrained and loaded.checkpoint is None and loaded.torchvision_weights is None


def random_weights_message(loaded: LoadedModel) -> str:
    """No weights given: every figure would describe an untrained network, which is rarely meant."""
    name = str(loaded.spec)
    unless = f", unless {name} loads weights itself" if loaded.spec.source == "callable" else ""
    return (f"{name} is randomly initialized: no weights were given{unless} (pass --checkpoint PATH, --pretrained, "
            "or a checkpoint as MODEL); its figures describe an untrained network") + _zero_branch_note(loaded.model)


# A scale this small at initialization (ConvNeXt's and CaiT's layer scale start at 1e-6 or 1e-5) makes
# a branch's output negligible against the stream it is added to.
_TINY_SCALE = 1e-4


def zero_initialized_scales(model: torch.nn.Module) -> list[str]:
    """Parameters that scale residual branches and start at (nearly) zero: the last norm's weight under
    timm's ``zero_init_last`` (ResNet, RegNetY, CSPNet), a layer scale (``gamma``, ``ls1.gamma``), a
    zeroed last convolution. Found by value, not by name: a 0-D/1-D parameter (not a bias) all within
    ``_TINY_SCALE`` of zero, or any weight that is exactly zero; a random network has no others."""
    found = []
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.numel() == 0 or name.endswith("bias") or param.is_meta:
            continue
        largest = float(param.detach().abs().max())
        if (param.dim() <= 1 and largest <= _TINY_SCALE) or (name.endswith("weight") and largest == 0.0):
            found.append(name)
    return found


def _zero_branch_note(model: torch.nn.Module) -> str:
    """Why a random model's figures are all '—' and Δ = 0: its branches start (nearly) silent."""
    scales = zero_initialized_scales(model)
    if not scales:
        return ""
    example = ", ".join(scales[:2]) + (f" and {len(scales) - 2} more" if len(scales) > 2 else "")
    return ("; moreover its residual branches end in a zero-initialized norm or a tiny layer scale "
            f"({example}), so every branch outputs (nearly) zero: alignments show — and removal costs are ≈ 0 "
            "until the model is trained")
