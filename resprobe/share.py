"""Shared iterative stages (docs/reference.md "Sharing a stage"; paper §4.5; Relaxed Recursive Transformers).

The identity blocks of a stage become ONE block applied in place, once per replaced block (or
``iterations`` times). Everything but the normalization layers is shared; each iteration keeps its own
norms (parameters and running statistics), unless ``norm="shared"`` (naive sharing). ``lora_rank``
gives every shared conv/linear weight a per-iteration low-rank correction ``W_t = W + B_t A_t``.

How a shared stage sits in the model (and in its state dict)::

    model.resprobe_shared.<container>   the one shared block, e.g. resprobe_shared.layer1.conv1.weight.
                                        Marked ``_resprobe_hidden`` so block discovery skips it. Its
                                        per-iteration submodules are replaced by parameter-free slots.
    <container>.<i>                     iteration t, a SharedIteration, at the name of the block it
                                        replaced (layer1.1). It owns its norms at the block's own paths
                                        (layer1.1.bn1.weight, .running_mean) and its LoRA factors
                                        (layer1.1.lora.conv1.A / .B); it reaches the shared block through
                                        an unregistered reference, so the shared weights appear (and are
                                        counted) exactly once.

Running iteration t points each slot of the shared block at iteration t's own module, then runs the
shared block's own forward (through ``torch.func.functional_call`` with the relaxed weights when
there are LoRA factors). Any block class works: nothing here knows how a block computes its output.

Threads: running an iteration sets state on the shared block (its slots' targets, settings, buffers),
so two threads must never run the same module tree at once. The main thread runs the shared block
itself; every other thread runs its own *view* of it (:func:`thread_view`: the same parameters and
buffers in a copy of the module tree), so iterations can run side by side (``ablate``'s suffix
threads). Within one tree an iteration started while another runs is refused, never mixed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resprobe.models.blocks import GENERIC, Anatomy, BlockFamily, count_params, family_of, register_block_family
from resprobe.errors import BadValue, ModelError
from resprobe.models.recipes import register_recipe

SHARED_ATTR = "resprobe_shared"
RECIPE_KIND = "share"
RECIPE_VERSION = 1
INITS = ("average", "first", "last")
NORM_MODES = ("unshared", "shared")
GAMMA_INITS = ("copy", "0.1")
RECURRENT_GAMMA = 0.1  # the paper's recurrent-BN initialization of γ (Cooijmans et al. 2016)

_WEIGHT_LAYERS: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)
_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES += (nn.RMSNorm,)


# --------------------------------------------------------------------------------------------------
# Options and results


@dataclass
class ShareOptions:
    """What to share and how (the ``share`` command's options).

    ``stages``: stage indices as ``blocks`` reports them; ``None`` = every stage with at least two
    identity blocks. ``iterations``: K, default the number of replaced blocks. ``init``: shared
    weights from the element-wise ``average`` of the replaced blocks, or the ``first``/``last`` one.
    ``norm``: ``unshared`` (per-iteration norms, the paper's fix) or ``shared`` (naive sharing).
    ``gamma_init``: ``copy`` (iteration t's norms from replaced block t) or ``0.1`` (the same, with
    every norm weight γ set to 0.1). ``lora_rank``: R of the per-iteration corrections, ``None`` = none.
    """

    stages: list[int] | None = None
    iterations: int | None = None
    init: str = "average"
    norm: str = "unshared"
    gamma_init: str = "copy"
    lora_rank: int | None = None
    # Library use only (tests, notebooks): allow a one-identity-block stage iterated once, which
    # rebuilds the original block through the sharing machinery. The command refuses it.
    allow_single_block: bool = False

    def validate(self) -> ShareOptions:
        if self.init not in INITS:
            raise BadValue(f"--init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.norm not in NORM_MODES:
            raise BadValue(f"--norm {self.norm!r}: choose one of {', '.join(NORM_MODES)}")
        if str(self.gamma_init) not in GAMMA_INITS:
            raise BadValue(f"--gamma-init {self.gamma_init!r}: choose copy or 0.1")
        if self.iterations is not None and self.iterations < 1:
            raise BadValue(f"--iterations must be at least 1, got {self.iterations}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise BadValue(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.stages is not None:
            if not self.stages:
                raise BadValue("--stages names no stage")
            if any(s < 0 for s in self.stages):
                raise BadValue(f"--stages {','.join(map(str, self.stages))}: stage indices start at 0")
            if len(set(self.stages)) != len(self.stages):
                raise BadValue(f"--stages {','.join(map(str, self.stages))}: a stage is named twice")
        return self


def parse_stages(text: str | None) -> list[int] | None:
    """``--stages 0,2`` → ``[0, 2]``; ``None``/empty → ``None`` (the default choice)."""
    if text is None or not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadValue(f"--stages {text!r}: expected comma-separated stage indices, e.g. 0 or 0,1") from None


@dataclass(frozen=True)
class StagePlan:
    """Where one shared stage goes: the replaced identity blocks and the names of the iterations."""

    stage: int
    container: str
    blocks: tuple[str, ...]
    iterations: tuple[str, ...]
    # The shared block's name under ``resprobe_shared``; None = the container's (one shared block per
    # container, as vision stages). A language-model span of period P puts P shared layers in one list.
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"stage": self.stage, "container": self.container, "blocks": list(self.blocks),
             "iterations": list(self.iterations)}
        return {**d, "key": self.key} if self.key is not None else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StagePlan:
        key = d.get("key")
        return cls(int(d["stage"]), str(d["container"]), tuple(d["blocks"]), tuple(d["iterations"]),
                   str(key) if key is not None else None)


@dataclass
class SharedStage:
    """One shared stage as the ``share`` report lists it."""

    stage: int
    blocks: list[str]
    iterations: int
    init: str
    names: list[str] = field(default_factory=list)
    norm: str = "unshared"
    lora_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ShareResult:
    params_before: int
    params_after: int
    stages: list[SharedStage]
    recipe: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Normalization layers and the per-iteration modules


def is_norm(module: nn.Module) -> bool:
    """A normalization layer, by type: torch's norms (and their subclasses such as timm's
    ``BatchNormAct2d``, ``LayerNorm2d``), or any class named ``*Norm*`` that holds no conv/linear
    layer (timm ``RmsNorm``, ``EvoNorm2d*``, torchvision ``FrozenBatchNorm2d``; not ``ConvNormAct``)."""
    if isinstance(module, _NORM_TYPES):
        return True
    if any(cls.__name__.startswith("LayerScale") for cls in type(module).__mro__):  # timm LayerScale(2d)
        return True
    if not any("Norm" in cls.__name__ for cls in type(module).__mro__ if cls is not nn.Module):
        return False
    return not any(is_weight_layer(m) for m in module.modules())


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def is_weight_layer(module: nn.Module) -> bool:
    """A conv or linear layer (LoRA targets): torch's, or transformers' transposed ``Conv1D``."""
    return isinstance(module, _WEIGHT_LAYERS) or is_transposed_linear(module)


def norm_paths(block: nn.Module) -> list[str]:
    """Paths of the outermost normalization layers inside ``block``."""
    paths: list[str] = []
    for name, module in block.named_modules():
        if name and is_norm(module) and not any(name.startswith(p + ".") for p in paths):
            paths.append(name)
    return paths


def weight_paths(block: nn.Module) -> list[str]:
    """Paths of the conv and linear layers inside ``block`` that are not inside a norm (LoRA targets)."""
    norms = norm_paths(block)
    return [name for name, module in block.named_modules()
            if is_weight_layer(module) and isinstance(getattr(module, "weight", None), nn.Parameter)
            and not any(name == p or name.startswith(p + ".") for p in norms)]


def layer_scale_names(block: nn.Module) -> list[str]:
    """Per-channel layer scales held by the block itself (timm ConvNeXt ``gamma``, torchvision
    ``CNBlock.layer_scale``, NFNet ``skipinit_gain``): parameters registered on the block, not in a
    submodule. They stay per iteration like the norms (docs/reference.md "Sharing a stage")."""
    return [name for name, p in block._parameters.items() if p is not None]


def _config(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain settings of every submodule (``shift_size``, ...): what a block's forward reads besides tensors."""
    plain = (int, float, bool, str, tuple, list, type(None))
    return {path: {k: v for k, v in vars(m).items()
                   if not k.startswith("_") and k != "training" and isinstance(v, plain)}
            for path, m in module.named_modules()}


def _differing_config(originals: Sequence[nn.Module]) -> list[tuple[str, str]]:
    """(module path, attribute) of the plain settings that differ between the replaced blocks (a Swin
    stage alternates ``shift_size``): each iteration keeps its block's."""
    configs = [_config(o) for o in originals]
    return [(path, attr) for path, attrs in configs[0].items() for attr, value in attrs.items()
            if any(c.get(path, {}).get(attr, value) != value for c in configs[1:])]


def _non_persistent_buffers(block: nn.Module) -> dict[str, Tensor]:
    return {f"{path}.{name}" if path else name: value for path, m in block.named_modules()
            for name, value in m._buffers.items() if value is not None and name in m._non_persistent_buffers_set}


def _differing_buffers(originals: Sequence[nn.Module], skip: Sequence[str]) -> list[str]:
    """Non-persistent buffers outside the norms whose values differ between the replaced blocks (a
    Swin block's shifted-window ``attn_mask``): each iteration keeps its block's. Only buffers a
    block computes when it is built, so that rebuilding a shared model from its checkpoint finds
    the same ones; trained state (running statistics) lives in the norms."""
    buffers = [_non_persistent_buffers(o) for o in originals]
    return [name for name, value in buffers[0].items()
            if not any(name.startswith(p + ".") for p in skip)
            and any(name not in b or b[name].shape != value.shape or not torch.equal(b[name], value)
                    for b in buffers[1:])]


def _buffer_key(path: str) -> str:
    return "buffer__" + path.replace(".", "__")


def _set_unregistered(obj: nn.Module, name: str, value: Any) -> None:
    # nn.Module.__setattr__ would register a module value as a child: the shared block must stay
    # reachable from the model once only, and a slot's target belongs to its iteration.
    object.__setattr__(obj, name, value)


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at dotted ``path`` under ``root``, creating plain containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(leaf, module)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    (root.get_submodule(parent) if parent else root).add_module(leaf, module)


class _Slot(nn.Module):
    """Stands in the shared block for a module each iteration owns (its norms); runs the running
    iteration's module. Holds no parameters."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        _set_unregistered(self, "target", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        target = self.target
        if target is None:
            raise RuntimeError(f"the shared block's {self.path} runs only inside one of its iterations")
        return target(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"per-iteration {self.path}"


# --------------------------------------------------------------------------------------------------
# Per-thread views of a shared block


_THREAD = threading.local()  # .views: {id(shared block): (shared block, view)} of a caching thread


def module_tree_view(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of modules that holds the same parameter and buffer tensors (no data
    is copied): attributes set on the copy, and parameters or buffers swapped in it, leave ``module``
    as it is. Hooks are shared (each copy keeps the hook dictionaries of its original)."""
    view = copy.copy(module)
    view.__dict__["_parameters"] = dict(module._parameters)
    view.__dict__["_buffers"] = dict(module._buffers)
    view.__dict__["_modules"] = {name: module_tree_view(child) if child is not None else None
                                 for name, child in module._modules.items()}
    return view


def cache_thread_views() -> None:
    """From now on, this thread builds each shared block's view once (a thread pool's initializer).
    Only for threads that end with their work: a view does not follow a later ``model.to(...)``."""
    _THREAD.views = {}


def thread_view(shared_block: nn.Module) -> nn.Module:
    """The tree this thread runs ``shared_block``'s iterations in: the block itself in the main thread,
    a view of it (:func:`module_tree_view`) in any other, so that threads never share a slot's target."""
    if threading.current_thread() is threading.main_thread():
        return shared_block
    views: dict[int, tuple[nn.Module, nn.Module]] | None = getattr(_THREAD, "views", None)
    if views is None:
        return _idle_view(shared_block)
    entry = views.get(id(shared_block))
    if entry is None or entry[0] is not shared_block:
        entry = views[id(shared_block)] = (shared_block, _idle_view(shared_block))
    return entry[1]


def _idle_view(shared_block: nn.Module) -> nn.Module:
    view = module_tree_view(shared_block)
    for module in view.modules():  # copied while another thread runs an iteration: not that one's
        if isinstance(module, _Slot):
            _set_unregistered(module, "target", None)
    return view


class LowRank(nn.Module):
    """One iteration's correction of one shared weight: ``W_t = W + B @ A`` with W as [O, rest]
    (``transposed``: a Conv1D weight stored [in, out], corrected by ``(B @ A)ᵀ`` so that B maps the
    rank to the outputs and A the inputs to the rank, as for any linear layer)."""

    def __init__(self, A: Tensor, B: Tensor, transposed: bool = False):
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.transposed = transposed

    def delta(self, like: Tensor) -> Tensor:
        product = self.B @ self.A
        return product.T if self.transposed else product.view_as(like)

    def extra_repr(self) -> str:
        t = ", transposed" if self.transposed else ""
        return f"rank={self.A.shape[0]}, A={list(self.A.shape)}, B={list(self.B.shape)}{t}"


class Offset(nn.Module):
    """One iteration's additive correction of a shared parameter that is not a conv/linear weight (a
    bias, a Swin relative position bias table), given with ``--lora-rank`` so that full rank
    reproduces the original blocks exactly."""

    def __init__(self, delta: Tensor):
        super().__init__()
        self.delta = nn.Parameter(delta)


class SharedIteration(nn.Module):
    """Iteration t of a shared stage: the shared block run with this iteration's own modules.

    Registered children: the modules this iteration owns, at their paths inside the block (``bn1``,
    ``se.bn``, ...), and ``lora`` (one :class:`LowRank` per shared weight, at the weight's path).
    ``shared_block`` is deliberately not registered (see the module docstring).
    """

    def __init__(self, shared_block: nn.Module, inner_family: BlockFamily, iteration: int,
                 own: dict[str, nn.Module], lora: dict[str, LowRank], scales: dict[str, Tensor] | None = None,
                 offsets: dict[str, Offset] | None = None, config: dict[tuple[str, str], Any] | None = None,
                 buffers: dict[str, Tensor] | None = None):
        super().__init__()
        _set_unregistered(self, "shared_block", shared_block)
        self.inner_family = inner_family
        self.iteration = iteration
        self.own_paths = tuple(own)
        self.lora_paths = tuple(lora)
        self.scale_names = tuple(scales or {})
        self.offset_paths = tuple(offsets or {})
        self.config = dict(config or {})  # (module path, attribute) -> this iteration's plain setting
        self.buffer_paths = tuple(buffers or {})
        for path, module in own.items():
            _place(self, path, module)
        for name, value in (scales or {}).items():  # at the block's own names (stages.1.blocks.2.gamma)
            self.register_parameter(name, nn.Parameter(value))
        for path, value in (buffers or {}).items():  # derived (e.g. Swin's attention mask): not saved
            self.register_buffer(_buffer_key(path), value, persistent=False)
        if lora or offsets:
            self.lora = nn.Module()
            for path, factors in lora.items():
                _place(self.lora, path, factors)
            for path, offset in (offsets or {}).items():
                _place(self.lora, path, offset)

    @contextlib.contextmanager
    def running(self) -> Iterator[nn.Module]:
        """Within the context, the shared block's slots run this iteration's modules, with this
        iteration's layer scales, settings and buffers. Yields the tree to run: the shared block, or
        this thread's view of it (:func:`thread_view`)."""
        block = thread_view(self.shared_block)
        slots = [(block.get_submodule(p), self.get_submodule(p)) for p in self.own_paths]
        busy = [slot.path for slot, _ in slots if slot.target is not None]
        if busy:  # another iteration is inside this tree: its norms would be replaced under it
            raise RuntimeError(f"iteration {self.iteration} of a shared block started while another iteration "
                               f"runs it ({busy[0]} is taken)")
        for slot, own in slots:
            _set_unregistered(slot, "target", own)
        saved_config = {}
        for (path, attr), value in self.config.items():
            module = block.get_submodule(path)
            saved_config[(path, attr)] = getattr(module, attr)
            object.__setattr__(module, attr, value)
        saved_buffers = {}
        for path in self.buffer_paths:
            parent, _, name = path.rpartition(".")
            module = block.get_submodule(parent)
            saved_buffers[path] = module._buffers[name]
            module._buffers[name] = self._buffers[_buffer_key(path)]
        for name in self.scale_names:
            block._parameters[name] = self._parameters[name]
        try:
            yield block
        finally:
            for name in self.scale_names:
                block._parameters.pop(name, None)
            for path, value in saved_buffers.items():
                parent, _, name = path.rpartition(".")
                block.get_submodule(parent)._buffers[name] = value
            for (path, attr), value in saved_config.items():
                object.__setattr__(block.get_submodule(path), attr, value)
            for slot, _ in slots:
                _set_unregistered(slot, "target", None)

    def relaxed_weights(self) -> dict[str, Tensor]:  # keys are paths, valid in any view of the block
        """``{path.weight: W + B_t A_t}`` for every shared weight with a LoRA correction, and
        ``{path: p + δ_t}`` for every other shared parameter with an offset."""
        weights = {}
        for path in self.lora_paths:
            weight = self.shared_block.get_submodule(path).weight
            factors: LowRank = self.lora.get_submodule(path)  # type: ignore[assignment]
            weights[f"{path}.weight"] = weight + factors.delta(weight)
        for path in self.offset_paths:
            offset: Offset = self.lora.get_submodule(path)  # type: ignore[assignment]
            weights[path] = self.shared_block.get_parameter(path) + offset.delta
        return weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.running() as block:
            if not self.lora_paths and not self.offset_paths:
                return block(*args, **kwargs)
            return torch.func.functional_call(block, self.relaxed_weights(), args, kwargs)

    def owned(self, module: nn.Module | None) -> nn.Module | None:
        """This iteration's own module where the shared block has a slot, else the shared module."""
        if isinstance(module, _Slot):
            return self.get_submodule(module.path)
        return module

    def norm_modules(self) -> list[nn.Module]:
        """The norms this iteration runs: its own, or (naive sharing) the shared block's."""
        own = [self.get_submodule(p) for p in self.own_paths]
        if any(is_norm(m) for m in own):
            return [m for m in own if is_norm(m)]
        return [self.shared_block.get_submodule(p) for p in norm_paths(self.shared_block)]

    def extra_repr(self) -> str:
        return f"iteration={self.iteration}, shared={type(self.shared_block).__name__}"


@dataclass(frozen=True)
class SharedIterationFamily(BlockFamily):
    """Block knowledge for an iteration: the replaced block class's own family, applied to the shared
    block, with the iteration's own module wherever the shared block has a slot (so a hook on the
    branch end of iteration t fires for iteration t only when that module is per-iteration)."""

    inner: BlockFamily = GENERIC

    def branch_end_module(self, block: nn.Module) -> nn.Module | None:
        return block.owned(self.inner.branch_end_module(block.shared_block))  # type: ignore[operator]

    def shortcut_module(self, block: nn.Module) -> nn.Module | None:
        return block.owned(self.inner.shortcut_module(block.shared_block))  # type: ignore[operator]

    def lesion(self, block: nn.Module, h: Tensor) -> Tensor:
        with block.running() as tree:  # type: ignore[attr-defined]
            return self.inner.lesion(tree, h)


_ITERATION_CLASSES: dict[BlockFamily, type[SharedIteration]] = {}


def iteration_class(inner: BlockFamily) -> type[SharedIteration]:
    """One SharedIteration subclass per replaced block family, so that family fields such as
    ``preact`` (which resprobe reads per block class) are the replaced block's."""
    cls = _ITERATION_CLASSES.get(inner)
    if cls is None:
        cls = type(f"SharedIteration_{re.sub(r'[^0-9A-Za-z]', '_', inner.name)}", (SharedIteration,),
                   {"__module__": __name__})
        scale = inner.branch_scale
        inherited = {f.name: getattr(inner, f.name) for f in dataclasses.fields(BlockFamily)}
        register_block_family(cls, SharedIterationFamily(**{
            **inherited, "name": f"shared:{inner.name}", "inner": inner,
            # An iteration is always a block: the replaced blocks' skip condition does not apply to it.
            "residual_if": None,
            "branch_scale": (lambda it: scale(it.shared_block)) if scale is not None else None}))
        _ITERATION_CLASSES[inner] = cls
    return cls


def shared_iterations(model: nn.Module) -> list[SharedIteration]:
    return [m for m in model.modules() if isinstance(m, SharedIteration)]


def shared_weights_summary(anatomy: Anatomy) -> list[dict[str, Any]]:
    """Each shared block once: ``{name, stage, iterations, params}``, where ``iterations`` are the
    blocks (iterations) that run it and ``params`` its parameters. A block's own ``params`` in
    :class:`Anatomy` are only what the iteration owns (its norms, LoRA factors), so the blocks' params,
    these, and the parameters outside the blocks add up to ``count_params(model)``."""
    holder = anatomy.model._modules.get(SHARED_ATTR)
    names = {id(m): n for n, m in holder.named_children()} if holder is not None else {}
    groups: dict[int, dict[str, Any]] = {}
    for block in anatomy.blocks:
        if not isinstance(block.module, SharedIteration):
            continue
        shared = block.module.shared_block
        entry = groups.setdefault(id(shared), {
            "name": f"{SHARED_ATTR}.{names[id(shared)]}" if id(shared) in names else None, "stage": block.stage,
            "iterations": [], "params": sum(p.numel() for p in shared.parameters())})
        entry["iterations"].append(block.name)
    return list(groups.values())


# --------------------------------------------------------------------------------------------------
# Planning: which blocks, which names


def _child_name(block_name: str, container: str) -> str:
    return block_name[len(container) + 1 :] if container else block_name


def _extra_names(container: nn.Module, count: int) -> list[str]:
    """Names for iterations beyond the replaced blocks: the next indices of the stage container."""
    taken = set(container._modules)
    numbers = [int(n) for n in taken if n.isdigit()]
    start = max(numbers) + 1 if numbers else len(taken)
    names: list[str] = []
    candidate = start
    while len(names) < count:
        if str(candidate) not in taken:
            names.append(str(candidate))
        candidate += 1
    return names


def plan_sharing(anatomy: Anatomy, options: ShareOptions) -> list[StagePlan]:
    """The stages to share (docs/reference.md): their identity blocks and where each iteration goes."""
    by_stage: dict[int, list[str]] = {}
    for block in anatomy.blocks:
        by_stage.setdefault(block.stage, [])
        if block.is_identity:
            by_stage[block.stage].append(block.name)
    with_identity = [s for s, names in by_stage.items() if names]
    if options.stages is None:
        stages = [s for s, names in by_stage.items() if len(names) >= 2]
        if not stages:
            raise ModelError("no stage has two identity blocks to share; name stages with --stages "
                             f"(stages with identity blocks: {', '.join(map(str, with_identity)) or 'none'})")
    else:
        stages = list(options.stages)
        for stage in stages:
            if stage not in by_stage:
                raise BadValue(f"--stages: the model has no stage {stage} (stages 0–{max(by_stage)})")
            # One identity block has nothing to share with: sharing it writes the original block back
            # (a no-op checkpoint). Unrolling one block is `ablate --unroll`'s job.
            single = len(by_stage[stage]) < 2 and not options.allow_single_block
            if not by_stage[stage] or single:
                shareable = [s for s, names in by_stage.items() if len(names) >= 2]
                held = f"only one identity block ({by_stage[stage][0]})" if by_stage[stage] else "no identity block"
                raise BadValue(f"--stages: stage {stage} has {held}; sharing needs two or more (stages that can "
                               f"be shared: {', '.join(map(str, shareable)) or 'none'}; to apply one block "
                               "repeatedly, see ablate --unroll)")
    plans = []
    for stage in stages:
        names = by_stage[stage]
        modules = [anatomy[n].module for n in names]
        if any(isinstance(m, SharedIteration) for m in modules):
            raise ModelError(f"stage {stage} is already shared")
        container = names[0].rpartition(".")[0]
        if any(n.rpartition(".")[0] != container for n in names):
            raise ModelError(f"the identity blocks of stage {stage} are not children of one module; cannot share it")
        k = options.iterations or len(names)
        children = [_child_name(n, container) for n in names]
        parent = anatomy.model.get_submodule(container) if container else anatomy.model
        if k > len(names) and not isinstance(parent, nn.Sequential):
            raise ModelError(f"--iterations {k} needs room for more blocks than stage {stage} has, which resprobe "
                             f"can add only to an nn.Sequential stage ({container or 'the model'} is a "
                             f"{type(parent).__name__})")
        iterations = children[:k] + _extra_names(parent, k - len(names)) if k > len(names) else children[:k]
        prefix = container + "." if container else ""
        plans.append(StagePlan(stage, container, tuple(names), tuple(prefix + c for c in iterations)))
    return plans


# --------------------------------------------------------------------------------------------------
# Building a shared stage


def _combine(tensors: Sequence[Tensor], rule: str) -> Tensor:
    """The shared value of one parameter/buffer from the replaced blocks' values."""
    if rule == "first":
        return tensors[0].detach().clone()
    if rule == "last":
        return tensors[-1].detach().clone()
    if not tensors[0].is_floating_point():  # e.g. num_batches_tracked: an average means nothing
        return tensors[0].detach().clone()
    # float64 accumulation: identical weights average back to exactly themselves.
    return torch.stack([t.detach().double() for t in tensors]).mean(0).to(tensors[0].dtype)


def _initialize_shared(shared: nn.Module, originals: Sequence[nn.Module], rule: str, skip: Sequence[str]) -> None:
    states = [o.state_dict() for o in originals]
    combined = {key: _combine([s[key] for s in states], rule) for key in states[0]
                if not any(key.startswith(p + ".") for p in skip)}
    shared.load_state_dict(combined, strict=False)


def _set_gamma(norms: Iterable[nn.Module], value: float) -> None:
    """γ init: every affine weight of the norms (β and running statistics untouched)."""
    with torch.no_grad():
        for norm in norms:
            for module in norm.modules():
                weight = getattr(module, "weight", None)
                if isinstance(weight, Tensor):
                    weight.fill_(value)


def _low_rank(shared_weight: Tensor, target: Tensor | None, rank: int, transposed: bool = False) -> LowRank:
    """Factors of ``target − W`` (W viewed as [O, rest]), rank ``min(R, O, rest)``: ``A`` the top
    right singular vectors, ``B = U·S``. A has orthonormal rows even where the difference is zero, so
    the correction can still learn (a zero A and B would stay zero). ``transposed`` (Conv1D): the
    factors of the difference's transpose, [out, in]."""
    if transposed:
        factors = _low_rank(shared_weight.T, target.T if target is not None else None, rank)
        return LowRank(factors.A.data, factors.B.data, transposed=True).requires_grad_(shared_weight.requires_grad)
    out_features = shared_weight.shape[0]
    rest = shared_weight[0].numel()
    r = min(rank, out_features, rest)
    if target is None:  # rebuilding from a checkpoint: the weights come from the file
        A = torch.zeros(r, rest, dtype=shared_weight.dtype, device=shared_weight.device)
        B = torch.zeros(out_features, r, dtype=shared_weight.dtype, device=shared_weight.device)
    else:
        diff = (target.detach().double() - shared_weight.detach().double()).reshape(out_features, rest)
        U, S, Vh = torch.linalg.svd(diff, full_matrices=False)
        A = Vh[:r].to(shared_weight.dtype).contiguous()
        B = (U[:, :r] * S[:r]).to(shared_weight.dtype).contiguous()
    factors = LowRank(A, B)
    factors.requires_grad_(shared_weight.requires_grad)
    return factors


def _shared_holder(model: nn.Module) -> nn.ModuleDict:
    holder = model._modules.get(SHARED_ATTR)
    if holder is None:
        holder = nn.ModuleDict()
        model.add_module(SHARED_ATTR, holder)
    if not isinstance(holder, nn.ModuleDict):
        raise ModelError(f"the model already has a submodule named {SHARED_ATTR!r}")
    holder._resprobe_hidden = True  # block discovery skips it and everything inside it
    return holder  # type: ignore[return-value]


def _privatizable_branch_end(shared: nn.Module, family: BlockFamily, own: Sequence[str]) -> str | None:
    """The branch end's path when it holds no state (``drop_path``): giving each iteration its own
    copy makes per-iteration hooks on it fire once per iteration."""
    module = family.branch_end_module(shared)
    if module is None or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None
    for name, candidate in shared.named_modules():
        if candidate is module and name:
            return None if any(name == p or name.startswith(p + ".") for p in own) else name
    return None


def _install_iterations(container: nn.Module, plan: StagePlan, iterations: Sequence[nn.Module]) -> None:
    """Put the iterations where the replaced blocks were; later ones after the last replaced block."""
    replaced = [_child_name(n, plan.container) for n in plan.blocks]
    placed = dict(zip((_child_name(n, plan.container) for n in plan.iterations), iterations))
    if isinstance(container, nn.Sequential):
        rebuilt: OrderedDict[str, nn.Module] = OrderedDict()
        for child, module in container._modules.items():
            if child not in replaced:
                rebuilt[child] = module  # type: ignore[assignment]
                continue
            if child in placed:
                rebuilt[child] = placed.pop(child)
            if child == replaced[-1]:
                rebuilt.update(placed)
                placed = {}
        # Rewritten in place: the container keeps its class and its place in the model.
        container._modules.clear()
        container._modules.update(rebuilt)
        return
    if len(placed) > len(replaced):  # pragma: no cover - plan_sharing refuses this
        raise ModelError(f"cannot add iterations to {plan.container} ({type(container).__name__})")
    for child in replaced:
        container.add_module(child, placed.get(child, nn.Identity()))


@dataclass(frozen=True)
class _Settings:
    norm: str
    lora_rank: int | None
    init: str
    gamma_init: str
    # With LoRA, also a per-iteration offset of every other shared parameter (biases), so that full
    # rank reproduces the original blocks (vision). Language models keep their biases shared, as in
    # Relaxed Recursive Transformers.
    offsets: bool = True


def build_shared_stage(model: nn.Module, plan: StagePlan, settings: _Settings,
                       initialize: bool) -> list[SharedIteration]:
    """Replace ``plan``'s blocks by one shared block and its iterations, in place.

    ``initialize``: compute the shared weights, norms and LoRA factors from the replaced blocks;
    otherwise only the structure is built (the weights then come from a checkpoint).
    """
    try:
        originals = [model.get_submodule(name) for name in plan.blocks]
        container = model.get_submodule(plan.container) if plan.container else model
    except AttributeError as exc:
        raise ModelError(f"cannot share stage {plan.stage}: {exc}") from None
    if any(isinstance(o, SharedIteration) for o in originals):
        raise ModelError(f"stage {plan.stage} is already shared")
    inner = family_of(originals[0]) or GENERIC
    shared = copy.deepcopy(originals[0])
    norms = norm_paths(shared)
    per_iteration = list(norms) if settings.norm == "unshared" else []
    scale_names = layer_scale_names(shared) if settings.norm == "unshared" else []
    for name in scale_names:  # each iteration holds its own; the shared block borrows it while running
        del shared._parameters[name]
    config_keys = _differing_config(originals)
    buffer_paths = _differing_buffers(originals, norms)
    if initialize:
        _initialize_shared(shared, originals, settings.init, skip=per_iteration)
        if settings.norm == "shared" and settings.gamma_init == "0.1":
            _set_gamma([shared.get_submodule(p) for p in norms], RECURRENT_GAMMA)
    branch_end = _privatizable_branch_end(shared, inner, per_iteration)
    own_paths = per_iteration + ([branch_end] if branch_end else [])
    if any(p.split(".")[0] == "lora" for p in own_paths):
        raise ModelError(f"cannot share stage {plan.stage}: its blocks have a submodule named 'lora'")
    lora_paths = weight_paths(shared) if settings.lora_rank else []
    for path in own_paths:
        _replace(shared, path, _Slot(path))
    # With LoRA, every other shared parameter (biases, Swin's relative position bias tables) gets a
    # per-iteration offset, so that full rank reproduces the original blocks exactly.
    relaxed = {f"{p}.weight" for p in lora_paths}
    offset_paths = ([n for n, _ in shared.named_parameters() if n not in relaxed]
                    if settings.lora_rank and settings.offsets else [])

    cls = iteration_class(inner)
    iterations: list[SharedIteration] = []
    for t in range(len(plan.iterations)):
        source = originals[min(t, len(originals) - 1)]  # beyond the replaced blocks: the last one's
        own = {p: copy.deepcopy(source.get_submodule(p)) for p in own_paths}
        if initialize and settings.gamma_init == "0.1":
            _set_gamma([own[p] for p in per_iteration], RECURRENT_GAMMA)
        lora = {p: _low_rank(shared.get_submodule(p).weight,
                             source.get_submodule(p).weight if initialize else None, settings.lora_rank or 0,
                             is_transposed_linear(shared.get_submodule(p)))
                for p in lora_paths}
        offsets = {}
        for path in offset_paths:
            base = shared.get_parameter(path)
            delta = (source.get_parameter(path).detach() - base.detach()) if initialize else torch.zeros_like(base)
            offsets[path] = Offset(delta.clone())
            offsets[path].requires_grad_(base.requires_grad)
        scales = {n: source._parameters[n].detach().clone() for n in scale_names}
        config = {(path, attr): copy.deepcopy(getattr(source.get_submodule(path), attr)) for path, attr in config_keys}
        buffers = {path: source.get_buffer(path).detach().clone() for path in buffer_paths}
        iterations.append(cls(shared, inner, t, own, lora, scales, offsets, config, buffers))

    holder = _shared_holder(model)
    key = plan.key or (plan.container or "root").replace(".", "_")
    if key in holder:
        raise ModelError(f"stage {plan.stage} ({plan.container}) is already shared")
    holder[key] = shared
    _install_iterations(container, plan, iterations)
    return iterations


# --------------------------------------------------------------------------------------------------
# The public entry point and the checkpoint recipe


def share_stages(model: nn.Module, anatomy: Anatomy, options: ShareOptions) -> ShareResult:
    """Share the stages ``options`` names, in place (``anatomy`` from ``discover_blocks(model, ...)``).

    Returns parameter counts, what was shared, and the recipe that rebuilds the structure from a
    freshly built model (``save_resprobe_checkpoint(..., recipes=loaded.recipes + [result.recipe])``).
    """
    options.validate()
    plans = plan_sharing(anatomy, options)
    settings = _Settings(options.norm, options.lora_rank, options.init, str(options.gamma_init))
    before = count_params(model)
    for plan in plans:
        build_shared_stage(model, plan, settings, initialize=True)
    after = count_params(model)
    stages = [SharedStage(p.stage, list(p.blocks), len(p.iterations), options.init, list(p.iterations),
                          options.norm, options.lora_rank) for p in plans]
    recipe = {"kind": RECIPE_KIND, "version": RECIPE_VERSION, "norm": options.norm, "lora_rank": options.lora_rank,
              "init": options.init, "gamma_init": str(options.gamma_init), "stages": [p.to_dict() for p in plans]}
    return ShareResult(before, after, stages, recipe)


@register_recipe(RECIPE_KIND)
def rebuild_shared(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Re-apply a share recipe's structure to a freshly built model (weights come from the file)."""
    if int(recipe.get("version", 1)) > RECIPE_VERSION:
        raise ModelError(f"share recipe version {recipe.get('version')} is newer than this resprobe; upgrade resprobe")
    settings = _Settings(str(recipe.get("norm", "unshared")), recipe.get("lora_rank"),
                         str(recipe.get("init", "average")), str(recipe.get("gamma_init", "copy")))
    for stage in recipe.get("stages") or []:
        build_shared_stage(model, StagePlan.from_dict(stage), settings, initialize=False)
    return model


# --------------------------------------------------------------------------------------------------
# Norm recalibration


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), Tensor) and hasattr(module, "reset_running_stats")


