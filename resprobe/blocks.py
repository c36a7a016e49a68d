"""Residual block discovery, kinds, lesions and per-block-class knowledge.

A block is one residual unit (DESIGN.md §1)::

    post-activation:  out = post(shortcut(h) + F(h))   torchvision/timm BasicBlock, Bottleneck, ...
    pre-activation:   out = shortcut(h) + F(h)          timm PreActBasic, PreActBottleneck

What resprobe needs to know about a block is keyed on its **class** (:class:`BlockFamily`): which
submodule's output is F (the "branch end"), which module is the shortcut, which activation follows
the sum. From that follow the lesion (branch removed, shortcut kept) and the recorder's hooks.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from resprobe.errors import ModelError

# --------------------------------------------------------------------------------------------------
# Per-block-class knowledge


@dataclass(frozen=True)
class BlockFamily:
    """How one block class computes ``out`` from ``h``.

    ``branch_end`` lists attribute names in priority order: the first that exists and is not
    ``None`` is the module whose output is F (e.g. ``drop_path``, else ``se``, else ``bn3``).
    ``post`` is the activation after the sum (``None`` for pre-activation blocks). ``shortcut`` is
    the projection used by transition blocks; ``shortcut_input`` is the attribute of the module whose
    output feeds it (pre-activation blocks project ``norm1(h)``), ``None`` for ``h`` itself.
    """

    name: str
    preact: bool
    branch_end: tuple[str, ...] = ()
    shortcut: str | None = "downsample"
    post: str | None = None
    shortcut_input: str | None = None

    def branch_end_module(self, block: nn.Module) -> nn.Module | None:
        for attr in self.branch_end:
            module = getattr(block, attr, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def shortcut_module(self, block: nn.Module) -> nn.Module | None:
        module = getattr(block, self.shortcut, None) if self.shortcut else None
        return module if isinstance(module, nn.Module) else None

    def lesion(self, block: nn.Module, h: Tensor) -> Tensor:
        """The block with its residual branch output replaced by zero (DESIGN.md §1, "Removing a block")."""
        shortcut = self.shortcut_module(block)
        if shortcut is None:
            out = h
        else:
            source = getattr(block, self.shortcut_input) if self.shortcut_input else None
            out = shortcut(source(h) if source is not None else h)
        post = getattr(block, self.post, None) if self.post else None
        if post is not None and shortcut is not None:
            out = post(out)
        # Identity blocks: post-activation blocks follow a ReLU, so post(h) = h (DESIGN.md §1).
        return out


GENERIC = BlockFamily("generic", preact=True, branch_end=(), shortcut=None)

_FAMILIES: dict[type, BlockFamily] = {}
_LAZY_FAMILIES: list[tuple[str, str, BlockFamily]] = [
    ("torchvision.models.resnet", "BasicBlock",
     BlockFamily("torchvision.BasicBlock", False, ("bn2",), "downsample", "relu")),
    ("torchvision.models.resnet", "Bottleneck",
     BlockFamily("torchvision.Bottleneck", False, ("bn3",), "downsample", "relu")),
    ("timm.models.resnet", "BasicBlock",
     BlockFamily("timm.BasicBlock", False, ("drop_path", "se", "bn2"), "downsample", "act2")),
    ("timm.models.resnet", "Bottleneck",
     BlockFamily("timm.Bottleneck", False, ("drop_path", "se", "bn3"), "downsample", "act3")),
    ("timm.models.sknet", "SelectiveKernelBasic",
     BlockFamily("timm.SelectiveKernelBasic", False, ("drop_path", "se", "conv2"), "downsample", "act")),
    ("timm.models.sknet", "SelectiveKernelBottleneck",
     BlockFamily("timm.SelectiveKernelBottleneck", False, ("drop_path", "se", "conv3"), "downsample", "act")),
    # ResNeSt applies its drop_path to the block input, not the branch: F ends at bn3.
    ("timm.models.resnest", "ResNestBottleneck",
     BlockFamily("timm.ResNestBottleneck", False, ("bn3",), "downsample", "act3")),
    ("timm.models.res2net", "Bottle2neck",
     BlockFamily("timm.Bottle2neck", False, ("drop_path", "se", "bn3"), "downsample", "relu")),
    ("timm.models.resnetv2", "PreActBasic",
     BlockFamily("timm.PreActBasic", True, ("drop_path", "conv2"), "downsample", None, "norm1")),
    ("timm.models.resnetv2", "PreActBottleneck",
     BlockFamily("timm.PreActBottleneck", True, ("drop_path", "conv3"), "downsample", None, "norm1")),
    ("timm.models.resnetv2", "Bottleneck",
     BlockFamily("timm.resnetv2.Bottleneck", False, ("drop_path", "norm3"), "downsample", "act3")),
]


def register_block_family(cls: type, family: BlockFamily) -> None:
    """Teach resprobe a block class (custom models, or resprobe's own shared iterations)."""
    _FAMILIES[cls] = family


def _load_lazy_families() -> None:
    """Resolve the built-in families of libraries already imported.

    A model can only hold blocks of a library that is imported, so a torchvision model never pays
    for importing timm (about a second).
    """
    import importlib
    import sys

    for entry in list(_LAZY_FAMILIES):
        module_name, class_name, family = entry
        if module_name.split(".")[0] not in sys.modules:
            continue
        _LAZY_FAMILIES.remove(entry)
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # an older timm without that family
            continue
        _FAMILIES.setdefault(cls, family)


def family_of(module: nn.Module) -> BlockFamily | None:
    _load_lazy_families()
    for cls in type(module).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    return None


def known_block_classes() -> list[str]:
    _load_lazy_families()
    # Also the built-in families of libraries not imported in this process.
    return sorted({f.name for f in _FAMILIES.values()} | {f.name for _, _, f in _LAZY_FAMILIES})


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
    def preact(self) -> bool:
        return self.family.preact

    @property
    def can_lesion(self) -> bool:
        """Whether resprobe can remove this block: identity blocks always, transitions when their
        shortcut module is known."""
        return self.is_identity or self.family.shortcut_module(self.module) is not None

    def lesion(self, h: Tensor) -> Tensor:
        if self.family.shortcut_module(self.module) is not None:
            return self.family.lesion(self.module, h)
        if self.is_identity:
            return h
        raise ModelError(f"cannot remove transition block {self.name}: resprobe does not know its shortcut "
                         f"({type(self.module).__name__}); leave out --include-transitions")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "index": self.index, "kind": self.kind,
                "in_shape": list(self.in_shape), "out_shape": list(self.out_shape), "params": self.params}


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

    @property
    def identity_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.is_identity]

    @property
    def can_run_suffix(self) -> bool:
        return self.chained and self.head is not None

    def run_from(self, position: int, h: Tensor, replace: dict[int, Callable[[Tensor], Tensor]] | None = None) -> Tensor:
        """Logits from block ``position``'s input ``h``: blocks ``position..end`` (each optionally
        replaced, e.g. by its lesion), then the head."""
        if not self.can_run_suffix:
            raise ModelError("this model's blocks are not a simple chain; resprobe cannot run it from a block")
        replace = replace or {}
        for i in range(position, len(self.blocks)):
            fn = replace.get(i)
            h = fn(h) if fn is not None else self.blocks[i].module(h)
        assert self.head is not None
        return self.head(h)


