"""Fine-tuning any resprobe-loadable model (docs/reference.md ``finetune``): original, pruned, shared, or
randomly initialized. From a notebook::

    from resprobe.probe import open_probe
    from resprobe.train import FinetuneOptions, finetune
    probe = open_probe("shared.pt")
    result = finetune(probe, probe.data("cifar10:~/data:train"), probe.data("cifar10:~/data"),
                      FinetuneOptions(out="ft.pt", max_steps=300, lr=0.01))

Defaults: SGD with momentum 0.9 (Nesterov), weight decay 5e-4 on every parameter of two or more
dimensions (none on norms and biases), no warmup, cosine decay to zero over all steps, light
augmentation (horizontal flip and a random crop after zero-padding by 1/8 of the side, applied to the
normalized batch in the loop, so in-memory arrays are augmented too).

``--out`` always holds the last state: a resprobe checkpoint (usable as MODEL) that also carries what
``resume`` needs — optimizer, scheduler and gradient-scaler state, step, epoch and position in the
epoch, the RNG states — as tensors and plain containers (``torch.load(weights_only=True)`` reads it).
A run resumed from it continues exactly where it stopped: on the CPU, the result equals an
uninterrupted run bit for bit. The data order of epoch e is a permutation seeded by (seed, e), and
both augmentations are drawn per (seed, epoch, sample), so neither depends on worker processes,
on where a run was interrupted, or on how a step's samples are split between processes (torchrun:
DistributedDataParallel, ``batch_size`` per process; see :mod:`resprobe.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from resprobe import distributed
from resprobe.data.datasets import DataSource, IndexedDataset, TensorImages
from resprobe.data.preprocessing import Preprocessing
from resprobe.data.loaders import limit_source, make_loader
from resprobe.errors import BadValue
from resprobe.evaluate import EvalResult, evaluate
from resprobe.models.checkpoints import is_resprobe_checkpoint, read_checkpoint, save_resprobe_checkpoint
from resprobe.models.build import load_weights
from resprobe.runtime import CompiledOrEager
from resprobe.share import check_out_path, check_recalibrate_scope, recalibrate

AUGMENTS = ("none", "light", "timm")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
# 2: the RNG state no longer holds a batch-augmentation generator (augmentation is drawn per sample);
# version-1 files resume (their generator is ignored), and an older resprobe refuses version 2.
STATE_VERSION = 2
_SYNC_EVERY = 10  # steps between reading the loss back from the device (progress, divergence check)


# --------------------------------------------------------------------------------------------------
# Options, progress and results


@dataclass
class FinetuneOptions:
    """The ``finetune`` command's options. ``lr`` and ``weight_decay`` default by optimizer (SGD:
    0.01 and 5e-4; AdamW: 1e-3 and 0.05). Without ``epochs`` and ``max_steps``: one epoch."""

    out: str | Path
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_steps: int = 0
    augment: str = "light"
    recalibrate: int | None = None
    recalibrate_scope: str = "all"
    batch_size: int = 64
    workers: int | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    compile: bool = False  # torch.compile the training forward/backward (eager on failure)
    sync_bn: bool = False  # torchrun: BatchNorm statistics over the global batch
    accum_steps: int = 1  # micro-batches of batch_size per optimizer step (gradient accumulation)
    val_every: int | None = None  # also validate (and save the resumable state) every N steps inside an epoch

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]

    def validate(self) -> FinetuneOptions:
        if self.epochs is not None and self.max_steps is not None:
            raise BadValue("give --epochs or --max-steps, not both")
        if self.epochs is not None and self.epochs < 1:
            raise BadValue(f"--epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise BadValue(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise BadValue(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.augment not in AUGMENTS:
            raise BadValue(f"--augment {self.augment!r}: choose one of {', '.join(AUGMENTS)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise BadValue(f"--lr must be a positive number, got {self.lr}")
        if not (self.decay >= 0 and math.isfinite(self.decay)):
            raise BadValue(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise BadValue(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.warmup_steps < 0:
            raise BadValue(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        if self.recalibrate is not None and self.recalibrate < 1:
            raise BadValue(f"--recalibrate must be at least 1, got {self.recalibrate}")
        check_recalibrate_scope(self.recalibrate_scope)
        if self.batch_size < 1:
            raise BadValue(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.accum_steps < 1:
            raise BadValue(f"--accum-steps must be at least 1, got {self.accum_steps}")
        if self.val_every is not None and self.val_every < 1:
            raise BadValue(f"--val-every must be at least 1, got {self.val_every}")
        if self.resume and self.overwrite:
            raise BadValue("give --resume or --overwrite, not both")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues."""
        return {"epochs": self.epochs, "max_steps": self.max_steps, "lr": self.learning_rate,
                "optimizer": self.optimizer, "momentum": self.momentum, "weight_decay": self.decay,
                "warmup_steps": self.warmup_steps, "augment": self.augment, "recalibrate": self.recalibrate,
                "recalibrate_scope": self.recalibrate_scope, "batch_size": self.batch_size, "seed": self.seed,
                "accum_steps": self.accum_steps, "sync_bn": self.sync_bn, "val_every": self.val_every}