RECALIBRATE_SCOPES = ("shared", "all")


def check_recalibrate_scope(scope: str) -> str:
    if scope not in RECALIBRATE_SCOPES:
        raise BadValue(f"--recalibrate-scope {scope!r}: choose shared or all")
    return scope


def recalibration_norms(model: nn.Module, scope: str = "shared") -> list[nn.Module]:
    """Norms with running statistics: those of the shared stages' iterations (``shared``) or every
    one in the model (``all``)."""
    check_recalibrate_scope(scope)
    if scope == "all":
        candidates: Iterable[nn.Module] = model.modules()
    else:
        candidates = (m for it in shared_iterations(model) for norm in it.norm_modules() for m in norm.modules())
    unique = {id(m): m for m in candidates if _has_running_stats(m)}
    return list(unique.values())


class _CallSums:
    """One norm's statistics over its calls: sums of the batches' means and (unbiased) variances, each
    weighted by its batch size, in float64; the images and calls they came from."""

    def __init__(self, norm: nn.Module):
        self.mean = torch.zeros_like(norm.running_mean, dtype=torch.float64)
        self.var = torch.zeros_like(norm.running_var, dtype=torch.float64)
        self.images = 0
        self.calls = 0

    def add(self, norm: nn.Module, size: int) -> None:
        # momentum 1: after the call the running buffers are exactly this batch's statistics
        self.mean += size * norm.running_mean.double()
        self.var += size * norm.running_var.double()
        self.images += size
        self.calls += 1


