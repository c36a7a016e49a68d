"""The notebook front end (DESIGN.md §2b): every analysis on an in-memory model and the user's batches.

    import resprobe as rp
    a = rp.align(model, loader)          # model: any nn.Module; loader: the user's own DataLoader
    a.to_pandas()

The engines (recorder, ablation, evaluation) read a :class:`~resprobe.probe.Probe` and batches of
``(inputs, targets, indices)``. This module builds both from what a notebook holds: a probe around an
``nn.Module`` (wrappers unwrapped, no preprocessing of its own: the user's transforms are used as they
are) and a :class:`BatchAdapter` around a DataLoader, an iterable of batches or a Dataset. Spec
strings (``"torchvision:resnet18"``, a checkpoint path, ``--data`` specs) go the command line's way.

The user's model is never left changed: :func:`preserved` snapshots its training flags,
``requires_grad``, hooks, parameters' and buffers' tensors (device, dtype, layout) and submodules, and
puts them back after every call, also after an exception or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from resprobe.errors import BadValue, ModelError
from resprobe.probe import Probe
from resprobe.results import AblateResult, AlignResult, Run, TrainHistory

LossFn = Callable[[Tensor, Tensor], Tensor]
DEFAULT_BATCH_SIZE = 64
INPUT_KEYS = ("pixel_values", "input")
TARGET_KEY = "labels"
ORIGIN_ATTR = "_resprobe_origin"  # on modules resprobe builds: how to rebuild them (rp.save)

# Every per-module dict of hooks torch keeps (those a torch version lacks are skipped).
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


# --------------------------------------------------------------------------------------------------
# The model: unwrapped, and left as it was


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``), however deeply nested."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass
class _Snapshot:
    modules: list[tuple[nn.Module, bool, dict, dict, dict, dict[str, dict]]] = field(default_factory=list)
    params: list[tuple[nn.Parameter, Tensor, bool, Tensor | None]] = field(default_factory=list)


def snapshot(model: nn.Module) -> _Snapshot:
    """What :func:`restore` puts back. Tensors are kept by reference (no copy): moving a module
    (``.to``) replaces its tensors, so the originals stay as they were."""
    snap = _Snapshot()
    for module in model.modules():
        hooks = {name: dict(getattr(module, name)) for name in HOOK_DICTS if hasattr(module, name)}
        snap.modules.append((module, module.training, dict(module._parameters), dict(module._buffers),
                             dict(module._modules), hooks))
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            snap.params.append((param, param.data, param.requires_grad, param.grad))
    return snap


def restore(snap: _Snapshot, keep_values: bool = False) -> None:
    """Put back what :func:`snapshot` saw. ``keep_values`` (training): the current values are copied
    into the original tensors first, so training on another device is kept, on the original one."""
    for param, data, requires_grad, grad in snap.params:
        if keep_values and param.data is not data:
            with torch.no_grad():
                data.copy_(param.data)
        param.data = data
        param.grad = grad if not keep_values else None
        param.requires_grad_(requires_grad)
    for module, training, params, buffers, children, hooks in snap.modules:
        if keep_values:
            for key, buf in buffers.items():
                now = module._buffers.get(key)
                if buf is not None and now is not None and now is not buf and now.shape == buf.shape:
                    with torch.no_grad():
                        buf.copy_(now)
        module._parameters.clear()
        module._parameters.update(params)
        module._buffers.clear()
        module._buffers.update(buffers)
        module._modules.clear()
        module._modules.update(children)
        for name, saved in hooks.items():
            current = getattr(module, name)
            current.clear()
            current.update(saved)
        module.training = training


@contextlib.contextmanager
def preserved(model: nn.Module, keep_values: bool = False) -> Iterator[None]:
    """Run a block and leave ``model`` as it was, whatever happens inside (KeyboardInterrupt too)."""
    snap = snapshot(model)
    try:
        yield
    finally:
        restore(snap, keep_values)


def _own_device(model: nn.Module) -> str:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return str(tensor.device) if tensor is not None else "cpu"


def _globs(blocks: str | Sequence[str] | None) -> list[str] | None:
    if blocks is None:
        return None
    return [g.strip() for g in blocks.split(",") if g.strip()] if isinstance(blocks, str) else list(blocks)


# --------------------------------------------------------------------------------------------------
# The loss


def per_sample_loss(loss: LossFn | None) -> LossFn | None:
    """The user's ``loss(outputs, targets)``, checked to give one loss per sample ([B])."""
    if loss is None:
        return None
    if not callable(loss):
        raise BadValue(f"loss must be a callable (outputs, targets) -> per-sample losses [B], got {type(loss).__name__}")

    def checked(outputs: Tensor, targets: Tensor) -> Tensor:
        values = loss(outputs, targets)
        if not isinstance(values, Tensor) or values.dim() != 1 or len(values) != len(outputs):
            shape = list(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise BadValue(f"loss must return one loss per sample (a tensor of shape [{len(outputs)}]), got {shape}: "
                           "per-sample losses are needed (e.g. reduction='none')")
        return values

    return checked


# --------------------------------------------------------------------------------------------------
# The data: the user's batches as the engines read them


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets[, ...])`` or ``{"pixel_values"|"input": ..., "labels": ...}`` → (inputs, targets)."""
    if isinstance(batch, dict):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None or TARGET_KEY not in batch:
            raise BadValue(f"a dict batch needs 'pixel_values' or 'input' and 'labels'; it has {', '.join(batch)}")
        inputs, targets = batch[key], batch[TARGET_KEY]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
    else:
        raise BadValue("a batch must be (inputs, targets[, ...]) or a dict with 'pixel_values' or 'input' and "
                       f"'labels', got {type(batch).__name__}")
    if not isinstance(inputs, Tensor):
        raise BadValue(f"a batch's inputs must be a tensor, got {type(inputs).__name__}")
    return inputs, targets if isinstance(targets, Tensor) else torch.as_tensor(targets)


class BatchAdapter:
    """The user's data as ``(inputs, targets, indices)`` batches, re-iterable (ablation curves pass
    over the data several times). Inputs are detached views: the recorder sets ``requires_grad`` on
    what it gets, never on the user's tensors. A one-shot iterator is read into a list once."""

    def __init__(self, data: Any, batch_size: int = DEFAULT_BATCH_SIZE):
        if isinstance(data, DataLoader):
            self.source: Iterable = data
            self.dataset: Any = data.dataset
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            self.source = DataLoader(data, batch_size=batch_size, shuffle=False)
            self.dataset = data
        elif isinstance(data, Iterable):
            self.source = list(data) if iter(data) is data else data
            self.dataset = []
        else:
            raise BadValue(f"data must be a DataLoader, an iterable of batches, a Dataset or a data spec string, "
                           f"got {type(data).__name__}")
        self._peeked: tuple[Any, Iterator] | None = None

    def first_inputs(self) -> Tensor:
        """The first batch's inputs; the batch is read once and yielded first by the next pass."""
        if self._peeked is None:
            batches = iter(self.source)
            first = next(batches, None)
            if first is None:
                raise BadValue("the data holds no batches")
            self._peeked = (first, batches)
        return split_batch(self._peeked[0])[0]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if self._peeked is not None:
            first, rest = self._peeked
            self._peeked = None
            batches: Iterator = itertools.chain([first], rest)
        else:
            batches = iter(self.source)
        start = 0
        for batch in batches:
            inputs, targets = split_batch(batch)
            n = len(inputs)
            yield inputs.detach(), targets, torch.arange(start, start + n)
            start += n