def _head_of(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The model's own head after its last block (DESIGN.md §1 "Readout"), by model class."""
    import sys

    import torchvision.models.resnet as tv_resnet

    timm_resnet = sys.modules.get("timm.models.resnet")  # a timm model means timm is imported already
    timm_resnetv2 = sys.modules.get("timm.models.resnetv2")

    if timm_resnetv2 is not None and isinstance(model, timm_resnetv2.ResNetV2):
        return lambda x: model.forward_head(model.norm(x))
    if timm_resnet is not None and isinstance(model, timm_resnet.ResNet):
        return model.forward_head
    if isinstance(model, tv_resnet.ResNet):
        return lambda x: model.fc(torch.flatten(model.avgpool(x), 1))
    forward_head = getattr(model, "forward_head", None)
    if callable(forward_head):  # other timm models: forward_features ends at the last block
        norm = getattr(model, "norm", None)
        if isinstance(norm, nn.Module):
            return lambda x: forward_head(norm(x))
        return forward_head
    return None


def _candidate_blocks(model: nn.Module, globs: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    if globs:
        picked = [(n, m) for n, m in model.named_modules() if n and any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not picked:
            raise ModelError(f"--blocks {','.join(globs)} matches no module of the model")
    else:
        picked = [(n, m) for n, m in model.named_modules() if n and family_of(m) is not None]
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


def discover_blocks(
    model: nn.Module,
    input_shape: Sequence[int],
    globs: Sequence[str] | None = None,
) -> Anatomy:
    """Find the residual blocks of ``model`` with one dummy forward of shape ``input_shape`` (C, H, W).

    Blocks come in execution order with their stage (index of the group they are in), index within
    the stage, kind (``identity`` when the output has the input's shape) and shapes.
    """
    candidates = require_blocks(model, globs)
    seen: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    handles = []

    def pre_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = {"in": args[0], "in_shape": tuple(args[0].shape[1:])}
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
    for name, module in [*candidates, *placeholders.items()]:
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
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
    stage_of_parent: dict[str, int] = {}
    index_in_parent: dict[str, int] = {}
    blocks: list[Block] = []
    for name in order:
        info = seen[name]
        if "out" not in info:
            continue
        parent = name.rpartition(".")[0]
        stage = stage_of_parent.setdefault(parent, len(stage_of_parent))
        index = index_in_parent.get(parent, 0)
        index_in_parent[parent] = index + 1
        if name in placeholders:
            continue
        module = modules[name]
        family = family_of(module) or GENERIC
        kind = "identity" if info["in_shape"] == info["out_shape"] else "transition"
        blocks.append(Block(name=name, module=module, family=family, stage=stage, index=index, kind=kind,
                            in_shape=info["in_shape"], out_shape=info["out_shape"],
                            params=sum(p.numel() for p in module.parameters())))
    if not blocks:
        raise ModelError(f"none of the residual blocks of {type(model).__name__} ran on a dummy input")

    chained = all(seen[b.name]["in"] is seen[a.name]["out"] for a, b in zip(blocks, blocks[1:]))
    head = _head_of(model)
    if head is not None and chained:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                ok = torch.allclose(head(seen[blocks[-1].name]["out"]), logits, rtol=1e-4, atol=1e-5)
            except (RuntimeError, TypeError):
                ok = False
            model.train(was_training)
        if not ok:
            head = None
    return Anatomy(model=model, blocks=blocks, head=head, chained=chained)


# --------------------------------------------------------------------------------------------------
# Running the whole model with some blocks replaced (the naive reference, and the generic fallback)


@contextlib.contextmanager
def replaced_blocks(blocks: Sequence[Block], fns: Sequence[Callable[[Tensor], Tensor]] | None = None) -> Iterator[None]:
    """Within the context, each block's forward is its lesion (or the given function).

    Works for any model, however its blocks are wired, because the model's own forward still runs.
    """
    fns = list(fns) if fns is not None else [b.lesion for b in blocks]
    saved = []
    try:
        for block, fn in zip(blocks, fns):
            saved.append((block.module, block.module.__dict__.get("forward")))
            block.module.forward = fn  # type: ignore[method-assign]
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
