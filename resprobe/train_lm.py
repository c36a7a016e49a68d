"""``finetune`` for transformers causal language models (DESIGN §8): the vision loop of
:mod:`resprobe.train` (data order, warmup + cosine schedule, gradient accumulation, DDP under torchrun,
Ctrl-C, exact ``--resume``) with next-token batches, a perplexity validation and transformers folders.

- A sample is one text window (``--seq-len`` tokens, :mod:`resprobe.data.text`); a step's loss is the
  mean next-token NLL over the scored tokens of its windows (``eval``'s definition), no augmentation.
- ``--val-data``: ``{loss, perplexity, n_tokens}`` exactly as ``resprobe eval`` computes them on the
  same windows (before the first step and after each epoch).
- ``--out DIR`` is a ``save_pretrained`` folder (``model.safetensors``, ``config.json``, the tokenizer)
  that every resprobe command and plain ``AutoModelForCausalLM.from_pretrained(DIR)`` load. The resume
  state (weights, optimizer, schedule, position in the data, RNG) is ``DIR/resprobe_training.pt``
  (``torch.load(weights_only=True)``); delete it to ship the model. ``DIR.best`` is the best model by
  validation loss. A folder is replaced as a whole (written beside it, then renamed into place).
- MODEL may be a config folder without weights (``config.json`` and a tokenizer): the model is then
  initialized as transformers does, seeded by ``--seed``, and trained from scratch.
- A model restructured by ``share`` is written as a resprobe checkpoint file (``--out PATH``,
  ``PATH.best.pt``, the resume state inside), which every command loads.
- Under torchrun the processes' gradients are averaged, so N processes × B windows equal one process ×
  N·B when every window has the same number of scored tokens (non-overlapping windows, the default).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from resprobe.data.datasets import DataSource
from resprobe.errors import BadValue, ModelError
from resprobe.share import check_out_path
from resprobe.train import FinetuneOptions, FinetuneResult, TrainTask, check_new_out, finetune

TRAINING_FILE = "resprobe_training.pt"
DEFAULT_OPTIMIZER = "adamw"


def lm_best_path(out: str | Path) -> Path:
    """``DIR`` → ``DIR.best`` (a folder beside it)."""
    out = Path(out)
    return out.with_name(out.name + ".best")


def check_lm_out(out: str | Path, overwrite: bool = False, option: str = "--out") -> Path:
    """An output folder that may be written: its parent exists; an existing one only with ``overwrite``
    (or, for ``--out``, to be resumed)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise BadValue(f"{option} {path} is a file; language models are saved as a folder (save_pretrained)")
    if not path.parent.is_dir():
        raise BadValue(f"{option} {path}: directory {path.parent} does not exist")
    if path.exists() and not overwrite:
        hint = "continue the interrupted run with --resume, or pass" if option == "--out" else "pass"
        raise BadValue(f"{option} {path} already exists; {hint} --overwrite to replace it")
    return path


def _same_path(a: Path, b: str | Path | None) -> bool:
    if b is None or not a.exists() or not Path(b).expanduser().exists():
        return False
    return os.path.samefile(a, Path(b).expanduser())


