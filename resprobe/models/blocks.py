"""Residual block discovery, kinds, stages, and how to run a model on from one block.

A block is one residual unit (docs/reference.md)::

    post-activation:  out = post(shortcut(h) + F(h))   torchvision/timm BasicBlock, Bottleneck, RegNet, ...
    pre-activation:   out = shortcut(h) + F(h)          PreAct ResNets, ConvNeXt, inverted residuals, NFNet
    transformer:      out = h + A(h) + M(·)             ViT/DeiT, Swin (one unit, F = U = out − h)

What resprobe needs to know about a block is keyed on its **class** (:mod:`resprobe.models.families`,
re-exported here). This module finds the blocks of a model, their stages, and the modules that run
between them (so that the model can be run on from any block's input: :meth:`Anatomy.run_from`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from resprobe.errors import ModelError
from resprobe.models.families import (
    GENERIC,
    BlockFamily,
    block_family,
    family_of,
    known_block_classes,
    register_block_family,
)

# --------------------------------------------------------------------------------------------------
# Blocks and the network around them


@dataclass
class Block:
    """One residual block of a model, as resprobe reports it."""

    name: str
    module: nn.Module = field(repr=False)
    family: BlockFamily = field(repr=False)
    stage: int = 0
    index: int = 0
    kind: str = "identity"  # "identity" | "transition"
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    params: int = 0

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    @property
    def can_lesion(self) -> bool:
        """Whether resprobe can remove this block: identity blocks always, transitions when their
        shortcut module (or the family's own lesion) is known."""
        return (self.is_identity or self.family.lesion_fn is not None
                or self.family.shortcut_module(self.module) is not None)

    def lesion(self, h: Tensor, *_args: Any, **_kwargs: Any) -> Tensor:
        """The block with its residual branch removed. What else the model passes the block (a rotary
        embedding, a mask) is accepted and not needed: the shortcut reads ``h`` only."""
        if not self.can_lesion:
            raise ModelError(f"cannot remove transition block {self.name}: resprobe does not know its shortcut "
                             f"({type(self.module).__name__}); leave out --include-transitions")
        return self.family.lesion(self.module, h)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "index": self.index, "kind": self.kind,
                "in_shape": list(self.in_shape), "out_shape": list(self.out_shape), "params": self.params}


BlockFn = Callable[..., Tensor]  # called as the block is: (h, *args, **kwargs) -> its output
# What a block receives besides its input, as the model called it: (args after the first, kwargs).
Extras = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Segment:
    """Blocks ``first..last`` that run inside ``wrapper`` on a tensor it derives from its input, and whose
    result it merges with something else: a CSPNet stage runs its blocks on one half of a split and
    concatenates the other half back. The model runs on from such a block by running the blocks after
    it in ``container`` (the module that holds them, called once by ``wrapper``), then ``wrapper`` on
    its cached input with ``container`` answering that result (its own prefix and merge recomputed),
    then ``after``: to the next segment's wrapper input, or for the last segment to the logits.
    """

    wrapper: nn.Module = field(repr=False)
    container: nn.Module = field(repr=False)
    first: int
    last: int
    tail: tuple[nn.Module, ...] = field(default=(), repr=False)  # last block's output -> container's output
    after: Callable[[Tensor], Tensor] = field(default=lambda x: x, repr=False)