# Keys added to the resume fingerprint later: a checkpoint without them ran with these values.
_FINGERPRINT_DEFAULTS = {"accum_steps": 1, "sync_bn": False, "world_size": 1, "val_every": None}


@dataclass
class TrainState:
    """Where a run is; what ``on_step`` and ``stop`` callbacks see. ``loss`` is the mean training loss
    of the current epoch so far (read from the device every few steps, ``None`` before)."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    position: int = 0
    steps_per_epoch: int = 0
    loss: float | None = None
    lr: float = 0.0


@dataclass
class FinetuneResult:
    steps: int
    epochs: int
    train_loss: float | None
    val: dict[str, float] | None
    out: str
    best: str | None
    best_val: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    recalibrated: int = 0
    world_size: int = 1  # processes (torchrun); each took --batch-size samples per micro-step
    global_batch_size: int | None = None  # samples per optimizer step: world_size × batch_size × accum_steps
    steps_per_epoch: int | None = None  # optimizer steps in a whole epoch (a history row may end one early)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C honoured after the run's state was saved at ``step`` of ``total`` into ``out`` (``--resume``
    continues it). A KeyboardInterrupt, as library callers expect; an interrupt before the first step
    saves nothing and stays a plain KeyboardInterrupt."""

    def __init__(self, step: int, total: int, out: Path):
        super().__init__(f"interrupted at step {step} of {total}: the state is saved in {out}")
        self.step, self.total, self.out = step, total, out


def check_new_out(out: str | Path, overwrite: bool = False) -> Path:
    """``--out`` of a run that starts: as :func:`check_out_path`, and an existing file may be a run to resume."""
    path = Path(out).expanduser()
    if path.is_file() and not overwrite:
        raise BadValue(f"--out {path} already exists; continue the interrupted run with --resume, or pass "
                       "--overwrite to replace it")
    return check_out_path(path, overwrite)


def best_path(out: str | Path) -> Path:
    """``PATH.best.pt`` beside ``--out``: ``ft.pt`` → ``ft.best.pt``; a name without ``.pt`` gets it appended."""
    out = Path(out)
    if out.suffix in (".pt", ".pth"):
        return out.with_name(out.stem + ".best" + out.suffix)
    return out.with_name(out.name + ".best.pt")