# --------------------------------------------------------------------------------------------------
# A probe around what the notebook holds


@dataclass
class Session:
    probe: Probe
    loader: Iterable | None
    data: str | None  # the data's name in reports: the spec, or None for the user's own batches
    module: nn.Module  # the analysed module (unwrapped; the user's own, or one loaded from a spec)
    origin: dict[str, Any] | None  # arch / recipes / preprocessing when resprobe can rebuild it


def _spec_probe(model: str, device: str | None, precision: str, blocks: list[str] | None,
                for_training: bool = False) -> Probe:
    from resprobe.probe import open_probe

    return open_probe(model, device=device or "auto", precision=precision, blocks=blocks, for_training=for_training)


def _module_probe(module: nn.Module, device: str | None, precision: str, blocks: list[str] | None) -> Probe:
    from resprobe.models.blocks import require_blocks
    from resprobe.data.preprocessing import default_preprocessing
    from resprobe.models.loading import LoadedModel, ModelSpec, _model_num_classes
    from resprobe.models.fingerprint import state_dict_sha256
    from resprobe.runtime import make_runtime

    runtime = make_runtime(device or _own_device(module), precision)
    origin = getattr(module, ORIGIN_ATTR, None) or {}
    arch = dict(origin.get("arch") or {"source": "module", "name": type(module).__name__,
                                       "num_classes": _model_num_classes(module, None), "kwargs": {}})
    loaded = LoadedModel(module, ModelSpec("module", type(module).__name__), arch,
                         recipes=list(origin.get("recipes") or []), preprocessing=origin.get("preprocessing"))
    loaded.weights_sha256 = state_dict_sha256(module)  # as every report names the weights it describes
    require_blocks(module, blocks)
    return Probe(loaded, default_preprocessing(loaded), runtime, blocks)


