"""Per-block-class knowledge: one :class:`BlockFamily` entry per residual block class (docs/reference.md).

A family says how its block computes ``out`` from ``h``::

    post-activation:  out = post(shortcut(h) + F(h))   ResNet BasicBlock/Bottleneck, RegNet, CSPNet
    pre-activation:   out = shortcut(h) + F(h)          PreAct ResNets, ConvNeXt, inverted residuals, NFNet
    transformer:      out = h + A(h) + M(·)             ViT/DeiT, Swin: one unit, F = U = out − h

and so which submodule's output is F (the "branch end"), which module is the shortcut, which
activation follows the sum, whether a module of the class is residual at all (an inverted residual
without its skip is not a block), and from that the lesion (branch removed, everything else as the
block computes it). Adding a family is adding one entry to :data:`_LAZY_FAMILIES`; nothing else in
resprobe branches on block classes.

Entries name their class by module path and are resolved only once that library is imported (a
model can only hold blocks of an imported library), so a torchvision model never imports timm.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class BlockFamily:
    """How one block class computes ``out`` from ``h``.

    ``branch_end`` lists attribute names in priority order: the first that exists and is not
    ``None`` is the module whose output is F (e.g. ``drop_path``, else ``se``, else ``bn3``).
    ``post`` is the activation after the sum (``None`` for pre-activation blocks). ``shortcut`` is
    the projection used by transition blocks; ``shortcut_input`` is the attribute of the module whose
    output feeds it (pre-activation blocks project ``norm1(h)``), ``None`` for ``h`` itself.

    ``transformer``: a pre-norm (or post-norm) transformer block, two residual additions in one unit:
    F = U = out − h and the lesion is ``out = h``. ``residual_if``: for classes whose skip is
    conditional (``has_skip``, ``use_res_connect``, a RegNet block without shortcut), whether a
    module is residual; modules that are not are not blocks. ``branch_is_update``: whether F = U for
    identity blocks (default: ``preact``; timm's RegNet ``PreBottleneck`` adds F to ``norm1(h)``,
    so there F ≠ U). ``branch_scale``: a factor applied to the branch end's output after the hook
    point (NFNet's ``skipinit_gain · alpha``), so that ‖F‖ of a transition is the norm of what is
    added. ``lesion_fn`` replaces the generic lesion where a block's shortcut is computed from
    something no attribute names; ``keep`` lists what it reads (kept by pruned checkpoints).
    """

    name: str
    preact: bool
    branch_end: tuple[str, ...] = ()
    shortcut: str | None = "downsample"
    post: str | None = None
    shortcut_input: str | None = None
    transformer: bool = False
    residual_if: Callable[[nn.Module], bool] | None = None
    branch_is_update: bool | None = None
    branch_scale: Callable[[nn.Module], Any] | None = None
    lesion_fn: Callable[[nn.Module, Tensor], Tensor] | None = None
    keep: tuple[str, ...] = ()

    @property
    def f_is_u(self) -> bool:
        """Whether an identity block's F equals U = out − h (nothing to read inside the block)."""
        if self.transformer:
            return True
        return self.preact if self.branch_is_update is None else self.branch_is_update

    def is_residual(self, block: nn.Module) -> bool:
        return self.residual_if is None or bool(self.residual_if(block))

    def branch_end_module(self, block: nn.Module) -> nn.Module | None:
        for attr in self.branch_end:
            module = getattr(block, attr, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def shortcut_module(self, block: nn.Module) -> nn.Module | None:
        module = getattr(block, self.shortcut, None) if self.shortcut else None
        return module if isinstance(module, nn.Module) else None

    def has_identity_shortcut(self, block: nn.Module) -> bool:
        """Whether ``block``'s shortcut is ``h`` itself: no shortcut module, or one that computes
        nothing (``nn.Identity``, an empty Sequential). A projection or pooling on the shortcut makes
        the block a transition even where its output has its input's shape (docs/reference.md)."""
        module = self.shortcut_module(block)
        return module is None or _computes_nothing(module)

    def post_module(self, block: nn.Module) -> nn.Module | None:
        module = getattr(block, self.post, None) if self.post else None
        return module if isinstance(module, nn.Module) else None

    @property
    def lesion_is_identity_map(self) -> bool:
        """Whether the lesion of an identity block of this family may be ``out = h`` without the
        block (no post-activation, no shortcut computation): a pruned block then needs no module."""
        return self.lesion_fn is None and (self.transformer or self.post is None)

    def lesion(self, block: nn.Module, h: Tensor) -> Tensor:
        """The block with its residual branch output replaced by zero (docs/reference.md, "Removing a block"):
        ``post(shortcut(h))`` (identity shortcut: ``post(h)``, with SiLU or leaky ReLU applied),
        pre-activation ``shortcut(norm1(h))``, a transformer block ``h``."""
        if self.lesion_fn is not None:
            return self.lesion_fn(block, h)
        if self.transformer:
            return h
        shortcut = self.shortcut_module(block)
        if shortcut is None:
            out = h
        else:
            source = getattr(block, self.shortcut_input) if self.shortcut_input else None
            out = shortcut(source(h) if source is not None else h)
        post = self.post_module(block)
        if post is not None:
            # An in-place activation (ReLU(inplace=True)) must not write into the caller's h.
            out = post(out.clone() if out is h else out)
        return out

    def lesion_attrs(self) -> tuple[str, ...]:
        """The attributes of a block that its lesion reads (what a pruned checkpoint keeps)."""
        return tuple(a for a in (self.shortcut, self.shortcut_input, self.post, *self.keep) if a)


GENERIC = BlockFamily("generic", preact=True, branch_end=(), shortcut=None)


def _computes_nothing(module: nn.Module) -> bool:
    if isinstance(module, nn.Identity):
        return True
    return isinstance(module, nn.Sequential) and all(_computes_nothing(m) for m in module)


def _attr_is_not(attr: str, value: Any) -> Callable[[nn.Module], bool]:
    def check(block: nn.Module) -> bool:
        return getattr(block, attr, None) is not value
    check.__name__ = f"{attr}_is_not_{value}"
    return check


def _truthy(attr: str) -> Callable[[nn.Module], bool]:
    def check(block: nn.Module) -> bool:
        return bool(getattr(block, attr, False))
    check.__name__ = attr
    return check


def _nf_lesion(block: nn.Module, h: Tensor) -> Tensor:
    # NormFreeBlock: shortcut = h, or downsample(act1(h) · beta) for transitions.
    downsample = getattr(block, "downsample", None)
    if downsample is None:
        return h
    return downsample(block.act1(h) * block.beta)


def _nf_scale(block: nn.Module) -> Any:
    gain = getattr(block, "skipinit_gain", None)
    return block.alpha * (gain.detach().abs() if gain is not None else 1.0)


_TRANSFORMER = dict(preact=True, shortcut=None, transformer=True)
_HAS_SKIP = _truthy("has_skip")
_USE_RES = _truthy("use_res_connect")
_HAS_SHORTCUT = _attr_is_not("downsample", None)


def _byob(class_name: str) -> tuple[str, str, BlockFamily]:
    # timm ByobNet (RegNetZ, GENet, ResNet-Q, BoTNet, HaloNet): out = act(drop_path(F(h)) + shortcut(h)),
    # ``shortcut`` None where the block has no skip (RegNetZ's stage-opening blocks), ``act`` an
    # Identity under ``linear_out`` (RegNetZ), so the lesion is act(shortcut(h)) either way.
    return ("timm.models.byobnet", class_name,
            BlockFamily(f"timm.byobnet.{class_name}", False, ("drop_path",), "shortcut", "act",
                        residual_if=_attr_is_not("shortcut", None)))


# (module path, class name, family). Subclasses inherit their base's entry (method resolution order).
_LAZY_FAMILIES: list[tuple[str, str, BlockFamily]] = [
    # ---- ResNets
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
    # ---- ConvNeXt (layer scale ``gamma`` and drop_path inside F; ``shortcut`` projects when shapes differ)
    ("timm.models.convnext", "ConvNeXtBlock",
     BlockFamily("timm.ConvNeXtBlock", True, ("drop_path",), "shortcut")),
    ("torchvision.models.convnext", "CNBlock",
     BlockFamily("torchvision.CNBlock", True, ("stochastic_depth",), None)),
    # ---- Vision transformers and Swin: one unit of two residual additions
    ("timm.models.vision_transformer", "Block", BlockFamily("timm.vit.Block", **_TRANSFORMER)),
    ("timm.models.vision_transformer", "ResPostBlock", BlockFamily("timm.vit.ResPostBlock", **_TRANSFORMER)),
    ("timm.models.vision_transformer", "ParallelScalingBlock",
     BlockFamily("timm.vit.ParallelScalingBlock", **_TRANSFORMER)),
    ("timm.models.vision_transformer", "ParallelThingsBlock",
     BlockFamily("timm.vit.ParallelThingsBlock", **_TRANSFORMER)),
    ("timm.models.swin_transformer", "SwinTransformerBlock",
     BlockFamily("timm.SwinTransformerBlock", **_TRANSFORMER)),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block",
     BlockFamily("timm.SwinTransformerV2Block", **_TRANSFORMER)),
    ("torchvision.models.vision_transformer", "EncoderBlock",
     BlockFamily("torchvision.EncoderBlock", **_TRANSFORMER)),
    ("torchvision.models.swin_transformer", "SwinTransformerBlock",
     BlockFamily("torchvision.SwinTransformerBlock", **_TRANSFORMER)),
    ("torchvision.models.swin_transformer", "SwinTransformerBlockV2",
     BlockFamily("torchvision.SwinTransformerBlockV2", **_TRANSFORMER)),
    # ---- RegNet: timm's ``downsample`` is the shortcut (None: no residual, Identity: identity skip)
    ("timm.models.regnet", "Bottleneck",
     BlockFamily("timm.regnet.Bottleneck", False, ("drop_path", "conv3"), "downsample", "act3",
                 residual_if=_HAS_SHORTCUT)),
    ("timm.models.regnet", "PreBottleneck",
     BlockFamily("timm.regnet.PreBottleneck", True, ("drop_path", "conv3"), "downsample", None, "norm1",
                 residual_if=_HAS_SHORTCUT, branch_is_update=False)),
    # RegNetZ and the other ByobNets (timm byobnet.py, byoanet.py): residual only with a shortcut
    *(_byob(name) for name in ("BasicBlock", "BottleneckBlock", "DarkBlock", "EdgeBlock", "SelfAttnBlock")),
    ("torchvision.models.regnet", "ResBottleneckBlock",
     BlockFamily("torchvision.ResBottleneckBlock", False, ("f",), "proj", "activation")),
    # ---- Inverted residuals (EfficientNet, MobileNet): residual only with a skip
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv",
     BlockFamily("timm.DepthwiseSeparableConv", True, ("drop_path",), None, residual_if=_HAS_SKIP)),
    ("timm.models._efficientnet_blocks", "InvertedResidual",
     BlockFamily("timm.InvertedResidual", True, ("drop_path",), None, residual_if=_HAS_SKIP)),
    ("timm.models._efficientnet_blocks", "EdgeResidual",
     BlockFamily("timm.EdgeResidual", True, ("drop_path",), None, residual_if=_HAS_SKIP)),
    ("timm.models._efficientnet_blocks", "UniversalInvertedResidual",
     BlockFamily("timm.UniversalInvertedResidual", True, ("drop_path",), None, residual_if=_HAS_SKIP)),
    ("torchvision.models.mobilenetv2", "InvertedResidual",
     BlockFamily("torchvision.mobilenetv2.InvertedResidual", True, (), None, residual_if=_USE_RES)),
    ("torchvision.models.mobilenetv3", "InvertedResidual",
     BlockFamily("torchvision.mobilenetv3.InvertedResidual", True, (), None, residual_if=_USE_RES)),
    ("torchvision.models.efficientnet", "MBConv",
     BlockFamily("torchvision.MBConv", True, (), None, residual_if=_USE_RES)),
    ("torchvision.models.efficientnet", "FusedMBConv",
     BlockFamily("torchvision.FusedMBConv", True, (), None, residual_if=_USE_RES)),
    # ---- NFNet: out = F·alpha(·skipinit_gain) + shortcut, the shortcut of a transition from act1(h)·beta
    ("timm.models.nfnet", "NormFreeBlock",
     BlockFamily("timm.NormFreeBlock", True, ("drop_path", "conv3"), "downsample", branch_scale=_nf_scale,
                 lesion_fn=_nf_lesion, keep=("act1", "beta"))),
    # ---- CSPNet (the bottleneck block is post-activation, the dark block pre-activation)
    ("timm.models.cspnet", "BottleneckBlock",
     BlockFamily("timm.cspnet.BottleneckBlock", False, ("drop_path",), None, "act3")),
    ("timm.models.cspnet", "DarkBlock", BlockFamily("timm.cspnet.DarkBlock", True, ("drop_path",), None)),
    ("timm.models.cspnet", "EdgeBlock", BlockFamily("timm.cspnet.EdgeBlock", True, ("drop_path",), None)),
]