@dataclass
class Anatomy:
    """A model's residual blocks in execution order, and how to finish the forward pass after one.

    ``chained`` is true when each block's input is the previous block's output, so running blocks
    ``k..end`` and then ``head`` reproduces the model from block ``k``'s input. ``head`` maps the last
    block's output to logits (final norm, pooling, classifier), ``None`` where unknown.
    """

    model: nn.Module = field(repr=False)
    blocks: list[Block]
    head: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    chained: bool = False
    # glue[i]: the modules that run, in order, between block i's output and block i+1's input (a
    # ConvNeXt/Swin downsample, an inverted residual without skip); for the last block, those before
    # ``head`` (already part of ``head``). Empty where the blocks follow each other directly.
    glue: list[tuple[nn.Module, ...]] = field(default_factory=list, repr=False)
    # Where the blocks are not one chain but chains inside stages that split and merge (CSPNet): the
    # stages, in order, every block in one of them (``glue`` then links the blocks of one segment).
    segments: list[Segment] = field(default_factory=list, repr=False)

    def __getitem__(self, name: str) -> Block:
        for block in self.blocks:
            if block.name == name:
                return block
        raise ModelError(f"no block named {name!r}; blocks are {', '.join(b.name for b in self.blocks[:6])}"
                         + (", ..." if len(self.blocks) > 6 else ""))

    def position(self, name: str) -> int:
        return self.blocks.index(self[name])

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def to_pandas(self) -> Any:
        """One row per block (name, stage, index, kind, in_shape, out_shape, params): ``rp.blocks``."""
        from resprobe.dataframes import frame

        return frame([b.to_dict() for b in self.blocks], ("name", "stage", "index", "kind", "in_shape",
                                                          "out_shape", "params"))

    @property
    def identity_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.is_identity]

    @property
    def can_run_suffix(self) -> bool:
        return (self.chained and self.head is not None) or bool(self.segments)

    def segment_of(self, position: int) -> Segment | None:
        """The segment holding block ``position`` (None for a plain chain)."""
        return next((s for s in self.segments if s.first <= position <= s.last), None)

    def run_from(self, position: int, h: Tensor, replace: Mapping[int, BlockFn] | None = None,
                 entry: Tensor | None = None, extras: Mapping[int, Extras] | None = None) -> Tensor:
        """Logits from block ``position``'s input ``h``: blocks ``position..end`` (each optionally
        replaced, e.g. by its lesion) with the modules between them, then the head. In a segmented
        model ``entry`` is the input of the segment's wrapper (:class:`Segment`). ``extras[i]``: what
        block i received besides its input in the model's own forward (EVA's ``rope=``, a mask),
        passed again to it or to its replacement."""
        if not self.can_run_suffix:
            raise ModelError("this model's blocks are not a simple chain; resprobe cannot run it from a block")
        replace = replace or {}
        extras = extras or {}
        if self.segments:
            if entry is None:
                raise ValueError("run_from in a segmented model needs the segment's input (entry)")
            return self._run_segments_from(position, h, replace, entry, extras)
        for i in range(position, len(self.blocks)):
            h = self._run_block(i, h, replace, extras)
            if i < len(self.glue):  # the modules between block i and block i + 1
                for module in self.glue[i]:
                    h = module(h)
        assert self.head is not None
        return self.head(h)

    def _run_block(self, i: int, h: Tensor, replace: Mapping[int, BlockFn], extras: Mapping[int, Extras]) -> Tensor:
        fn = replace.get(i) or self.blocks[i].module
        args, kwargs = extras.get(i, ((), {}))
        return fn(h, *args, **kwargs)

    def _run_segments_from(self, position: int, h: Tensor, replace: Mapping[int, BlockFn],
                           entry: Tensor, extras: Mapping[int, Extras]) -> Tensor:
        segment = self.segment_of(position)
        assert segment is not None
        for i in range(position, segment.last + 1):
            h = self._run_block(i, h, replace, extras)
            for module in self.glue[i] if i < segment.last else segment.tail:
                h = module(h)
        # Replacements in later segments patch those blocks (the wrappers' own forwards run them).
        later = sorted(i for i in replace if i > segment.last)
        start = self.segments.index(segment)
        with _answering(segment.container, h), replaced_blocks([self.blocks[i] for i in later],
                                                               [replace[i] for i in later]):
            x = segment.after(segment.wrapper(entry))
            for following in self.segments[start + 1:]:
                x = following.after(following.wrapper(x))
        return x


@contextlib.contextmanager
def _answering(module: nn.Module, value: Tensor) -> Iterator[None]:
    """Within the context, ``module`` returns ``value`` whatever it is called with."""
    saved = module.__dict__.get("forward")
    module.forward = lambda *_args, **_kwargs: value  # type: ignore[method-assign]
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved  # type: ignore[method-assign]