# --------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model: nn.Module, options: FinetuneOptions) -> torch.optim.Optimizer:
    """Weight decay on every parameter of two or more dimensions; none on norms and biases (1-D)."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():  # shared tensors come once
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": options.decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise BadValue("the model has no parameters to train")
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=options.learning_rate)
    return torch.optim.SGD(groups, lr=options.learning_rate, momentum=options.momentum,
                           nesterov=options.momentum > 0)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


# --------------------------------------------------------------------------------------------------
# Data order and augmentation


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of epoch ``epoch``: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch))).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (the last partial batch is dropped), or one batch when n < batch size."""
    return max(1, n // batch_size)


def _sample_keys(seed: int, epoch: int, indices: Tensor) -> np.ndarray:
    """64 random bits per sample from (seed, epoch, sample index) alone (splitmix64): the same draws
    whichever process, batch or position a sample lands in."""
    with np.errstate(over="ignore"):
        golden = np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
        x = indices.cpu().numpy().astype(np.uint64) * golden + np.array([_epoch_seed(seed, epoch)], np.uint64)
        x = x + golden
        x = (x ^ (x >> np.uint64(30))) * np.array([0xBF58476D1CE4E5B9], np.uint64)
        x = (x ^ (x >> np.uint64(27))) * np.array([0x94D049BB133111EB], np.uint64)
        return x ^ (x >> np.uint64(31))


def light_augment_samples(images: Tensor, seed: int, epoch: int, indices: Tensor) -> Tensor:
    """The light augmentation: horizontal flip (p = 0.5) and a random crop of the original size after
    zero-padding by 1/8 of each side, on a normalized [B, C, H, W] batch (zero = the normalization
    mean). Each sample's flip and shift are drawn from (seed, epoch, its index), so N processes with
    batch B augment exactly as one process with batch N·B."""
    _b, _c, h, w = images.shape
    keys = _sample_keys(seed, epoch, indices)
    flips = torch.from_numpy((keys & np.uint64(1)).astype(np.int64)) == 1
    dy = torch.from_numpy(((keys >> np.uint64(8)) % np.uint64(2 * (h // 8) + 1)).astype(np.int64))
    dx = torch.from_numpy(((keys >> np.uint64(32)) % np.uint64(2 * (w // 8) + 1)).astype(np.int64))
    return _flip_and_shift(images, flips, dy, dx)


def _flip_and_shift(images: Tensor, flips: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Flip the samples marked in ``flips``, then crop each at (dy, dx) from the zero-padded batch."""
    b, _c, h, w = images.shape
    pad_h, pad_w = h // 8, w // 8
    images = torch.where(flips.view(b, 1, 1, 1).to(images.device), images.flip(3), images)
    if pad_h == 0 and pad_w == 0:
        return images
    padded = F.pad(images, (pad_w, pad_w, pad_h, pad_h))
    rows = (dy[:, None] + torch.arange(h)).to(images.device)
    cols = (dx[:, None] + torch.arange(w)).to(images.device)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices split by the channel slice: the result is [B, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class SeededTrainTransform(Dataset):
    """Items (training-transformed image, label, index) with randomness seeded per (seed, epoch,
    sample): the same augmentation whatever the worker count and wherever a run resumed.

    ``raw(i)`` gives (PIL image, label). Set ``epoch`` before each epoch's loader is created.
    """

    def __init__(self, raw: Callable[[int], tuple[Any, int]], length: int, transform: Callable, seed: int):
        self.raw, self.length, self.transform, self.seed = raw, length, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, label = self.raw(index)
        sample_seed = (_epoch_seed(self.seed, self.epoch) * 1_000_000_007 + index) % (2**63)
        with torch.random.fork_rng(devices=[]):
            py_state, np_state = random.getstate(), np.random.get_state()
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % (2**32))
            try:
                tensor = self.transform(image)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return tensor, int(label), index


class _SubsetItems:
    def __init__(self, inner: Callable[[int], tuple[Any, int]], indices: list[int]):
        self.inner, self.indices = inner, indices

    def __call__(self, i: int) -> tuple[Any, int]:
        return self.inner(self.indices[i])


class _FileItems:
    """An ImageFolder / CIFAR dataset's own (PIL image, label), its evaluation transform taken off."""

    def __init__(self, base: Any):
        self.base = copy.copy(base)
        self.base.transform = None

    def __call__(self, i: int) -> tuple[Any, int]:
        return self.base[i]


class _ArrayItems:
    """Arrays: back to 8-bit images, so they go through the same transform as image files."""

    def __init__(self, dataset: TensorImages, pre: Preprocessing):
        self.dataset = dataset
        self.mean = torch.tensor(pre.mean).view(-1, 1, 1)
        self.std = torch.tensor(pre.std).view(-1, 1, 1)

    def __call__(self, i: int) -> tuple[Any, int]:
        from torchvision.transforms.functional import to_pil_image

        image, label, _ = self.dataset[i]
        return to_pil_image((image * self.std + self.mean).clamp(0, 1)), label


def _raw_items(dataset: Dataset, pre: Preprocessing) -> Callable[[int], tuple[Any, int]]:
    """(PIL image, label) by index for a resprobe dataset, before any evaluation transform (picklable,
    for loader worker processes)."""
    if isinstance(dataset, Subset):
        return _SubsetItems(_raw_items(dataset.dataset, pre), list(dataset.indices))
    if isinstance(dataset, IndexedDataset) and hasattr(dataset.base, "transform"):
        return _FileItems(dataset.base)
    if isinstance(dataset, TensorImages):
        return _ArrayItems(dataset, pre)
    raise BadValue(f"--augment timm does not support this data ({type(dataset).__name__}); use light or none")


def timm_train_transform(pre: Preprocessing) -> Callable:
    """timm's training transform at the model's input size: RandomResizedCrop (scale 0.08–1),
    horizontal flip, colour jitter 0.4, normalization."""
    from timm.data import create_transform

    return create_transform(input_size=pre.input_size, is_training=True, mean=pre.mean, std=pre.std,
                            interpolation=pre.interpolation)


def _training_dataset(source: DataSource, options: FinetuneOptions, pre: Preprocessing) -> Dataset:
    if options.augment != "timm":
        return source.dataset
    return SeededTrainTransform(_raw_items(source.dataset, pre), len(source), timm_train_transform(pre), options.seed)


# --------------------------------------------------------------------------------------------------
# Checkpoint state


def _cpu(obj: Any) -> Any:
    """Tensors to the CPU inside plain containers (optimizer states live beside the parameters)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


@dataclass
class _Run:
    """Everything a run carries from step to step (and into its checkpoint)."""

    state: TrainState
    loss_sum: Tensor  # float64 sum of per-sample losses over the current epoch
    loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    last_val: dict[str, float] | None = None
    recalibrated: int = 0
    complete: bool = False


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])  # a version-1 file's "augment" generator state is not used
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _rank_state(run: _Run) -> dict[str, Any]:
    """What differs between the processes of a torchrun run: each one's share of the epoch's loss sum
    and its random number generators (dropout, drop-path)."""
    return _cpu({"loss_sum": run.loss_sum, "loss_count": run.loss_count, "rng": _rng_state()})


def _training_payload(run: _Run, options: FinetuneOptions, data: dict[str, Any], optimizer: torch.optim.Optimizer,
                      scheduler: Any, scaler: Any, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The resume state; ``ranks`` (torchrun): every process's :func:`_rank_state`, in rank order, so
    that a resume on as many processes gives each its own back (``loss_sum`` and ``rng`` are rank 0's)."""
    s = run.state
    return _cpu({
        "version": STATE_VERSION,
        "options": options.fingerprint(),
        "data": data,
        "cwd": os.getcwd(),  # what relative data paths in ``data`` are relative to (for --resume)
        "step": s.step, "total_steps": s.total_steps, "epoch": s.epoch, "position": s.position,
        "steps_per_epoch": s.steps_per_epoch,
        "data_order": {"seed": options.seed, "epoch": s.epoch, "position": s.position},
        "loss_sum": run.loss_sum, "loss_count": run.loss_count,
        "history": run.history, "best": run.best, "last_val": run.last_val,
        "recalibrated": run.recalibrated, "complete": run.complete,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "ranks": ranks,
    })


def _read_resume_state(out: Path, options: FinetuneOptions, data: dict[str, Any], task: Any) -> dict[str, Any]:
    if not out.exists():
        raise BadValue(f"--resume: {out} does not exist; run without --resume to start")
    training = task.read_training(out)
    if int(training.get("version", 0)) > STATE_VERSION:
        raise BadValue(f"--resume: {out} was written by a newer resprobe")
    for key, value in {**options.fingerprint(), **data}.items():
        old = {**training["options"], **training["data"]}.get(key, _FINGERPRINT_DEFAULTS.get(key))
        if key in ("train", "val") and _same_path(old, value, training.get("cwd")):
            continue
        if old != value:
            raise BadValue(f"--resume: {key} is {value} but the interrupted run used {old}; "
                           "resume with the same options, or start anew with --overwrite")
    return training


def _refuse_removing_the_model(out: Path, best_file: Path, checkpoint: str | None) -> None:
    """``--overwrite`` removes a stale ``PATH.best.pt`` when the run starts. When that file is the MODEL
    being fine-tuned (``finetune ft.best.pt --out ft.pt --overwrite``), removing it would lose the
    user's model: on a failure, or for good without --val-data (no new best is written)."""
    if checkpoint and best_file.exists() and Path(checkpoint).expanduser().exists() \
            and os.path.samefile(best_file, Path(checkpoint).expanduser()):
        raise BadValue(f"--out {out}: its best checkpoint {best_file} is MODEL itself, which --overwrite would "
                       "remove; choose another --out")


def _same_path(stored: Any, given: Any, stored_cwd: str | None) -> bool:
    """Whether a stored data path (relative to the directory the run was in) and a given one (relative
    to this directory) name the same file or folder, so --resume works from any directory."""
    if not isinstance(stored, str) or not isinstance(given, str) or not stored_cwd:
        return False
    stored_path = os.path.join(stored_cwd, os.path.expanduser(stored))
    given_path = os.path.expanduser(given)
    try:
        return os.path.samefile(stored_path, given_path)
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# Ctrl-C: finish the step, save, then stop


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """SIGINT sets a flag the loop checks after each step (a second Ctrl-C stops at once)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------------
# The loop


class TrainTask:
    """What ``finetune`` does differently for a kind of model: how samples become batches and a loss, how
    the model is validated, and how its state is written and read back. This one is the vision
    classifiers' (resprobe checkpoints, cross-entropy on labels, augmentation); the language models'
    (:class:`resprobe.train_lm.LMTask`) keeps the same loop, data order, schedule and resume rules."""

    def __init__(self, probe: Any):
        self.probe = probe

    def best_path(self, out: Path) -> Path:
        return best_path(out)

    def check_new(self, out: Path, best_file: Path, options: FinetuneOptions) -> None:
        """A run that starts: ``--out`` and the best file may be written (and are not MODEL itself)."""
        check_new_out(out, options.overwrite)
        check_out_path(best_file, options.overwrite, option="the best checkpoint")
        _refuse_removing_the_model(out, best_file, self.probe.loaded.checkpoint)

    def remove_stale_best(self, best_file: Path) -> None:
        best_file.unlink(missing_ok=True)

    def data_info(self, train: DataSource, val: DataSource | None) -> dict[str, Any]:
        """What a resumed run must share with the run it continues, besides the options."""
        return {}

    def training_dataset(self, train: DataSource, options: FinetuneOptions) -> Dataset:
        loaded = self.probe.loaded
        if loaded.classes is None and train.label_names and len(train.label_names) == self.probe.num_classes:
            # The training data's class names (class folders, CIFAR) go into every checkpoint written, so
            # that later commands match class folders to the model's classes by name, not by sorted order.
            loaded.classes = list(train.label_names)
        return _training_dataset(train, options, self.probe.preprocessing)

    def loader(self, source: DataSource, dataset: Dataset, batch_size: int, options: FinetuneOptions, runtime: Any,
               generator: torch.Generator, drop_last: bool = False) -> Iterator:
        return make_loader(replace(source, dataset=dataset), batch_size, options.workers, runtime.device,
                           generator=generator, drop_last=drop_last)

    def augment(self, inputs: Tensor, index: Tensor, epoch: int, options: FinetuneOptions, runtime: Any) -> Tensor:
        if options.augment == "light":
            # On the device: the same result as on the host (index arithmetic only), no host work.
            # train_step then lays the augmented batches out for the device (channels_last on CUDA).
            return light_augment_samples(inputs.to(runtime.device, non_blocking=True), options.seed, epoch, index)
        return inputs

    def loss(self, model: Callable[..., Any], inputs: Tensor, targets: Tensor, runtime: Any) -> Tensor:
        """The batch's mean loss (the quantity whose gradient a step follows)."""
        inputs, targets = runtime.batch(inputs), targets.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits = model(inputs)
        return F.cross_entropy(logits.float(), targets)

    def evaluate(self, model: nn.Module, loader: Iterator, runtime: Any,
                 progress: Callable[[int], None] | None) -> dict[str, Any]:
        """Validation figures; ``loss`` picks the best state."""
        result: EvalResult = evaluate(model, loader, runtime, progress)
        return {"loss": result.loss, "acc": result.acc}

    def save(self, path: Path, model: nn.Module, meta: dict[str, Any], training: dict[str, Any] | None) -> None:
        """Write the model (``training``: with the resume state) to ``path``."""
        probe = self.probe
        save_resprobe_checkpoint(path, probe.loaded, model, recipes=probe.loaded.recipes,
                                 preprocessing=probe.preprocessing_used.to_dict(), meta=meta,
                                 extra={"training": training} if training is not None else None)

    def read_training(self, out: Path) -> dict[str, Any]:
        """The resume state in ``out``, with the model's ``state_dict``."""
        obj = read_checkpoint(out)
        training = obj.get("training") if is_resprobe_checkpoint(obj) else None
        if not isinstance(training, dict):
            raise BadValue(f"--resume: {out} is not a checkpoint written by resprobe finetune")
        training["state_dict"] = obj["state_dict"]
        return training


def _result(run: _Run, out: Path, best_file: Path, world_size: int = 1,
            global_batch_size: int | None = None, per_epoch: int | None = None) -> FinetuneResult:
    last = run.history[-1] if run.history else None
    return FinetuneResult(
        steps=run.state.step, epochs=run.state.epoch,
        train_loss=last["train_loss"] if last else None,
        val=run.last_val, out=str(out), best=str(best_file) if run.best else None, best_val=run.best,
        history=run.history, complete=run.complete, recalibrated=run.recalibrated,
        world_size=world_size, global_batch_size=global_batch_size, steps_per_epoch=per_epoch,
    )


def finetune(
    probe: Any,
    train: DataSource,
    val: DataSource | None,
    options: FinetuneOptions,
    *,
    stop: Callable[[TrainState], bool] | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    eval_progress: Callable[[int], None] | None = None,
    recalibrate_progress: Callable[[int], None] | None = None,
    task: TrainTask | None = None,
) -> FinetuneResult:
    """Fine-tune ``probe.model`` on ``train`` (validating on ``val`` before the first step and after
    each epoch; ``history[0]`` is that step-0 row, and ``best`` can be the starting model).

    ``stop(state)`` is asked after every step; when it says yes the run saves its state to
    ``options.out`` and returns with ``complete=False`` (``resume=True`` continues it). Ctrl-C does the
    same and then raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). ``task``: what differs
    for a kind of model (default: vision classifiers, :class:`TrainTask`).
    """
    options.validate()
    task = task or TrainTask(probe)
    model, runtime = probe.model, probe.runtime
    out = Path(options.out).expanduser()
    best_file = task.best_path(out)
    n_train = len(train)
    if n_train == 0:
        raise BadValue(f"--data {train.spec} holds no samples")
    world = distributed.world()
    data_info = {"train": train.spec, "n_train": n_train, "val": val.spec if val else None,
                 "n_val": len(val) if val else None, "world_size": world.size, **task.data_info(train, val)}
    # torchrun: --batch-size per process (timm's convention); one step takes the global batch.
    global_batch = options.batch_size * options.accum_steps * world.size
    if global_batch > n_train and global_batch != options.batch_size:
        raise BadValue(f"--data {train.spec} holds {n_train} samples, fewer than one step's {global_batch} "
                       f"({world.size} processes × --batch-size {options.batch_size} × --accum-steps "
                       f"{options.accum_steps})")
    resumed = _read_resume_state(out, options, data_info, task) if options.resume else None
    if resumed is None:
        task.check_new(out, best_file, options)
        if world.main:
            task.remove_stale_best(best_file)  # a stale best from an earlier run would be misleading

    per_epoch = steps_per_epoch(n_train, global_batch)
    total = options.max_steps or per_epoch * (options.epochs or 1)
    # Loss sums stay on the device (no sync per step), in float64 where the device has it.
    sum_dtype = torch.float32 if runtime.device.type == "mps" else torch.float64
    run = _Run(TrainState(0, total, 0, 0, per_epoch), torch.zeros((), dtype=sum_dtype, device=runtime.device))

    model.requires_grad_(True)  # open_probe freezes everything for analysis
    optimizer = make_optimizer(model, options)
    scheduler = make_scheduler(optimizer, total, options.warmup_steps)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.precision == "fp16" else None

    if resumed is not None:
        load_weights(model, resumed["state_dict"], str(out))
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        own = resumed["ranks"][world.rank] if resumed.get("ranks") else resumed  # the world size is the same
        _restore_rng(own["rng"])
        run.state = TrainState(resumed["step"], total, resumed["epoch"], resumed["position"], per_epoch)
        run.loss_sum = own["loss_sum"].to(runtime.device, sum_dtype)
        run.loss_count = int(own["loss_count"])
        run.history, run.best, run.last_val = list(resumed["history"]), resumed["best"], resumed["last_val"]
        run.recalibrated, run.complete = int(resumed["recalibrated"]), bool(resumed["complete"])
        if run.complete:
            model.eval()
            return _result(run, out, best_file, world.size, min(global_batch, n_train), per_epoch)
    else:
        torch.manual_seed(options.seed)  # dropout and drop-path draw from the global generator
        if options.recalibrate:
            run.recalibrated = _recalibrate(model, train, options, runtime, recalibrate_progress)

    dataset = task.training_dataset(train, options)
    # torchrun: each rank validates its share of the batches; evaluate() sums over the ranks.
    val_loader = None
    if val:
        shard = distributed.shard_source(val, options.batch_size)
        val_loader = task.loader(shard, shard.dataset, options.batch_size, options, runtime, torch.Generator())

    def save_last() -> None:
        ranks = distributed.all_gather(_rank_state(run)) if world.distributed else None  # every rank calls it
        if not world.main:  # rank 0 writes the checkpoints
            return
        task.save(out, model, {"finetune": {"steps": run.state.step, "epochs": run.state.epoch,
                                            "complete": run.complete}},
                  _training_payload(run, options, data_info, optimizer, scheduler, scaler, ranks))

    def validate(record: dict[str, Any]) -> None:
        """Evaluate on ``val`` into ``record``; the model becomes the best one when strictly better."""
        if val_loader is None:
            return
        s = run.state
        model.eval()
        result = task.evaluate(model, val_loader, runtime, eval_progress)
        model.train()
        run.last_val = dict(result)
        record.update({f"val_{key}": value for key, value in result.items()})
        if run.best is None or result["loss"] < run.best["loss"]:
            run.best = {"epoch": s.epoch, "step": s.step, **result}
            if world.main:  # rank 0 writes the checkpoints
                task.save(best_file, model, {"finetune_best": run.best}, None)

    def end_epoch() -> None:
        s = run.state
        # The epoch's last step has just read the (all-ranks) mean loss into s.loss (_check_finite).
        record: dict[str, Any] = {"epoch": s.epoch, "step": s.step, "train_loss": s.loss, "lr": s.lr}
        validate(record)
        run.history.append(record)
        s.epoch += 1
        s.position = 0
        run.loss_sum.zero_()
        run.loss_count = 0
        run.complete = s.step >= s.total_steps
        save_last()

    def mid_epoch() -> None:
        """--val-every: a history row inside the epoch (training loss = the epoch's mean so far), and the
        resumable state saved, so a long epoch leaves a curve and can be continued from here."""
        s = run.state
        s.loss = _check_finite(run, s.step)
        record: dict[str, Any] = {"epoch": s.epoch, "step": s.step, "train_loss": s.loss, "lr": s.lr}
        validate(record)
        run.history.append(record)
        save_last()

    trained: nn.Module = model
    if world.distributed:
        if options.sync_bn:
            model = distributed.convert_sync_batchnorm(model, runtime.device)
        # DDP broadcasts rank 0's parameters and buffers and averages gradients over the ranks.
        from torch.nn.parallel import DistributedDataParallel

        distributed.advance()  # entering a collective (DDP broadcasts rank 0's weights): see should_speak
        trained = DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda"
                                          else None)
    forward = compiled_forward(trained) if options.compile else trained
    try:
        if resumed is None:
            # Step 0: the model training starts from (after --recalibrate), so a fine-tune that only
            # makes it worse still leaves the better start as PATH.best.pt, and the history shows the
            # baseline. After the DDP wrap: its constructor gives every rank rank 0's weights.
            start: dict[str, Any] = {"epoch": 0, "step": 0, "train_loss": None, "lr": None}
            validate(start)
            run.history.append(start)
        with _deferred_interrupt() as interrupted:
            while run.state.step < total:
                stopped = _train_epoch(model, forward, dataset, train, options, runtime, run, optimizer, scheduler,
                                       scaler, end_epoch, on_step, stop, interrupted, world, task, mid_epoch)
                if stopped:
                    save_last()
                    model.eval()
                    if interrupted():
                        raise TrainingInterrupted(run.state.step, total, out)
                    return _result(run, out, best_file, world.size, min(global_batch, n_train), per_epoch)
    finally:
        if options.sync_bn and world.distributed:
            distributed.revert_sync_batchnorm(model)
    model.eval()
    return _result(run, out, best_file, world.size, min(global_batch, n_train), per_epoch)


def _recalibrate(model: nn.Module, train: DataSource, options: FinetuneOptions, runtime: Any,
                 progress: Callable[[int], None] | None) -> int:
    """``--recalibrate N``: re-estimate the norms' statistics on N training images; how many ran.

    The images go in batches of the processes' batch together (N × B, as one process × N·B does);
    under torchrun batch k runs whole on rank k mod N and the ranks' float64 sums are all-reduced
    (:func:`resprobe.share.recalibrate`), so every rank holds one process's statistics up to the
    order of the float64 additions. A batch must stay whole: BatchNorm's statistics in train mode
    are the batch's own."""
    world = distributed.world()
    n = min(int(options.recalibrate or 0), len(train))
    batch_size = options.batch_size * world.size
    chosen = limit_source(train, n, options.seed)
    mine = chosen if not world.distributed else \
        replace(chosen, dataset=Subset(chosen.dataset, distributed.shard_positions(n, batch_size, world)))
    calib = make_loader(mine, batch_size, options.workers, runtime.device, generator=torch.Generator())

    shown = [0]

    def advance(k: int) -> None:  # the bar counts the run's images: this rank's share for every rank
        step = min(n - shown[0], k * world.size)
        shown[0] += step
        if progress and step:
            progress(step)

    seen = recalibrate(model, calib, runtime, max(1, n), options.recalibrate_scope, advance,
                       sum_over=distributed.all_reduce_ if world.distributed else None)
    return int(distributed.all_reduce_sums([seen])[0])


def _train_epoch(model: nn.Module, forward: Callable[[Tensor], Tensor], dataset: Dataset, train: DataSource,
                 options: FinetuneOptions, runtime: Any, run: _Run, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                 end_epoch: Callable[[], None],
                 on_step: Callable[[TrainState], None] | None, stop: Callable[[TrainState], bool] | None,
                 interrupted: Callable[[], bool], world: distributed.World | None = None,
                 task: TrainTask | None = None, mid_epoch: Callable[[], None] | None = None) -> bool:
    """Run the rest of the current epoch; True when asked to stop before the end.

    Step t of an epoch takes the samples ``order[t·G : (t+1)·G]`` of the epoch's permutation, G the
    global batch (processes × --batch-size × --accum-steps); micro-step a of rank r takes the B
    samples at ``t·G + (a·N + r)·B``. So the samples of each step, and (augmentation drawn per sample)
    their images, are the same whatever N and B: N processes × B equal one process × N·B.
    """
    world = world or distributed.World()
    task = task or TrainTask(None)
    s = run.state
    n = len(train)
    accum = options.accum_steps
    batch_size = min(options.batch_size, n) if world.size * accum == 1 else options.batch_size
    step_size = batch_size * accum * world.size
    order = epoch_order(n, options.seed, s.epoch)
    mine = [order[t * step_size + (a * world.size + world.rank) * batch_size + i]
            for t in range(s.position, s.steps_per_epoch) for a in range(accum) for i in range(batch_size)]
    if isinstance(dataset, SeededTrainTransform):
        dataset.epoch = s.epoch
    # The loader gets its own generator so creating it never draws from the global RNG.
    loader = task.loader(train, Subset(dataset, mine), batch_size, options, runtime,
                         torch.Generator().manual_seed(_epoch_seed(options.seed, s.epoch)), drop_last=True)
    model.train()
    micro: list[tuple[Tensor, Tensor]] = []
    for images, labels, index in loader:
        micro.append((task.augment(images, index, s.epoch, options, runtime), labels))
        if len(micro) < accum:
            continue
        s.lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it on)
        loss = train_step(forward, micro, runtime, optimizer, scheduler, scaler, task.loss)
        micro = []
        run.loss_sum += loss.detach().to(run.loss_sum.dtype) * (len(labels) * accum)
        run.loss_count += len(labels) * accum
        s.step += 1
        s.position += 1
        epoch_done = s.position >= s.steps_per_epoch or s.step >= s.total_steps
        if epoch_done or s.step % _SYNC_EVERY == 0:
            s.loss = _check_finite(run, s.step)
        if not epoch_done and options.val_every and s.step % options.val_every == 0 and mid_epoch:
            mid_epoch()
        if on_step:
            on_step(s)
        if epoch_done:
            end_epoch()
            if s.step >= s.total_steps:
                return False
        asked = (stop is not None and stop(s)) or interrupted()
        if world.distributed:  # every rank stops at the same step (one asked: all stop)
            asked = distributed.all_reduce_sums([1.0 if asked else 0.0])[0] > 0
        if asked:
            return True
        if epoch_done:
            return False
    return False


def train_step(model: Callable[[Tensor], Tensor], micro: list[tuple[Tensor, Tensor]], runtime: Any,
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
               batch_loss: Callable[..., Tensor] | None = None) -> Tensor:
    """One optimizer step of ``finetune`` from one or more (augmented) micro-batches (``--accum-steps``):
    their gradients add up, each loss scaled by 1/len(micro), so the step equals one on their union
    (for BatchNorm models up to the per-micro-batch statistics; with one micro-batch the scaling is
    by 1, exact). Under DDP only the last backward all-reduces (``no_sync``). The mean loss stays on
    the device. ``batch_loss(model, inputs, targets, runtime)``: a micro-batch's mean loss (default:
    cross-entropy of the logits against class labels)."""
    batch_loss = batch_loss or TrainTask(None).loss
    optimizer.zero_grad(set_to_none=True)
    total = None
    with runtime.numerics():
        for i, (images, labels) in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                loss = batch_loss(model, images, labels, runtime) / len(micro)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    scheduler.step()
    return total  # the mean loss over the micro-batches


def compiled_forward(model: nn.Module, warn: Callable[[str], None] | None = None) -> CompiledOrEager:
    """``model(x)`` through ``torch.compile`` (``finetune --compile``), eager if compiling fails.

    Parameters are shared with ``model``, so checkpoints are written from the uncompiled module,
    without ``_orig_mod.`` prefixes.
    """
    return CompiledOrEager(model, "--compile", "training continues eagerly", warn)


def _check_finite(run: _Run, step: int) -> float:
    """The epoch's mean training loss so far, over every rank's samples (torchrun); an error if it
    diverged."""
    total, count = distributed.all_reduce_sums([float(run.loss_sum), run.loss_count])
    mean = total / max(count, 1)
    if not math.isfinite(mean):
        raise BadValue(f"training diverged: the loss is {mean} by step {step}; lower --lr")
    return mean