_FAMILIES: dict[type, BlockFamily] = {}


def register_block_family(cls: type, family: BlockFamily) -> None:
    """Teach resprobe a block class (custom models, or resprobe's own shared iterations)."""
    _FAMILIES[cls] = family


def _load_lazy_families() -> None:
    """Resolve the built-in families of libraries already imported (see the module docstring)."""
    for entry in list(_LAZY_FAMILIES):
        module_name, class_name, family = entry
        if module_name.split(".")[0] not in sys.modules:
            continue
        _LAZY_FAMILIES.remove(entry)
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # an older library without that family
            continue
        _FAMILIES.setdefault(cls, family)


def family_of(module: nn.Module) -> BlockFamily | None:
    """The family of ``module``'s class (or of the nearest base class that has one)."""
    _load_lazy_families()
    for cls in type(module).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    return None


def block_family(module: nn.Module) -> BlockFamily | None:
    """The family of ``module`` if it is a residual block (a skip-less inverted residual is not)."""
    family = family_of(module)
    return family if family is not None and family.is_residual(module) else None


def known_block_classes() -> list[str]:
    _load_lazy_families()
    # Also the built-in families of libraries not imported in this process.
    return sorted({f.name for f in _FAMILIES.values()} | {f.name for _, _, f in _LAZY_FAMILIES})