def _head_candidates(model: nn.Module) -> list[Callable[[Tensor], Tensor]]:
    """Ways a model may map its last features to logits (docs/reference.md "Readout"); discovery keeps the
    first that reproduces the model's own logits. Nothing here imports a library: the attributes
    tell (timm's ``forward_head``, after its final ``norm`` where ``forward_features`` ends with one;
    torchvision's ``avgpool`` + ``fc``/``classifier``; a torchvision ViT's class token + ``heads``)."""
    candidates: list[Callable[[Tensor], Tensor]] = []
    forward_head = getattr(model, "forward_head", None)
    norm = getattr(model, "norm", None)
    if callable(forward_head):
        if isinstance(norm, nn.Module):
            candidates.append(lambda x: forward_head(norm(x)))
        candidates.append(forward_head)
    avgpool = getattr(model, "avgpool", None)
    for attr in ("fc", "classifier"):
        layer = getattr(model, attr, None)
        if isinstance(avgpool, nn.Module) and isinstance(layer, nn.Module):
            candidates.append(lambda x, layer=layer: layer(torch.flatten(avgpool(x), 1)))
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module) and avgpool is None:  # torchvision MobileNetV2: a functional pool
        candidates.append(lambda x: classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.Module) and getattr(model, "class_token", None) is not None:
        candidates.append(lambda x: heads(x[:, 0]))
    return candidates