def _sum_over_processes(sums: list[_CallSums], sum_over: Callable[[Tensor], None]) -> None:
    """Every process's sums added (one float64 tensor on the CPU, summed in place by ``sum_over``)."""
    flat = torch.cat([t for c in sums for t in (c.mean.cpu(), c.var.cpu())]
                     + [torch.tensor([float(c.images), float(c.calls)], dtype=torch.float64) for c in sums])
    sum_over(flat)
    at = 0
    for c in sums:
        for name in ("mean", "var"):
            size = getattr(c, name).numel()
            getattr(c, name).copy_(flat[at:at + size])
            at += size
    for c in sums:
        c.images, c.calls = int(flat[at].item()), int(flat[at + 1].item())
        at += 2


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    loader: Iterable,
    runtime: Any,
    n_images: int,
    scope: str = "shared",
    progress: Callable[[int], None] | None = None,
    sum_over: Callable[[Tensor], None] | None = None,
) -> int:
    """Re-estimate norm running statistics on ``n_images`` images of ``loader``; returns how many ran.

    The chosen norms' statistics are reset, then estimated in train mode with everything else in eval
    mode and no gradients. Each *call* of a norm gives its batch's mean and unbiased variance (in train
    mode a norm normalizes with its batch's own statistics, so a call does not depend on earlier
    ones); the result is their average over every call, weighted by batch size, summed in float64 —
    what ``momentum=None`` gives for equal batches. A norm shared by K iterations (``--norm shared``)
    runs K times per batch, and each of those K calls counts. ``num_batches_tracked`` is the number
    of calls. Modes and momenta are restored afterwards.

    ``sum_over`` (torchrun: an all-reduce) adds every process's sums before they are divided, when
    each process ran other batches of the same pass: the result is one process's over all the
    batches, up to the order of the float64 additions.
    """
    if n_images < 1:
        raise BadValue(f"--recalibrate must be at least 1, got {n_images}")
    norms = recalibration_norms(model, scope)
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    sums = {m: _CallSums(m) for m in norms}

    def summed(norm: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        sums[norm].add(norm, int(args[0].shape[0]))

    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = 1.0
        norm.train()
    hooks = [norm.register_forward_hook(summed) for norm in norms]
    seen = 0
    try:
        for images, _labels, _index in loader:
            images = images[: n_images - seen]
            size = len(images)
            with runtime.compute():
                model(runtime.batch(images))
            seen += size
            if progress:
                progress(size)
            if seen >= n_images:
                break
    finally:
        for hook in hooks:
            hook.remove()
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
    if sum_over is not None:
        _sum_over_processes(list(sums.values()), sum_over)
    for norm, c in sums.items():
        _set_statistics(norm, c)
    return seen


def _set_statistics(norm: nn.Module, c: _CallSums) -> None:
    """The averages into the norm's buffers (a norm never called keeps its reset statistics)."""
    if c.images == 0:
        norm.reset_running_stats()
        return
    norm.running_mean.copy_((c.mean / c.images).to(norm.running_mean.dtype))
    norm.running_var.copy_((c.var / c.images).to(norm.running_var.dtype))
    tracked = getattr(norm, "num_batches_tracked", None)
    if isinstance(tracked, Tensor):
        tracked.fill_(c.calls)


# --------------------------------------------------------------------------------------------------
# Output files


def check_out_path(path: str | Path, overwrite: bool = False, option: str = "--out") -> Path:
    """An ``--out`` path that may be written: its directory exists; an existing file only with ``overwrite``."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise BadValue(f"{option} {out} is a directory; give a file path")
    if not out.parent.is_dir():
        raise BadValue(f"{option} {out}: directory {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise BadValue(f"{option} {out} already exists; pass --overwrite to replace it")
    return out


def check_rebuildable(loaded: Any) -> None:
    """A file resprobe writes must name an architecture it can build again (not a pickled module)."""
    if loaded.arch.get("source") not in ("timm", "hf-hub", "torchvision", "callable"):
        raise ModelError(f"cannot write a resprobe checkpoint for a model loaded as {loaded.arch.get('source')}; give "
                         "the architecture as MODEL and the weights as --checkpoint")