def _origin_of(probe: Probe, module: nn.Module) -> dict[str, Any] | None:
    found = getattr(module, ORIGIN_ATTR, None)
    if found is not None:
        return found
    if probe.loaded.source == "module":
        return None
    return {"arch": probe.loaded.arch, "recipes": list(probe.loaded.recipes),
            "preprocessing": probe.preprocessing_used.to_dict(), "classes": probe.loaded.classes}


def _input_shape(example: Any) -> tuple[int, ...]:
    inputs = split_batch(example)[0] if isinstance(example, (tuple, list, dict)) else example
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        raise BadValue("example must be a batch of inputs (a tensor [B, ...]) or a batch (inputs, targets)")
    return tuple(inputs.shape[1:])


@contextlib.contextmanager
def session(model: Any, data: Any = None, loss: LossFn | None = None, device: str | None = None,
            precision: str = "fp32", blocks: str | Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            example: Any = None, train: bool = False) -> Iterator[Session]:
    """The probe and loader for one call; the user's module is restored when the call ends.

    ``train``: the model is trained (finetune): its new values are kept, on its own device."""
    globs = _globs(blocks)
    if isinstance(model, (str, Path)):
        probe = _spec_probe(str(model), device, precision, globs, for_training=train)
        user_module = None
    elif isinstance(model, nn.Module):
        user_module = unwrap(model)
        probe = None
    else:
        raise BadValue(f"model must be an nn.Module, a model spec or a checkpoint path, got {type(model).__name__}")
    guard = preserved(user_module, keep_values=train) if user_module is not None else contextlib.nullcontext()
    with guard:
        if user_module is not None:
            probe = _module_probe(user_module, device, precision, globs)
            probe.runtime.prepare(user_module)  # moved back by ``preserved``
            if not train:
                user_module.requires_grad_(False)  # the recorder differentiates to the inputs only
        assert probe is not None
        probe.loss_fn = per_sample_loss(loss)
        loader, name = _loader(probe, data, batch_size)
        if example is not None:
            probe.sample_shape = _input_shape(example)
        elif isinstance(loader, BatchAdapter) and probe.sample_shape is None:
            probe.sample_shape = tuple(loader.first_inputs().shape[1:])
        module = probe.model
        if not train:
            module.eval()
        yield Session(probe, loader, name, module, _origin_of(probe, module))


def _loader(probe: Probe, data: Any, batch_size: int) -> tuple[Iterable | None, str | None]:
    if data is None:
        return None, None
    if isinstance(data, (str, Path)):
        source = probe.data(str(data))
        return probe.loader(source, batch_size), str(data)
    return BatchAdapter(data, batch_size), None


# --------------------------------------------------------------------------------------------------
# The functions


def blocks(model: Any, example: Any = None, blocks: str | Sequence[str] | None = None, device: str | None = None,
           precision: str = "fp32") -> Any:
    """The residual blocks of ``model`` (:class:`~resprobe.models.blocks.Anatomy`: ``.names``, ``.to_pandas()``),
    found with one forward of ``example`` (a batch of inputs; a spec string's model needs none)."""
    if isinstance(model, nn.Module) and example is None:
        raise BadValue("rp.blocks(model, example): give example, a batch of inputs (e.g. next(iter(loader))[0]), "
                       "so that the blocks can be found by running the model")
    with session(model, None, None, device, precision, blocks, example=example) as s:
        return s.probe.anatomy