def _candidate_blocks(model: nn.Module, globs: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    if globs:
        picked = [(n, m) for n, m in model.named_modules() if n and any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not picked:
            raise ModelError(f"--blocks {','.join(globs)} matches no module of the model")
    else:
        picked = [(n, m) for n, m in model.named_modules() if n and block_family(m) is not None]
    # Modules marked ``_resprobe_hidden`` (e.g. the one shared block behind a shared stage's
    # iterations) and everything inside them are never blocks of their own.
    # Removed blocks (``_resprobe_removed`` placeholders of a pruned model, see ablate.py) are not
    # blocks either, nor is anything they kept inside (a removed transition's shortcut).
    hidden = [n for n, m in model.named_modules()
              if n and (getattr(m, "_resprobe_hidden", False) or getattr(m, "_resprobe_removed", False))]
    picked = [(n, m) for n, m in picked if not any(n == h or n.startswith(h + ".") for h in hidden)]
    # Keep the outermost matches only: a block is never inside another block.
    outer: list[tuple[str, nn.Module]] = []
    for name, module in picked:
        if not any(name.startswith(o + ".") for o, _ in outer):
            outer.append((name, module))
    return outer


def require_blocks(model: nn.Module, globs: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The candidate block modules; a clear error, without running the model, when there are none."""
    candidates = _candidate_blocks(model, globs)
    if not candidates:
        raise ModelError(
            f"no residual blocks found in {type(model).__name__} (known block classes: "
            f"{', '.join(known_block_classes())}); if it has residual blocks of its own, name them with "
            "--blocks GLOB,... (e.g. --blocks 'body.*')"
        )
    return candidates


@dataclass
class _Call:
    """One module call of the dummy forward whose only argument is one tensor."""

    module: nn.Module
    name: str
    x: Tensor
    out: Tensor | None = None
    end: int = 0  # len(calls) when the call returned: the calls before it are nested in it


def _calls_recorder(model: nn.Module, skip: Callable[[str], bool]) -> tuple[list[_Call], list[Any]]:
    """Hooks that list, in call order (outer modules first), the calls of modules not skipped."""
    calls: list[_Call] = []
    handles = []
    for name, module in model.named_modules():
        if not name or skip(name):
            continue

        def pre(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
                calls.append(_Call(m, name, args[0]))

        def post(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if len(args) == 1 and not kwargs and isinstance(out, Tensor):
                for call in reversed(calls):
                    if call.module is m and call.x is args[0] and call.out is None:
                        call.out, call.end = out, len(calls)
                        break

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    return calls, handles


def _path(calls: list[_Call], start: Tensor, accept: Callable[[Tensor], bool], limit: int = 32
          ) -> list[_Call] | None:
    """The module calls that lead from ``start`` to a tensor ``accept`` takes: each step the outermost
    call that received the current tensor (and nothing else). None when there is no such chain."""
    t, path, after = start, [], 0
    for _ in range(limit + 1):
        if accept(t):
            return path
        step = next((i for i in range(after, len(calls)) if calls[i].x is t and calls[i].out is not None), None)
        if step is None:
            return None
        path.append(calls[step])
        # The next step starts after this call returned: a call nested in it that received its output
        # (an in-place activation returns its input) is part of it, not a step of its own.
        t, after = calls[step].out, calls[step].end  # type: ignore[assignment]
    return None


def _stages(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """(stage, index) of each block, the stage being its group's own index (docs/reference.md).

    A group is the module holding the blocks (``layer3``, ``stages.2.blocks``, a ViT's ``blocks``).
    Its index is its position among the model's modules named alike up to numbers (``layer3`` among
    ``layer1..4`` → 2, ``stages.2.blocks`` → 2), so that naming some stages with ``--blocks`` keeps
    their indices. A flat container whose blocks are interleaved with other modules (torchvision
    MobileNet's ``features``) holds one group per run of consecutive blocks. Where these rules give two
    groups one index, groups are numbered in execution order instead.
    """
    modules = dict(model.named_modules())
    groups: list[tuple[str, int]] = []  # (parent, run) in execution order
    member: dict[str, tuple[str, int]] = {}
    last: dict[str, tuple[int, int]] = {}  # parent -> (child position of its latest block, its run)
    for name in names:
        parent, _, child = name.rpartition(".")
        position = list((modules[parent] if parent else model)._modules).index(child)
        previous = last.get(parent)
        run = 0 if previous is None else previous[1] + (position != previous[0] + 1)
        last[parent] = (position, run)
        member[name] = (parent, run)
        if (parent, run) not in groups:
            groups.append((parent, run))
    pattern_of = {n: re.sub(r"\d+", "#", n) for n in modules if n}
    own: dict[tuple[str, int], int] = {}
    for parent, run in groups:
        if last[parent][1] > 0:  # several runs in one container
            own[(parent, run)] = run
        else:
            pattern = re.sub(r"\d+", "#", parent)
            siblings = [n for n, p in pattern_of.items() if p == pattern] if parent else [""]
            own[(parent, run)] = siblings.index(parent)
    if len(set(own.values())) != len(own):
        own = {g: i for i, g in enumerate(groups)}
    counts: dict[tuple[str, int], int] = {}
    result = {}
    for name in names:
        group = member[name]
        result[name] = (own[group], counts.get(group, 0))
        counts[group] = counts.get(group, 0) + 1
    return result


def discover_blocks(
    model: nn.Module,
    input_shape: Sequence[int],
    globs: Sequence[str] | None = None,
) -> Anatomy:
    """Find the residual blocks of ``model`` with one dummy forward of shape ``input_shape`` (C, H, W).

    Blocks come in execution order with their stage (index of the group they are in), index within
    the stage, kind (``identity`` when the shortcut is the identity: the output has the input's shape
    and no module projects or pools the shortcut) and shapes. The same pass
    finds the modules between consecutive blocks and the head, checked against the model's logits,
    so that :meth:`Anatomy.run_from` reproduces the model from any block.
    """
    candidates = require_blocks(model, globs)
    seen: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    handles = []

    def pre_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = {"in": args[0], "in_shape": tuple(args[0].shape[1:]), "extras": (args[1:], kwargs)}
                order.append(name)
        return hook

    def post_hook(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            if name in seen and "out" not in seen[name] and isinstance(out, Tensor):
                seen[name]["out"] = out
                seen[name]["out_shape"] = tuple(out.shape[1:])
        return hook

    # Removed blocks' placeholders are watched too, only so that the remaining blocks keep the stage
    # and index they had before pruning (reports line up with the original model's).
    placeholders = {n: m for n, m in model.named_modules() if n and getattr(m, "_resprobe_removed", False)}
    watched = [*candidates, *placeholders.items()]
    for name, module in watched:
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name)))
    # Glue candidates: modules neither inside a block nor holding one (a removed block's placeholder
    # is glue: it runs between the blocks that remain).
    block_names = [n for n, _ in candidates]
    calls, call_handles = _calls_recorder(model, lambda n: any(
        n == b or n.startswith(b + ".") or b.startswith(n + ".") for b in block_names))
    handles += call_handles
    # The modules holding blocks (a stage, its ``blocks``): their calls, for segments (CSPNet stages).
    holders = {n: m for n, m in model.named_modules() if n and any(b.startswith(n + ".") for b in block_names)}
    holder_calls: dict[str, list[tuple[Tensor | None, Any]]] = {}
    for name, module in holders.items():
        def holder_hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = name) -> None:
            single = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
            holder_calls.setdefault(name, []).append((args[0] if single else None, out))
        handles.append(module.register_forward_hook(holder_hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    dummy = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    if param is not None:
        dummy = dummy.to(param.device, param.dtype)
    try:
        with torch.no_grad():
            logits = model(dummy)
    except RuntimeError as exc:
        raise ModelError(f"the model does not run on inputs of shape {list(input_shape)}: "
                         f"{str(exc).splitlines()[0]} (check --input-size)") from exc
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    modules = dict(candidates)
    ran = [name for name in order if "out" in seen[name]]
    positions = _stages(model, ran)
    blocks: list[Block] = []
    for name in ran:
        if name in placeholders:
            continue
        info = seen[name]
        module = modules[name]
        family = family_of(module) or GENERIC
        # Identity: the shortcut is h itself, which needs the shapes to match AND no projection or
        # pooling on it (a ResNetV2 stage opener projects even where the stem is as wide as the stage).
        identity = info["in_shape"] == info["out_shape"] and family.has_identity_shortcut(module)
        kind = "identity" if identity else "transition"
        stage, index = positions[name]
        blocks.append(Block(name=name, module=module, family=family, stage=stage, index=index, kind=kind,
                            in_shape=info["in_shape"], out_shape=info["out_shape"],
                            params=sum(p.numel() for p in module.parameters())))
    if not blocks:
        raise ModelError(f"none of the residual blocks of {type(model).__name__} ran on a dummy input")

    glue: list[tuple[nn.Module, ...]] = []
    for a, b in zip(blocks, blocks[1:]):
        target = seen[b.name]["in"]
        path = _path(calls, seen[a.name]["out"], lambda t, target=target: t is target)
        if path is None:
            break
        glue.append(tuple(c.module for c in path))
    chained = len(glue) == len(blocks) - 1
    head = _checked_head(model, calls, seen[blocks[-1].name]["out"], logits) if chained else None
    anatomy = Anatomy(model=model, blocks=blocks, head=head, chained=chained, glue=glue)
    extras = {i: seen[b.name]["extras"] for i, b in enumerate(blocks) if any(seen[b.name]["extras"])}
    if head is not None and extras and not _reproduces(anatomy, seen[blocks[0].name]["in"], extras, logits):
        # Blocks called with more than their input, and running on from block 0 with what each got
        # does not give the logits (an argument that changes between calls): full forwards instead.
        anatomy.head, anatomy.chained = None, False
    if head is None:  # not a chain to the logits (one block left in a pruned CSPNet is a chain of one)
        segmented = _segmented(anatomy, seen, calls, holder_calls, logits, extras)
        if segmented is not None:
            anatomy.glue, anatomy.segments = segmented
    return anatomy


def _segmented(anatomy: Anatomy, seen: dict[str, dict[str, Any]], calls: list[_Call],
               holder_calls: dict[str, list[tuple[Tensor | None, Any]]], logits: Tensor,
               extras: Mapping[int, Extras]) -> tuple[list[tuple[nn.Module, ...]], list[Segment]] | None:
    """The blocks as :class:`Segment` s (one per module holding a run of them), or None where the model
    is not such a sequence: each run chained inside its container, each container and wrapper called
    once with one tensor, the wrappers chained to each other and to the logits, and running on from
    the first and from the last block reproducing the model's logits."""
    blocks, model = anatomy.blocks, anatomy.model
    groups: list[tuple[str, list[int]]] = []
    for i, block in enumerate(blocks):
        parent = block.name.rpartition(".")[0]
        if groups and groups[-1][0] == parent:
            groups[-1][1].append(i)
        else:
            groups.append((parent, [i]))
    if any(not parent for parent, _ in groups) or len({p for p, _ in groups}) != len(groups):
        return None
    glue: list[tuple[nn.Module, ...]] = []
    for a, b in zip(blocks, blocks[1:]):
        if a.name.rpartition(".")[0] != b.name.rpartition(".")[0]:
            glue.append(())  # segments are linked through their wrappers
            continue
        path = _path(calls, seen[a.name]["out"], lambda t, target=seen[b.name]["in"]: t is target)
        if path is None:
            return None
        glue.append(tuple(c.module for c in path))

    def single_call(name: str) -> tuple[Tensor, Tensor] | None:
        made = holder_calls.get(name, [])
        if len(made) != 1 or made[0][0] is None or not isinstance(made[0][1], Tensor):
            return None
        return made[0][0], made[0][1]

    names = [b.name for b in blocks]
    # Per run of blocks, from the last: the wrapper is the innermost module around the run's container
    # (the container included) that holds no other run's blocks, is called once with one tensor, and
    # from whose output the model goes on to the next wrapper's input, or to the logits: the least of
    # the model that a removal runs again.
    segments: list[Segment] = []
    entries: list[Tensor] = []
    for parent, positions in reversed(groups):
        container_call = single_call(parent)
        tail = None if container_call is None else _path(
            calls, seen[names[positions[-1]]]["out"], lambda t, c=container_call[1]: t is c)
        if tail is None:
            return None
        own, parts = {names[p] for p in positions}, parent.split(".")
        chosen: tuple[str, Tensor, Callable[[Tensor], Tensor]] | None = None
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            if {n for n in names if n.startswith(candidate + ".")} != own:
                break
            call = single_call(candidate)
            if call is None:
                continue
            if entries:  # a later run's wrapper follows
                between = _path(calls, call[1], lambda t, x=entries[0]: t is x)
                after = None if between is None else _composed(tuple(c.module for c in between))
            else:
                after = _checked_head(model, calls, call[1], logits)
            if after is not None:
                chosen = (candidate, call[0], after)
                break
        if chosen is None:
            return None
        segments.insert(0, Segment(model.get_submodule(chosen[0]), model.get_submodule(parent), positions[0],
                                   positions[-1], tuple(c.module for c in tail), chosen[2]))
        entries.insert(0, chosen[1])
    trial = Anatomy(model=model, blocks=blocks, glue=glue, segments=segments)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for position in (0, len(blocks) - 1):
                g = segments.index(trial.segment_of(position))  # type: ignore[arg-type]
                out = trial.run_from(position, seen[names[position]]["in"], entry=entries[g], extras=extras)
                if out.shape != logits.shape or not torch.allclose(out, logits, rtol=1e-4, atol=1e-5):
                    return None
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    finally:
        model.train(was_training)
    return glue, segments


def _reproduces(anatomy: Anatomy, h: Tensor, extras: Mapping[int, Extras], logits: Tensor) -> bool:
    """Whether running on from block 0's input ``h``, each block given ``extras``, gives ``logits``."""
    model = anatomy.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = anatomy.run_from(0, h, extras=extras)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    finally:
        model.train(was_training)
    return out.shape == logits.shape and torch.allclose(out, logits, rtol=1e-4, atol=1e-5)


def _composed(modules: tuple[nn.Module, ...]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for module in modules:
            x = module(x)
        return x

    return run


def _checked_head(model: nn.Module, calls: list[_Call], last: Tensor, logits: Tensor
                  ) -> Callable[[Tensor], Tensor] | None:
    """The modules after the last block, then a head candidate, such that their composition gives the
    model's logits from the last block's output (None when no candidate does)."""
    candidates = _head_candidates(model)
    found: list[Callable[[Tensor], Tensor]] = []

    def reproduces(t: Tensor) -> bool:
        if t is logits:
            found.append(lambda x: x)
            return True
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for candidate in candidates:
                    try:
                        out = candidate(t)
                    except (RuntimeError, TypeError, ValueError, IndexError):
                        continue
                    if (isinstance(out, Tensor) and out.shape == logits.shape
                            and torch.allclose(out, logits, rtol=1e-4, atol=1e-5)):
                        found.append(candidate)
                        return True
        finally:
            model.train(was_training)
        return False

    path = _path(calls, last, reproduces)
    if path is None:
        return None
    tail, final = tuple(c.module for c in path), found[-1]
    if not tail:
        return final

    def head(x: Tensor) -> Tensor:
        for module in tail:
            x = module(x)
        return final(x)

    return head


# --------------------------------------------------------------------------------------------------
# Running the whole model with some blocks replaced (the naive reference, and the generic fallback)


@contextlib.contextmanager
def replaced_blocks(blocks: Sequence[Block], fns: Sequence[BlockFn] | None = None) -> Iterator[None]:
    """Within the context, each block's forward is its lesion (or the given function), called with
    whatever the model passes the block.

    Works for any model, however its blocks are wired, because the model's own forward still runs.
    """
    fns = list(fns) if fns is not None else [b.lesion for b in blocks]
    with patched_forwards([b.module for b in blocks], fns):
        yield


@contextlib.contextmanager
def patched_forwards(modules: Sequence[nn.Module], fns: Sequence[Callable]) -> Iterator[None]:
    """Within the context, each module's ``forward`` is the given function (hooks still run); put back after."""
    saved = []
    try:
        for module, fn in zip(modules, fns):
            saved.append((module, module.__dict__.get("forward")))
            module.forward = fn  # type: ignore[method-assign]
        yield
    finally:
        for module, original in saved:
            if original is None:
                del module.forward
            else:
                module.forward = original  # type: ignore[method-assign]


def count_params(model: nn.Module) -> int:
    """Distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