class LMTask(TrainTask):
    """The language models' side of the loop (see the module docstring). A model restructured by resprobe
    (``share``) is no plain transformers model: it is written as a resprobe checkpoint file instead
    (``--out PATH``, ``PATH.best.pt``, the resume state inside, as for vision models)."""

    def __init__(self, probe: Any):
        super().__init__(probe)
        self.folder = not probe.loaded.recipes

    def best_path(self, out: Path) -> Path:
        return lm_best_path(out) if self.folder else super().best_path(out)

    def check_new(self, out: Path, best_file: Path, options: FinetuneOptions) -> None:
        if not self.folder:
            check_new_out(out, options.overwrite)
            check_out_path(best_file, options.overwrite, option="the best checkpoint")
        else:
            check_lm_out(out, options.overwrite)
            check_lm_out(best_file, options.overwrite, option="the best model folder")
        model = self.probe.loaded.spec if not self.folder else self.probe.loaded.name
        for path in (out, best_file):  # --overwrite would remove the model being trained
            if _same_path(path, model):
                raise BadValue(f"--out {out}: {path} is MODEL itself, which --overwrite would remove; choose "
                               "another --out")

    def remove_stale_best(self, best_file: Path) -> None:
        if best_file.is_dir():
            shutil.rmtree(best_file)
        else:
            best_file.unlink(missing_ok=True)

    def data_info(self, train: DataSource, val: DataSource | None) -> dict[str, Any]:
        protocol = train.protocol  # type: ignore[attr-defined]
        return {"seq_len": protocol["seq_len"], "stride": protocol["stride"]}

    def training_dataset(self, train: DataSource, options: FinetuneOptions) -> Dataset:
        return train.dataset

    def loader(self, source: DataSource, dataset: Dataset, batch_size: int, options: FinetuneOptions, runtime: Any,
               generator: torch.Generator, drop_last: bool = False) -> Iterator:
        from resprobe.data.text import window_loader

        # In order: the training subset is already the step's windows, in the epoch's order.
        return window_loader(replace(source, dataset=dataset), batch_size)  # type: ignore[type-var,return-value]

    def augment(self, inputs: Tensor, index: Tensor, epoch: int, options: FinetuneOptions, runtime: Any) -> Tensor:
        return inputs

    def loss(self, model: Callable[..., Any], inputs: Tensor, targets: Tensor, runtime: Any) -> Tensor:
        """Mean next-token NLL over the batch's scored tokens (``targets``: each window's first scored
        position)."""
        from resprobe.recording.lm_recorder import window_losses

        input_ids, first = inputs.to(runtime.device), targets.to(runtime.device)
        logits = model(input_ids=input_ids, use_cache=False).logits
        losses, counts = window_losses(logits, input_ids, first)
        return losses.sum() / counts.sum().clamp(min=1)

    def evaluate(self, model: nn.Module, loader: Iterator, runtime: Any,
                 progress: Callable[[int], None] | None) -> dict[str, Any]:
        from resprobe.evaluate_lm import evaluate_lm

        result = evaluate_lm(model, loader, runtime.device, progress)
        return {"loss": result["loss"], "perplexity": result["perplexity"], "n_tokens": result["n_tokens"]}

    def save(self, path: Path, model: nn.Module, meta: dict[str, Any], training: dict[str, Any] | None) -> None:
        loaded = self.probe.loaded
        if not self.folder:
            from resprobe.models.causal_lm import save_lm_checkpoint

            save_lm_checkpoint(path, loaded, model, loaded.recipes, meta,
                               extra={"training": training} if training is not None else None)
            return
        payload = None
        if training is not None:
            payload = {**training, "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        save_lm_folder(path, model, loaded.tokenizer, meta, payload)

    def read_training(self, out: Path) -> dict[str, Any]:
        if not self.folder:
            return super().read_training(out)
        file = out / TRAINING_FILE
        if not out.is_dir() or not file.is_file():
            raise BadValue(f"--resume: {out} is not a folder written by resprobe finetune (no {TRAINING_FILE}; "
                           "it may have been deleted after the run finished)")
        try:
            training = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file raises several kinds
            raise BadValue(f"--resume: {file} is not readable ({type(exc).__name__})") from None
        if not isinstance(training, dict) or "state_dict" not in training:
            raise BadValue(f"--resume: {file} holds no resume state")
        return training


def save_lm_folder(path: Path, model: nn.Module, tokenizer: Any, meta: dict[str, Any],
                   training: dict[str, Any] | None) -> None:
    """``save_pretrained`` of the model and tokenizer into ``path`` (plus ``resprobe.json`` with ``meta``
    and, for a resumable state, :data:`TRAINING_FILE`), written beside it and renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar: resprobe has its own
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "resprobe.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        if training is not None:
            torch.save(training, tmp / TRAINING_FILE)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def finetune_lm(probe: Any, train: DataSource, val: DataSource | None, options: FinetuneOptions,
                **callbacks: Any) -> FinetuneResult:
    """:func:`resprobe.train.finetune` for an :class:`~resprobe.lm_probe.LMProbe` (``probe.data(...)``
    windows). The model trains in fp32 (``--precision bf16``: in its bf16 weights)."""
    if options.augment != "none":
        raise BadValue(f"--augment {options.augment}: language models are not augmented; leave --augment out")
    if options.recalibrate:
        raise BadValue("--recalibrate re-estimates BatchNorm statistics; language models have none")
    if options.compile or options.sync_bn:
        raise BadValue("--compile and --sync-bn are not supported for language models")
    return finetune(probe, train, val, options, task=LMTask(probe), **callbacks)