def evaluate(model: Any, data: Any, loss: LossFn | None = None, device: str | None = None, precision: str = "fp32",
             blocks: str | Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """``{loss, acc, top5, n}``: mean per-sample loss (default cross-entropy), top-1 and top-5 accuracy
    (None where the targets are not class indices)."""
    from resprobe.evaluate import evaluate as run_evaluate

    with session(model, data, loss, device, precision, blocks, batch_size) as s:
        result = run_evaluate(s.module, s.loader, s.probe.runtime, loss_fn=s.probe.loss_fn)
    return {"loss": result.loss, "acc": result.acc, "top5": result.top5, "n": result.n}


def align(model: Any, data: Any, loss: LossFn | None = None, target: str = "label",
          blocks: str | Sequence[str] | None = None, device: str | None = None, precision: str = "fp32",
          readout: bool = False, batch_size: int = DEFAULT_BATCH_SIZE) -> AlignResult:
    """Per-block alignment of the residual branches with the loss gradient (``resprobe align``)."""
    from resprobe.align import align_report
    from resprobe.recording.recorder import collect

    with session(model, data, loss, device, precision, blocks, batch_size) as s:
        anatomy = s.probe.anatomy
        last = anatomy.blocks[-1].stage
        readout_blocks = [b.name for b in anatomy.blocks if b.stage == last] if readout else []
        recorded = collect(s.probe, s.loader, target, readout_blocks, warn_nonfinite=True)
        recorded.attrs = {**s.probe.describe(), "data": s.data}
        recorded.n_planned = recorded.n_samples
    report = align_report(recorded)
    if not readout:
        report.pop("readout", None)
    return AlignResult(report, recorded)


def ablate(model: Any, data: Any, loss: LossFn | None = None, cumulative: int | None = None,
           one_shot: int | None = None, proxies: bool = False, include_transitions: bool = False,
           unroll: str | None = None, by: str = "loss", blocks: str | Sequence[str] | None = None,
           device: str | None = None, precision: str = "fp32", batch_size: int = DEFAULT_BATCH_SIZE) -> AblateResult:
    """Exact removal cost of every block, removal curves, proxies (``resprobe ablate``).
    ``.pruned(n)`` of the result is a new module without the n least harmful blocks."""
    from resprobe.ablate import AblateOptions, parse_unroll, run_ablation

    if is_causal_lm(model):
        if loss is not None or unroll is not None or include_transitions or by != "loss" or blocks is not None:
            raise BadValue("rp.ablate of a language model: loss, unroll, include_transitions, by and blocks are not "
                           "supported (the loss is the next-token NLL)")
        return _ablate_lm(model, data, cumulative, one_shot, proxies, device)
    options = AblateOptions(by=by, include_transitions=include_transitions, cumulative=cumulative,
                            one_shot=one_shot, proxies=proxies,
                            unroll=parse_unroll(unroll) if unroll is not None else None)
    options.check()
    with session(model, data, loss, device, precision, blocks, batch_size) as s:
        report = run_ablation(s.probe, s.loader, options)
        payload = {"model": str(s.probe.loaded.spec), **report_provenance(s.probe), "data": s.data, **report.to_dict()}
    return AblateResult(payload, s.module, s.origin)


def is_causal_lm(model: Any) -> bool:
    """A transformers causal LM (``PreTrainedModel`` with a generation head), without importing transformers."""
    return (isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model, "get_input_embeddings")
            and hasattr(model, "generate"))


def lm_batches(data: Any) -> list[tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]]:
    """The user's batches of ``{input_ids[, attention_mask, labels]}`` as the LM engine's windows
    (every next-token prediction scored, or those whose label is not -100)."""
    if isinstance(data, dict):
        data = [data]
    out, seen = [], 0
    for batch in data:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise BadValue("rp.ablate of a language model takes batches that are dicts with input_ids "
                           "(+ attention_mask, labels)")
        ids = torch.as_tensor(batch["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        extra = {k: torch.as_tensor(batch[k]).view_as(ids) for k in ("attention_mask", "labels") if k in batch}
        out.append((ids, torch.zeros(len(ids), dtype=torch.long), torch.arange(seen, seen + len(ids)), extra))
        seen += len(ids)
    if not out:
        raise BadValue("rp.ablate: no batches")
    return out


def _ablate_lm(model: nn.Module, data: Any, cumulative: int | None, one_shot: int | None, proxies: bool,
               device: str | None) -> AblateResult:
    from resprobe.ablate_lm import LMAblateOptions, run_lm_ablation
    from resprobe.lm_probe import LMProbe
    from resprobe.models.causal_lm import LoadedLM
    from resprobe.runtime import make_runtime

    batches = lm_batches(data)
    if proxies and any(extra for *_, extra in batches):
        raise BadValue("rp.ablate(proxies=True) of a language model takes batches of input_ids only (every token "
                       "scored)")
    options = LMAblateOptions(cumulative, one_shot, proxies=proxies)
    options.check()
    runtime = make_runtime(device or str(next(model.parameters()).device))
    loaded = LoadedLM(type(model).__name__, type(model).__name__, None, model, None, None, None)
    probe = LMProbe(loaded, runtime, seq_len=int(batches[0][0].shape[1]))
    with preserved(model):
        model.to(runtime.device)
        report = run_lm_ablation(probe, batches, options, n_windows=sum(len(b[0]) for b in batches))
    payload = {"model": loaded.spec, "checkpoint": None, "data": "batches", **report}
    return AblateResult(payload, model, None)


def report_provenance(probe: Probe) -> dict[str, Any]:
    """``checkpoint`` and ``preprocessing`` (as used) for every report that loads a model."""
    described = probe.describe()
    return {"checkpoint": described["checkpoint"], "checkpoint_sha256": described["checkpoint_sha256"],
            "weights_sha256": described["weights_sha256"], "preprocessing": described["preprocessing"]}


def share(model: Any, stages: Sequence[int] | None = None, init: str = "average", norm: str = "unshared",
          lora_rank: int | None = None, recalibrate: int | None = None, train_data: Any = None,
          iterations: int | None = None, gamma_init: str = "copy", recalibrate_scope: str = "shared",
          example: Any = None, blocks: str | Sequence[str] | None = None, device: str | None = None,
          precision: str = "fp32", batch_size: int = DEFAULT_BATCH_SIZE, span: tuple[int, int] | None = None,
          period: int = 1) -> nn.Module:
    """A new module whose stages share one block applied in place (``resprobe share``); the original is
    untouched. ``recalibrate=N`` re-estimates norm statistics on N samples of ``train_data``.

    A transformers causal LM (module or ``transformers:`` spec): ``span=(A, B)`` and ``period=P`` loop P
    shared decoder layers over layers A..B−1 (docs/llm.md "Sharing layers"); the result is the same
    ``PreTrainedModel`` class, which ``generate``s and which ``rp.save`` writes for every command."""
    from resprobe.models.blocks import discover_blocks
    from resprobe.share import ShareOptions, share_stages
    from resprobe.share import recalibrate as recalibrate_norms

    if span is not None or period != 1 or _is_lm(model):
        vision_only = {"stages": stages, "recalibrate": recalibrate, "train_data": train_data,
                       "iterations": iterations, "example": example, "blocks": blocks,
                       "gamma_init": None if gamma_init == "copy" else gamma_init}
        given = [name for name, value in vision_only.items() if value is not None]
        if given:
            raise BadValue(f"rp.share of a language model takes span=(A, B) and period=P, not {given[0]}=")
        return _share_lm(model, span, period, init, norm, lora_rank, device, precision)

    options = ShareOptions(list(stages) if stages is not None else None, iterations, init, norm, gamma_init,
                           lora_rank).validate()
    if (recalibrate is None) != (train_data is None):
        raise BadValue("recalibrate=N and train_data go together: the training samples to re-estimate norms on")
    if recalibrate is not None and recalibrate < 1:
        raise BadValue(f"recalibrate must be at least 1, got {recalibrate}")
    trainable = [p.requires_grad for p in model.parameters()] if isinstance(model, nn.Module) else None
    with session(model, train_data, None, device, precision, blocks, batch_size, example=example) as s:
        shape = s.probe.sample_shape or s.probe.preprocessing.input_size
        runtime = s.probe.runtime
        new = copy.deepcopy(s.module)  # on the runtime's device, in eval mode; frozen for the call: undone below
    for param, flag in zip(new.parameters(), trainable or itertools.repeat(True)):
        param.requires_grad_(flag)
    anatomy = discover_blocks(new, shape, _globs(blocks))
    result = share_stages(new, anatomy, options)
    if recalibrate is not None:
        with runtime.numerics():
            recalibrate_norms(new, _limited(BatchAdapter(train_data, batch_size), recalibrate), runtime, recalibrate,
                              recalibrate_scope)
    new.eval()
    origin = s.origin or {}
    _set_origin(new, {**origin, "recipes": [*(origin.get("recipes") or []), result.recipe]})
    return new


def _is_lm(model: Any) -> bool:
    """A transformers causal LM: a ``*ForCausalLM`` / ``*LMHeadModel`` module, or a spec naming one."""
    from resprobe.models.causal_lm import is_lm_model

    if isinstance(model, str):
        return is_lm_model(model)
    module = unwrap(model) if isinstance(model, nn.Module) else None
    return module is not None and type(module).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _share_lm(model: Any, span: tuple[int, int] | None, period: int, init: str, norm: str, lora_rank: int | None,
              device: str | None, precision: str) -> nn.Module:
    """rp.share of a language model: a shared copy (a spec is loaded first); the original untouched."""
    from resprobe.models.causal_lm import lm_arch, load_lm
    from resprobe.share_lm import SpanOptions, share_span

    if span is None or len(tuple(span)) != 2:
        raise BadValue("rp.share of a language model needs span=(A, B): the layers A..B−1 to share")
    options = SpanOptions(int(span[0]), int(span[1]), int(period), init, norm, lora_rank).validate()
    if isinstance(model, str):
        loaded = load_lm(model, precision=precision)
        new, origin = loaded.model, {"lm_arch": lm_arch(loaded, loaded.model), "recipes": list(loaded.recipes)}
    else:
        module = unwrap(model)
        origin = dict(getattr(module, ORIGIN_ATTR, None) or {})
        new = copy.deepcopy(module)  # requires_grad flags and train/eval mode as the user's
    if device is not None:
        new.to(device)
    result = share_span(new, options)
    _set_origin(new, {**origin, "recipes": [*(origin.get("recipes") or []), result.recipe]})
    return new


def _limited(batches: Iterable, n: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The first ``n`` samples of ``batches``."""
    left = n
    for inputs, targets, index in batches:
        if left <= 0:
            return
        yield inputs[:left], targets[:left], index[:left]
        left -= len(inputs)


def _set_origin(module: nn.Module, origin: dict[str, Any]) -> None:
    object.__setattr__(module, ORIGIN_ATTR, origin)


def finetune(model: Any, train_data: Any, val_data: Any = None, max_steps: int | None = 300, lr: float | None = None,
             epochs: int | None = None, optimizer: str = "sgd", momentum: float = 0.9,
             weight_decay: float | None = None, warmup_steps: int = 0, loss: LossFn | None = None,
             device: str | None = None, precision: str = "fp32", blocks: str | Sequence[str] | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, log_every: int = 10) -> TrainHistory:
    """Train ``model`` in place on ``train_data`` (the user's batches, augmented as they are); returns
    the history (step, lr, loss; val_loss/val_acc after each epoch and at the end). SGD (momentum,
    Nesterov) or AdamW, linear warmup then cosine decay, as ``resprobe finetune``."""
    from resprobe.evaluate import evaluate as run_evaluate
    from resprobe.train import FinetuneOptions, make_optimizer, make_scheduler

    if not isinstance(model, nn.Module):
        raise BadValue("rp.finetune trains a module in place: give the nn.Module (rp.load(PATH) loads a checkpoint)")
    if epochs is not None:
        max_steps = None
    options = FinetuneOptions("", epochs, max_steps, lr, optimizer, momentum, weight_decay, warmup_steps,
                              batch_size=batch_size).validate()
    loss_fn = per_sample_loss(loss)
    history = TrainHistory()
    with session(model, train_data, loss, device, precision, blocks, batch_size, train=True) as s:
        runtime, module, batches = s.probe.runtime, s.module, s.loader
        per_epoch = None
        if options.max_steps is None:  # epochs: the steps an epoch takes, without reading a sized loader
            source = getattr(batches, "source", None)
            per_epoch = len(source) if hasattr(source, "__len__") else sum(1 for _ in batches)
        total = options.max_steps or (per_epoch or 1) * (options.epochs or 1)
        optim = make_optimizer(module, options)
        scheduler = make_scheduler(optim, total, options.warmup_steps)
        step, epoch = 0, 0
        while step < total:
            module.train()
            for inputs, targets, _ in batches:
                value = _train_step(module, inputs, targets, runtime, optim, loss_fn)
                scheduler.step()
                step += 1
                if step % log_every == 0 or step == total:
                    history.add(step=step, epoch=epoch, lr=optim.param_groups[0]["lr"], loss=float(value))
                if step >= total:
                    break
            epoch += 1
            if val_data is not None:
                module.eval()
                with torch.no_grad():
                    val = run_evaluate(module, BatchAdapter(val_data, batch_size), runtime, loss_fn=loss_fn)
                history.add(step=step, epoch=epoch, val_loss=val.loss, val_acc=val.acc)
    return history


def _train_step(module: nn.Module, inputs: Tensor, targets: Tensor, runtime: Any, optim: torch.optim.Optimizer,
                loss_fn: LossFn | None) -> Tensor:
    from torch.nn import functional as F

    optim.zero_grad(set_to_none=True)
    inputs, targets = runtime.batch(inputs), targets.to(runtime.device)
    with runtime.numerics():
        with runtime.autocast():
            outputs = module(inputs)
        outputs = outputs.float()
        losses = loss_fn(outputs, targets) if loss_fn is not None else F.cross_entropy(outputs, targets,
                                                                                     reduction="none")
        value = losses.mean()
        value.backward()
        optim.step()
    return value.detach()


def save(model: nn.Module, path: str | Path, arch: str | None = None, overwrite: bool = False,
         num_classes: int | None = None) -> Path:
    """Write ``model`` as a resprobe checkpoint (usable as MODEL by every command). Modules resprobe
    made (``rp.share``, ``.pruned``, spec strings) know how they are rebuilt; a user's own module needs
    ``arch``, the spec of its architecture (e.g. ``"torchvision:resnet18"``, with ``num_classes``).
    An existing ``path`` is refused unless ``overwrite=True``, and is never touched by a save that fails:
    the file is written beside it, loaded back, and only then renamed into place."""
    import os

    path = Path(path)
    if path.exists() and not overwrite:
        raise BadValue(f"rp.save: {path} exists; pass overwrite=True to replace it")
    from resprobe.models.loading import LoadOptions, load_model
    from resprobe.models.checkpoints import save_resprobe_checkpoint

    module = unwrap(model)
    origin = dict(getattr(module, ORIGIN_ATTR, None) or {})
    recipes = list(origin.get("recipes") or [])
    if _is_lm(module):
        return _save_lm(module, path, origin, recipes, overwrite)
    if arch is not None:
        built = load_model(arch, LoadOptions(num_classes=num_classes))
        origin["arch"] = built.arch
    if not origin.get("arch"):
        raise BadValue(f"rp.save: resprobe does not know how to rebuild this {type(module).__name__}; give arch=, "
                       "the spec of its architecture (e.g. arch='torchvision:resnet18', num_classes=10)")
    from resprobe.models.loading import LoadedModel, parse_model_spec

    arch_dict = origin["arch"]
    spec = parse_model_spec(f"{arch_dict.get('source')}:{arch_dict.get('name')}") \
        if arch_dict.get("source") in ("timm", "torchvision") else parse_model_spec(str(arch or arch_dict.get("name")))
    loaded = LoadedModel(module, spec, arch_dict, recipes=recipes, preprocessing=origin.get("preprocessing"),
                         classes=origin.get("classes"))
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the suffix says "checkpoint"
    try:
        save_resprobe_checkpoint(tmp, loaded, module, recipes=recipes, preprocessing=origin.get("preprocessing"),
                                 replace=True)
        try:  # the file must give this model back: a wrong arch is said now, not at the next load
            load(tmp)
        except ModelError as exc:
            raise BadValue(f"rp.save: {path} would not load back as this model ({exc}); check arch=") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def _save_lm(module: nn.Module, path: str | Path, origin: dict[str, Any], recipes: list[dict[str, Any]],
             overwrite: bool) -> Path:
    """rp.save of a language model: its config, recipes and weights (the tokenizer is looked for where
    the model came from: its ``name_or_path``)."""
    from resprobe.models.causal_lm import LoadedLM, save_lm_checkpoint

    if not overwrite and Path(path).exists():
        raise BadValue(f"rp.save: {path} already exists; pass overwrite=True to replace it")
    name = str(getattr(module.config, "_name_or_path", "") or "") or None
    loaded = LoadedLM(name or type(module).__name__, name or "", None, module, None, name, None,
                      arch=origin.get("lm_arch"), recipes=recipes)
    return save_lm_checkpoint(path, loaded, module, recipes, replace=overwrite)


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """A resprobe checkpoint (or any MODEL spec) as a module in eval mode, with its rebuilding recipe."""
    from resprobe.models.causal_lm import is_lm_model, lm_arch, load_lm
    from resprobe.models.loading import LoadOptions, load_model

    if is_lm_model(str(path)):  # a language model (its tokenizer: rp.share/rp.evaluate do not need it)
        lm = load_lm(str(path))
        _set_origin(lm.model, {"lm_arch": lm_arch(lm, lm.model), "recipes": list(lm.recipes)})
        return lm.model.to(device).eval()

    loaded = load_model(str(path), LoadOptions())
    module = loaded.model.to(device).eval()
    _set_origin(module, {"arch": loaded.arch, "recipes": list(loaded.recipes), "preprocessing": loaded.preprocessing,
                         "classes": loaded.classes})
    return module


def record(model: Any, data: Any, out: str | Path, resume: bool = False, overwrite: bool = False,
           loss: LossFn | None = None, target: str = "label", device: str | None = None, precision: str = "fp32",
           blocks: str | Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE, **options: Any) -> Run:
    """``resprobe record``: the per-sample statistics into ``out`` (HDF5), durable batch by batch and
    resumable (``resume=True``). MODEL and DATA as spec strings take the command line's other options as
    keywords (``limit=``, ``checkpoint=``, ...); an in-memory model needs a DataLoader or Dataset that
    yields the same batches in the same order each time (no shuffling) for a resume."""
    from resprobe.record import RecordOptions
    from resprobe.recording.reader import open_recording as read
    from resprobe.record import record as run_record

    if isinstance(model, (str, Path)) and isinstance(data, (str, Path)):
        if loss is not None:
            raise BadValue("rp.record(MODEL, DATA) with spec strings records cross-entropy; a custom loss needs the "
                           "model as a module (a resumed run re-reads the specs, not the loss)")
        record_options = RecordOptions(model=str(model), data=str(data), blocks=_globs(blocks), target=target,
                                       precision=precision, batch_size=batch_size, **options)
        result = run_record(record_options, out, overwrite, resume, device or "auto")
        return Run(read(result.out), result)
    if options:
        raise BadValue(f"rp.record: {', '.join(options)} apply to spec strings only")
    with session(model, data, loss, device, precision, blocks, batch_size) as s:
        result = _record_batches(s, Path(out), resume, overwrite, target, precision)
    return Run(read(result.out), result)


def _record_batches(s: Session, out: Path, resume: bool, overwrite: bool, target: str, precision: str) -> Any:
    """:func:`record` of the user's own batches (a sized DataLoader or Dataset, in a fixed order)."""
    from resprobe import __version__
    from resprobe.recording.recorder import Recorder
    from resprobe.recording.writer import RunWriter
    from resprobe.record import check_same_weights, now_iso, run_recording

    loader = s.loader
    source = getattr(loader, "source", None)
    size = getattr(source, "batch_size", None)
    if not isinstance(loader, BatchAdapter) or not isinstance(source, DataLoader) or not size \
            or not hasattr(loader.dataset, "__len__"):
        raise BadValue("rp.record of an in-memory model needs a DataLoader (or Dataset) with a batch_size and a "
                       "length, so that a resumed run knows which batches are done")
    if resume and isinstance(source.sampler, torch.utils.data.RandomSampler):
        raise BadValue("rp.record(resume=True): the DataLoader shuffles, so its batches differ from the "
                       "interrupted run's; use shuffle=False")
    n = len(loader.dataset)
    probe = s.probe
    blocks_ = [b.to_dict() for b in probe.anatomy.blocks]
    settings = {"batch_size": size, "target": target, "precision": precision}
    if resume:
        writer = RunWriter.resume(out)
        if writer.meta["blocks"] != blocks_ or int(writer.meta["n_planned"]) != n:
            writer.close()
            raise BadValue(f"rp.record(resume=True): the model or data no longer match what {out} was recording")
        check_same_weights(writer.meta.get("attrs", {}).get("weights_sha256"), probe.loaded.weights_sha256,
                           f"resume: {out} was recorded")
    else:
        attrs = {"resprobe_version": __version__, "created": now_iso(), **probe.describe(), "data": None,
                 "options": settings, "target": target, "device": str(probe.runtime.device), "precision": precision,
                 "torch_version": torch.__version__, "n_planned": n}
        writer = RunWriter.create(out, {"blocks": blocks_, "n_planned": n, "options": settings, "attrs": attrs},
                                  overwrite=overwrite)
    try:
        numbers = writer.missing_batches(-(-n // size))
        wanted = set(numbers)
        batches = (batch for k, batch in enumerate(loader) if k in wanted)  # the done ones are read, not recorded
        with Recorder(probe.anatomy, probe.runtime, target, loss_fn=probe.loss_fn) as recorder:
            return run_recording(writer, recorder, batches, numbers)
    finally:
        writer.close()


def open_recording(path: str | Path) -> Run:
    """A recording (``RUN.h5``): its per-sample statistics, and ``.align()`` (nothing is recomputed)."""
    from resprobe.recording.reader import open_recording as read

    return Run(read(path))
