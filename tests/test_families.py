"""Every residual family of timm and torchvision: discovery against a class-based reference, record
against plain autograd on each block, ablate's prefix cache against naive re-evaluation with
hand-written lesions, and sharing (per-iteration norms and layer scales, LoRA reproducing the
original). Tiny configurations, norms and layer scales randomized (timm zero-inits some of them)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinymodels
from resprobe.ablate_engine import AblationEngine, evaluate_pass, lesion_variant
from resprobe.ablate_prune import prune_model
from resprobe.models.blocks import count_params, discover_blocks, replaced_blocks
from resprobe.evaluate import Tally
from resprobe.recording.recorder import STAT_NAMES, Recorder
from resprobe.runtime import make_runtime
from resprobe.share import ShareOptions, share_stages

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = make_runtime("cpu")
SIZE = 32


def _timm(name, **kw):
    import timm

    return timm.create_model(name, num_classes=5, **kw)


def _timm_regnet(preact):
    import timm.models.regnet as r

    return r.RegNet(r.RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8, se_ratio=0.0 if preact else 0.25,
                                stem_width=8, preact=preact), num_classes=5)


def _timm_nfnet():
    import timm.models.nfnet as nf

    return nf.NormFreeNet(nf.NfCfg(depths=(1, 2), channels=(16, 32), stem_chs=8, stem_type="3x3", group_size=8,
                                   attn_layer="se", attn_kwargs=dict(rd_ratio=0.5), skipinit=True), num_classes=5)


def _timm_csp():
    import timm.models.cspnet as cs

    cfg = cs.model_cfgs["cspresnet50"]
    cfg = replace(cfg, stem=replace(cfg.stem, out_chs=8),
                  stages=replace(cfg.stages, depth=(1, 2), out_chs=(16, 32), stride=(1, 2), groups=1,
                                 bottle_ratio=0.5, expand_ratio=2.0, block_ratio=1.0, cross_linear=True,
                                 down_growth=True))
    return cs.CspNet(cfg, num_classes=5)


def _timm_byob(regnetz: bool):
    """A tiny RegNetZ (``regnetz_b16``'s configuration shrunk: linear out, no shortcut on stage openers) or,
    with ``regnetz=False``, a post-activation ByobNet whose transitions project (``conv1x1`` shortcut)."""
    import timm.models.byobnet as bb

    cfg = bb.model_cfgs["regnetz_b16"]
    blocks = (bb.ByoBlockCfg(type="bottle", d=2, c=8, s=2, gs=4, br=3),
              bb.ByoBlockCfg(type="bottle", d=3, c=16, s=2, gs=4, br=3))
    cfg = replace(cfg, blocks=blocks, stem_chs=8, num_features=24)
    if not regnetz:
        cfg = replace(cfg, downsample="conv1x1", block_kwargs={"bottle_in": True, "linear_out": False})
    return bb.ByobNet(cfg, num_classes=5)


def _timm_cspdarknet(name: str):
    """Tiny ``cspdarknet53`` (CrossStage, DarkBlock) or ``cs3darknet_s`` (CrossStage3, SiLU)."""
    import timm.models.cspnet as cs

    cfg = cs.model_cfgs[name]
    first_two = {f: getattr(cfg.stages, f)[:2] for f in ("block_ratio", "bottle_ratio", "expand_ratio")}
    cfg = replace(cfg, stem=replace(cfg.stem, out_chs=8 if name == "cspdarknet53" else (8, 8)),
                  stages=replace(cfg.stages, depth=(1, 2), out_chs=(16, 32), stride=2, groups=1, **first_two))
    return cs.CspNet(cfg, num_classes=5)


def _timm_edge_uir():
    """timm EfficientNet with an EdgeResidual stage and a MobileNetV4 UniversalInvertedResidual stage."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    arch = [["ds_r1_k3_s1_c8"], ["er_r2_k3_s2_e2_c16"], ["uir_r2_a3_k5_s2_e2_c24", "uir_r1_a0_k3_s1_e2_c24"]]
    return EfficientNet(block_args=decode_arch_def(arch), num_features=32, stem_size=8, num_classes=5)


def _tv_mbconv():
    """torchvision EfficientNet (V2-style): FusedMBConv stages, then MBConv stages."""
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [FusedMBConvConfig(1, 3, 1, 8, 8, 2), FusedMBConvConfig(2, 3, 2, 8, 16, 2),
               MBConvConfig(2, 3, 2, 16, 24, 2), MBConvConfig(2, 5, 1, 24, 24, 1)]
    return EfficientNet(setting, dropout=0.0, last_channel=32, num_classes=5)


def _tv(module, cls, *args, **kw):
    import importlib

    return getattr(importlib.import_module(f"torchvision.models.{module}"), cls)(*args, **kw)


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 2)], num_classes=5)


def _tv_swin(v2=False):
    from torchvision.models import swin_transformer as s

    extra = dict(block=s.SwinTransformerBlockV2, downsample_layer=s.PatchMergingV2) if v2 else {}
    return s.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                             num_classes=5, **extra)


def _tv_regnet():
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25),
                  num_classes=5)


MAKERS = {
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=3, embed_dim=24,
                              num_heads=2, init_values=0.5),
    "timm_vit_respost": lambda: _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2, embed_dim=24,
                                      num_heads=2, block_fn=__import__("timm").models.vision_transformer.ResPostBlock),
    "timm_convnext": lambda: _timm("convnext_atto", depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), ls_init_value=0.5),
    "timm_convnextv2": lambda: _timm("convnextv2_atto", depths=(1, 2, 1, 1), dims=(8, 16, 24, 32)),
    "timm_swin": lambda: _timm("swin_tiny_patch4_window7_224", img_size=SIZE, patch_size=2, window_size=4,
                               embed_dim=12, depths=(2, 2), num_heads=(2, 2)),
    "timm_regnet": lambda: _timm_regnet(False),
    "timm_regnet_pre": lambda: _timm_regnet(True),
    "timm_mobilenetv3": lambda: _timm("mobilenetv3_small_050"),
    "timm_efficientnet": lambda: _timm("tinynet_e"),
    "timm_edge_uir": _timm_edge_uir,
    "timm_nfnet": _timm_nfnet,
    "timm_cspnet": _timm_csp,
    "timm_cspdarknet": lambda: _timm_cspdarknet("cspdarknet53"),
    "timm_cs3darknet": lambda: _timm_cspdarknet("cs3darknet_s"),
    "timm_regnetz": lambda: _timm_byob(True),
    "timm_byob_post": lambda: _timm_byob(False),
    "tv_convnext": _tv_convnext,
    "tv_vit": lambda: _tv("vision_transformer", "VisionTransformer", image_size=SIZE, patch_size=8, num_layers=2,
                          num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5),
    "tv_swin": _tv_swin,
    "tv_swin_v2": lambda: _tv_swin(v2=True),
    "tv_mobilenet_v2": lambda: _tv("mobilenetv2", "mobilenet_v2", width_mult=0.25, num_classes=5),
    "tv_regnet": _tv_regnet,
    "tv_mbconv": _tv_mbconv,
}

# The block classes of docs/reference.md, by class name and defining module, written here independently of
# resprobe's family table; and when a module of the class is residual.
REFERENCE_CLASSES = {
    ("timm.models.vision_transformer", "Block"), ("timm.models.vision_transformer", "ResPostBlock"),
    ("timm.models.convnext", "ConvNeXtBlock"), ("timm.models.swin_transformer", "SwinTransformerBlock"),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"),
    ("timm.models.regnet", "Bottleneck"), ("timm.models.regnet", "PreBottleneck"),
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"),
    ("timm.models._efficientnet_blocks", "InvertedResidual"), ("timm.models._efficientnet_blocks", "EdgeResidual"),
    ("timm.models._efficientnet_blocks", "UniversalInvertedResidual"),
    ("timm.models.nfnet", "NormFreeBlock"), ("timm.models.cspnet", "BottleneckBlock"),
    ("timm.models.cspnet", "DarkBlock"), ("timm.models.resnet", "BasicBlock"), ("timm.models.resnet", "Bottleneck"),
    ("torchvision.models.convnext", "CNBlock"), ("torchvision.models.vision_transformer", "EncoderBlock"),
    ("torchvision.models.swin_transformer", "SwinTransformerBlock"),
    ("torchvision.models.swin_transformer", "SwinTransformerBlockV2"),
    ("torchvision.models.regnet", "ResBottleneckBlock"), ("torchvision.models.mobilenetv2", "InvertedResidual"),
    ("torchvision.models.mobilenetv3", "InvertedResidual"), ("torchvision.models.efficientnet", "MBConv"),
    ("torchvision.models.efficientnet", "FusedMBConv"), ("torchvision.models.resnet", "BasicBlock"),
    ("torchvision.models.resnet", "Bottleneck"), ("timm.models.byobnet", "BottleneckBlock"),
    ("timm.models.byobnet", "BasicBlock"),
}


def reference_is_block(m: nn.Module) -> bool:
    if (type(m).__module__, type(m).__name__) not in REFERENCE_CLASSES:
        return False
    if hasattr(m, "has_skip"):
        return bool(m.has_skip)
    if hasattr(m, "use_res_connect"):
        return bool(m.use_res_connect)
    if type(m).__module__ == "timm.models.regnet":
        return m.downsample is not None
    if type(m).__module__ == "timm.models.byobnet":
        return m.shortcut is not None
    return True


def reference_blocks(model: nn.Module, size: int = SIZE) -> list[tuple[str, str]]:
    """(name, kind) of the residual blocks: by class, in execution order, kind from the shapes."""
    names = [n for n, m in model.named_modules() if reference_is_block(m)]
    shapes, order, handles = {}, [], []
    for n in names:
        def hook(_m, args, out, n=n):
            order.append(n)
            shapes[n] = (args[0].shape, out.shape)
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return [(n, "identity" if shapes[n][0] == shapes[n][1] else "transition") for n in order]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norms, layer scales and gains of real size (timm zero-inits some), random running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rpartition(".")[2]
            if p.dim() <= 1 and leaf in ("weight", "gamma", "layer_scale", "skipinit_gain") or "ls" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.dim() <= 1 and leaf == "bias":
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():  # zero-initialized classifiers
                m.weight.copy_(0.5 * torch.randn(m.weight.shape, generator=g))
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def built():
    cache: dict[str, nn.Module] = {}

    def get(key: str) -> nn.Module:
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = randomize(MAKERS[key]())
        return cache[key]

    return get


def data(n: int = 6, classes: int = 5, seed: int = 0, size: int = SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


# --------------------------------------------------------------------------------------------------
# Discovery

EXPECTED_STAGES = {
    "timm_vit": [0, 0, 0], "timm_convnext": [0, 1, 1, 2, 3], "timm_swin": [0, 0, 1, 1],
    "timm_regnet": [0, 1, 2, 2, 2, 3], "tv_convnext": [1, 3, 3], "tv_vit": [0, 0], "tv_swin": [1, 1, 3, 3],
    "tv_regnet": [0, 1, 2, 2], "timm_nfnet": [0, 1, 1], "timm_regnetz": [0, 1, 1],
    "timm_byob_post": [0, 0, 1, 1, 1],
}


@pytest.mark.parametrize("key", list(MAKERS))
def test_discovery_matches_class_reference(key, built):
    model = built(key)
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    assert [(b.name, b.kind) for b in anatomy.blocks] == reference_blocks(model)
    if key in EXPECTED_STAGES:
        assert [b.stage for b in anatomy.blocks] == EXPECTED_STAGES[key]
    for stage in {b.stage for b in anatomy.blocks}:
        assert [b.index for b in anatomy.blocks if b.stage == stage] == list(range(sum(
            b.stage == stage for b in anatomy.blocks)))


def test_flat_torchvision_mobilenet_stages_are_runs(built):
    anatomy = discover_blocks(built("tv_mobilenet_v2"), (3, SIZE, SIZE))
    names = [b.name for b in anatomy.blocks]
    # features: 0 conv, 1 (8→8, skip), 2 (no skip), 3 (skip), 4 (no), 5, 6, 7 (no), 8, 9, 10, ...
    by_stage = {}
    for b in anatomy.blocks:
        by_stage.setdefault(b.stage, []).append(int(b.name.split(".")[1]))
    for positions in by_stage.values():  # each stage a run of consecutive feature indices
        assert positions == list(range(positions[0], positions[0] + len(positions)))
    assert len(by_stage) == len(set(by_stage)) and names[0] == "features.1"


def test_blocks_glob_keeps_the_stage_index():
    import timm

    model = timm.create_model("resnet18", num_classes=5)
    anatomy = discover_blocks(model, (3, SIZE, SIZE), ["layer3.*", "layer4.*"])
    assert [(b.name, b.stage, b.index) for b in anatomy.blocks] == [
        ("layer3.0", 2, 0), ("layer3.1", 2, 1), ("layer4.0", 3, 0), ("layer4.1", 3, 1)]
    convnext = timm.create_model("convnext_atto", depths=(1, 2, 1, 1), dims=(8, 16, 24, 32))
    anatomy = discover_blocks(convnext, (3, SIZE, SIZE), ["stages.2.blocks.*"])
    assert [b.stage for b in anatomy.blocks] == [2]


# --------------------------------------------------------------------------------------------------
# record: statistics against plain autograd on each block


def independent_branch(key: str, block: nn.Module, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """F of an identity block, computed here: post-activation blocks run with their activation replaced
    by identity (F = pre-activation sum − h); timm's RegNet PreBottleneck adds F to norm1(h)."""
    post = {"timm_regnet": "act3", "tv_regnet": "activation", "timm_cspnet": "act3", "timm_byob_post": "act"}.get(key)
    if post is not None:
        saved = getattr(block, post)
        setattr(block, post, nn.Identity())
        try:
            return block(h) - h
        finally:
            setattr(block, post, saved)
    if key == "timm_regnet_pre":
        return out - block.norm1(h)
    return out - h


def reference_stats(key: str, model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor):
    rows = {s: [] for s in STAT_NAMES}
    for name in names:
        block = model.get_submodule(name)
        kept = {}

        def pre(_m, args):
            kept["h"] = args[0].detach().clone().requires_grad_(True)
            return (kept["h"],)

        handle = block.register_forward_pre_hook(pre)
        loss = F.cross_entropy(model(x), y, reduction="none").sum()
        handle.remove()
        (g,) = torch.autograd.grad(loss, [kept["h"]])

        def post(_m, _args, out):
            kept["out"] = out.detach().clone().requires_grad_(True)
            return kept["out"]

        handle = block.register_forward_hook(post)
        loss = F.cross_entropy(model(x), y, reduction="none").sum()
        handle.remove()
        (g_out,) = torch.autograd.grad(loss, [kept["out"]])
        h, out = kept["h"].detach(), kept["out"].detach()
        with torch.no_grad():
            branch = independent_branch(key, block, h, out)
        u = out - h
        flat = lambda t: t.reshape(len(t), -1).double()  # noqa: E731
        hf, bf, uf, gf, gof = map(flat, (h, branch, u, g, g_out))
        values = {"input_norm": hf.norm(dim=1), "branch_norm": bf.norm(dim=1), "update_norm": uf.norm(dim=1),
                  "grad_norm": gf.norm(dim=1), "dot": (bf * gf).sum(1), "update_dot": (uf * gf).sum(1),
                  "out_dot": (uf * gof).sum(1)}
        values["cos"] = values["dot"] / (values["branch_norm"] * values["grad_norm"])
        values["update_cos"] = values["update_dot"] / (values["update_norm"] * values["grad_norm"])
        for s in STAT_NAMES:
            rows[s].append(values[s])
    return {s: torch.stack(v, 1) for s, v in rows.items()}


@pytest.mark.parametrize("key", list(MAKERS))
def test_record_matches_autograd_on_each_block(key, built):
    check_record(key, built(key), SIZE)


def check_record(key: str, model: nn.Module, size: int) -> None:
    anatomy = discover_blocks(model, (3, size, size))
    identity = [j for j, b in enumerate(anatomy.blocks) if b.is_identity]
    x, y = data(size=size)
    with Recorder(anatomy, CPU) as recorder:
        got = recorder.run_batch(x, y, torch.arange(len(y))).stats
    model.requires_grad_(False)
    reference = reference_stats(key, model, [anatomy.blocks[j].name for j in identity], x, y)
    for s in STAT_NAMES:
        torch.testing.assert_close(torch.as_tensor(got[s][:, identity]).double(), reference[s], rtol=2e-4,
                                   atol=1e-6, msg=lambda m, s=s: f"{key} {s}: {m}")
    assert (reference["branch_norm"] > 0).all() and (reference["grad_norm"] > 0).all()  # the blocks do something (randomized norms/scales)


def test_channels_last_and_token_layouts_need_no_copy_of_the_statistics(built):
    # ConvNeXt's and Swin's blocks see [B, C, H, W] and [B, H, W, C]; a ViT's [B, N, C] with the class
    # token: the statistics are over the whole flattened tensor, class token included.
    model = built("timm_vit")
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    assert anatomy.blocks[0].in_shape == (1 + (SIZE // 8) ** 2, 24)
    swin = discover_blocks(built("timm_swin"), (3, SIZE, SIZE))
    assert swin.blocks[0].in_shape == (SIZE // 2, SIZE // 2, 12)


# --------------------------------------------------------------------------------------------------
# ablate: prefix cache against naive re-evaluation with hand-written lesions


def hand_lesion(key: str, block: nn.Module, h: torch.Tensor, identity: bool) -> torch.Tensor:
    if key == "timm_regnet":
        return block.act3(block.downsample(h))
    if key == "timm_regnet_pre":
        return block.downsample(block.norm1(h))
    if key == "tv_regnet":
        return torch.relu(block.proj(h) if block.proj is not None else h)
    if key == "timm_cspnet":
        return block.act3(h)
    if key == "timm_byob_post":  # act is an in-place SiLU: applied here out of place
        return F.silu(block.shortcut(h))
    if key == "timm_nfnet":
        return h if block.downsample is None else block.downsample(block.act1(h) * block.beta)
    assert identity, key  # ConvNeXt, transformers, inverted residuals: identity blocks only
    return h


def naive(model, batches, blocks=(), fns=None):
    tally = Tally()
    with torch.no_grad(), replaced_blocks(list(blocks), fns):
        for x, y in batches:
            tally.add(model(x), y)
    return tally.result()


CHAINED = set(MAKERS)  # CSP stages split and concatenate: segments (blocks.Segment)


@pytest.mark.parametrize("key", list(MAKERS))
def test_ablate_prefix_cache_equals_naive_with_hand_lesions(key, built):
    check_ablate(key, built(key), SIZE)


def check_ablate(key: str, model: nn.Module, size: int) -> None:
    anatomy = discover_blocks(model, (3, size, size))
    x, y = data(8, seed=1, size=size)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    engine = AblationEngine(model, anatomy, CPU, batches)
    assert engine.fast == (key in CHAINED)
    positions = list(range(len(anatomy.blocks)))
    result = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in positions])
    assert abs(result.base.loss - naive(model, batches).loss) < 1e-5
    for p, r in zip(positions, result.variants):
        block = anatomy.blocks[p]
        ref = naive(model, batches, [block],
                    [lambda h, m=block.module, i=block.is_identity: hand_lesion(key, m, h, i)])
        assert abs(r.loss - ref.loss) < 1e-5 and abs(r.acc - ref.acc) < 1e-9, (key, block.name, r, ref)
    # two removals at once, with the suffix engine
    if len(positions) >= 2:
        pair = lesion_variant(anatomy, positions[-2:])
        both = evaluate_pass(engine, [pair]).variants[0]
        ref = naive(model, batches, [anatomy.blocks[p] for p in positions[-2:]],
                    [lambda h, b=anatomy.blocks[p]: hand_lesion(key, b.module, h, b.is_identity)
                     for p in positions[-2:]])
        assert abs(both.loss - ref.loss) < 1e-5


@pytest.mark.parametrize("size", [48, 160])
@pytest.mark.parametrize("key", ["timm_edge_uir", "tv_mbconv", "timm_mobilenetv3"])
def test_inverted_residuals_at_other_sizes(key, size, built):
    """EdgeResidual, UniversalInvertedResidual, torchvision MBConv/FusedMBConv and MobileNetV3 away from
    224 (and from the 32 of the tests above): blocks against the reference, record against autograd,
    every removal through the prefix cache against hand-written lesions."""
    model = built(key)
    anatomy = discover_blocks(model, (3, size, size))
    assert [(b.name, b.kind) for b in anatomy.blocks] == reference_blocks(model, size)
    check_record(key, model, size)
    check_ablate(key, model, size)


CSP = ["timm_cspnet", "timm_cspdarknet", "timm_cs3darknet"]


@pytest.mark.parametrize("key", CSP)
def test_csp_stages_run_on_from_every_block_with_any_removals(key, built):
    """CSP stages split their input, run the blocks on one half and concatenate: the prefix cache runs the
    stage again around the blocks after k. Every set of removals (within and across stages), with and
    without a greedy base, equals the model's own forward with hand-written lesions."""
    from itertools import combinations

    model = built(key)
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    assert len(anatomy.segments) == 2 and not anatomy.chained
    x, y = data(8, seed=4)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    engine = AblationEngine(model, anatomy, CPU, batches)
    assert engine.fast
    blocks = anatomy.blocks

    def hand(positions):
        return naive(model, batches, [blocks[p] for p in positions],
                     [lambda h, b=blocks[p]: hand_lesion(key, b.module, h, b.is_identity) for p in positions])

    subsets = [c for r in (1, 2, 3) for c in combinations(range(len(blocks)), r)]
    result = evaluate_pass(engine, [lesion_variant(anatomy, c) for c in subsets])
    for subset, got in zip(subsets, result.variants):
        ref = hand(subset)
        assert abs(got.loss - ref.loss) < 1e-5 and got.acc == ref.acc, (key, subset, got, ref)
    # a greedy step: block 1 already removed in the base pass, each other block removed on top of it
    others = [p for p in range(len(blocks)) if p != 1]
    stepped = evaluate_pass(engine, [lesion_variant(anatomy, [1, p]) for p in others],
                            base=lesion_variant(anatomy, [1]))
    assert abs(stepped.base.loss - hand([1]).loss) < 1e-5
    for p, got in zip(others, stepped.variants):
        assert abs(got.loss - hand(sorted({1, p})).loss) < 1e-5, (key, p)


class _SplitStage(nn.Module):
    """A CSP-like stage written here: blocks on one half (or, ``twice``, the same blocks on both halves)."""

    def __init__(self, twice: bool):
        super().__init__()
        self.twice = twice
        self.pre = nn.Conv2d(8, 8, 1)
        self.blocks = nn.Sequential(tinymodels.CustomBlock(4), tinymodels.CustomBlock(4))
        self.post = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a, b = self.pre(x).split(4, dim=1)
        return self.post(torch.cat([self.blocks(a), self.blocks(b) if self.twice else b], dim=1))


class _SplitNet(nn.Module):
    def __init__(self, twice: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = nn.Sequential(_SplitStage(False), _SplitStage(twice))
        self.fc = nn.Linear(8, 5)

    def forward_head(self, x):
        return self.fc(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.stages(self.stem(x)))


@pytest.mark.parametrize("twice", [False, True])
def test_segments_are_found_by_structure_and_checked(twice):
    """Segments need no knowledge of CSPNet; a stage that calls its blocks' container twice is not one
    and gets the full forward. Both equal hand-written lesions."""
    torch.manual_seed(0)
    model = _SplitNet(twice).eval()
    anatomy = discover_blocks(model, (3, 16, 16), ["stages.*.blocks.*"])
    assert [len(anatomy.segments), anatomy.can_run_suffix] == ([0, False] if twice else [2, True])
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    engine = AblationEngine(model, anatomy, CPU, [(x, y)])
    variants = [(p,) for p in range(4)] + [(0, 3), (1, 2)]
    result = evaluate_pass(engine, [lesion_variant(anatomy, v) for v in variants])
    for v, got in zip(variants, result.variants):
        ref = naive(model, [(x, y)], [anatomy.blocks[p] for p in v], [lambda h: h for _ in v])
        assert abs(got.loss - ref.loss) < 1e-6, (v, got, ref)


def test_csp_stage_named_by_glob_runs_from_that_stage(built):
    """With --blocks naming one CSP stage, the stage (not the whole ``stages``) is what a removal re-runs."""
    model = built("timm_cspnet")
    anatomy = discover_blocks(model, (3, SIZE, SIZE), ["stages.1.blocks.*"])
    assert [s.wrapper for s in anatomy.segments] == [model.stages[1]]
    x, y = data(6, seed=6)
    engine = AblationEngine(model, anatomy, CPU, [(x, y)])
    variants = [(0,), (1,), (0, 1)]
    result = evaluate_pass(engine, [lesion_variant(anatomy, v) for v in variants])
    for v, got in zip(variants, result.variants):
        ref = naive(model, [(x, y)], [anatomy.blocks[p] for p in v],
                    [lambda h, b=anatomy.blocks[p]: b.module.act3(h) for p in v])
        assert abs(got.loss - ref.loss) < 1e-5, v


@pytest.mark.parametrize("key", ["timm_vit", "timm_regnet", "timm_nfnet", "tv_regnet", "timm_byob_post", "timm_cspnet",
                                 "timm_cspdarknet"])
def test_pruned_model_equals_the_lesion(key, built):
    import copy

    model = copy.deepcopy(built(key))
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    x, y = data(4, seed=2)
    names = [anatomy.blocks[0].name, anatomy.blocks[-1].name]
    with torch.no_grad():
        expected = naive(model, [(x, y)], [anatomy[n] for n in names])
        prune_model(model, names)
        got = naive(model, [(x, y)])
    assert abs(got.loss - expected.loss) < 1e-6
    # the pruned model: removed blocks run as modules between the remaining ones, from cached inputs
    pruned = discover_blocks(model, (3, SIZE, SIZE))
    engine = AblationEngine(model, pruned, CPU, [(x, y)])
    assert engine.fast
    result = evaluate_pass(engine, [lesion_variant(pruned, [p]) for p in range(len(pruned.blocks))])
    for block, r in zip(pruned.blocks, result.variants):
        assert abs(r.loss - naive(model, [(x, y)], [block]).loss) < 1e-5


def test_silu_post_activation_lesion_applies_the_activation():
    """docs/reference.md: removing an identity block gives post(h), not h, when post is not a ReLU."""
    import timm

    torch.manual_seed(0)
    model = randomize(timm.create_model("resnet18", num_classes=5, act_layer="silu"))
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    x, y = data(6, seed=3)
    block = anatomy["layer1.1"]
    h = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(block.lesion(h), F.silu(h))
    engine = AblationEngine(model, anatomy, CPU, [(x, y)])
    got = evaluate_pass(engine, [lesion_variant(anatomy, [anatomy.position("layer1.1")])]).variants[0]
    ref = naive(model, [(x, y)], [block], [lambda t: F.silu(t)])
    wrong = naive(model, [(x, y)], [block], [lambda t: t])
    assert abs(got.loss - ref.loss) < 1e-6 and abs(ref.loss - wrong.loss) > 1e-5
    import copy

    pruned = prune_model(copy.deepcopy(model), ["layer1.1"])
    assert abs(naive(pruned, [(x, y)]).loss - ref.loss) < 1e-6


# --------------------------------------------------------------------------------------------------
# share


def _per_iteration_count(block: nn.Module) -> int:
    """Parameters a shared stage keeps per iteration, counted here from the block: norms (torch's
    norm classes, timm LayerNorm2d/GRN/BatchNormAct2d, LayerScale; not conv + norm modules such as timm
    ConvNormAct or torchvision Conv2dNormActivation) and parameters held directly by the block."""
    own = 0
    counted = set()
    for name, m in block.named_modules():
        cls = [c.__name__ for c in type(m).__mro__]
        holds_weights = any(isinstance(c, (nn.Linear, nn.modules.conv._ConvNd)) for c in m.modules())
        if any("Norm" in c or c.startswith("LayerScale") for c in cls[:-1]) and not holds_weights and not any(
                name.startswith(p + ".") for p in counted):
            counted.add(name)
            own += sum(p.numel() for p in m.parameters())
    return own + sum(p.numel() for p in block._parameters.values() if p is not None)


@pytest.mark.parametrize("key,stage", [("timm_vit", 0), ("timm_convnext", 1), ("timm_swin", 0), ("tv_convnext", 3),
                                       ("tv_vit", 0), ("tv_swin", 1), ("timm_mobilenetv3", 2), ("timm_regnetz", 1),
                                       ("timm_cspnet", 1), ("tv_mbconv", 1)])
def test_full_rank_lora_reproduces_the_original(key, stage, built):
    import copy

    model = copy.deepcopy(built(key))
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    x, y = data(4, seed=4)
    with torch.no_grad():
        before = model(x)
    replaced = [b for b in anatomy.blocks if b.stage == stage and b.is_identity]
    n_before = count_params(model)
    result = share_stages(model, anatomy, ShareOptions(stages=[stage], lora_rank=10_000))
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # params_after, counted independently: the replaced blocks' parameters out; one shared block's
    # non-per-iteration parameters in; per iteration its own norms/scales, full-rank A and B for every
    # conv/linear weight, and an offset for every other shared parameter.
    block = replaced[0].module
    own = _per_iteration_count(block)
    lora = 0
    for m in block.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not any(
                isinstance(p, nn.LayerNorm) for p in ()):
            o, rest = m.weight.shape[0], m.weight[0].numel()
            lora += min(o, rest) * (o + rest)
    shared = sum(p.numel() for p in block.parameters()) - own
    weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))
    offsets = shared - weights
    expected = n_before - sum(b.params for b in replaced) + shared + len(replaced) * (own + lora + offsets)
    assert result.params_after == expected == count_params(model)


@pytest.mark.parametrize("key,stage", [("timm_vit", 0), ("timm_convnext", 1), ("tv_convnext", 3)])
def test_layer_scales_and_norms_are_per_iteration(key, stage, built):
    import copy

    model = copy.deepcopy(built(key))
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    replaced = [b for b in anatomy.blocks if b.stage == stage and b.is_identity]
    originals = {k: v.clone() for b in replaced for k, v in
                 ((f"{b.name}.{n}", p) for n, p in b.module.named_parameters())}
    share_stages(model, anatomy, ShareOptions(stages=[stage], init="first"))
    state = model.state_dict()
    scale_keys = [k for k in originals if k.rpartition(".")[2] in ("gamma", "layer_scale")]
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    norm_keys = [f"{b.name}.{n}.weight" for b in replaced for n, m in b.module.named_modules()
                 if isinstance(m, norm_types)]
    assert scale_keys and norm_keys
    for k in scale_keys + norm_keys:  # at the replaced block's own name, with its own value
        torch.testing.assert_close(state[k], originals[k])
    # --init first: the shared weights are the first block's
    first = replaced[0]
    shared_keys = [k for k in state if k.startswith("resprobe_shared.")]
    for k in shared_keys:
        path = k.split(".", 2)[2]
        torch.testing.assert_close(state[k], originals[f"{first.name}.{path}"])


@pytest.mark.parametrize("init", ["average", "last"])
def test_vit_share_init_rules(init, built):
    import copy

    model = copy.deepcopy(built("timm_vit")).requires_grad_(True)  # the record test froze the shared one
    anatomy = discover_blocks(model, (3, SIZE, SIZE))
    weights = [b.module.attn.qkv.weight.detach().clone() for b in anatomy.blocks]
    share_stages(model, anatomy, ShareOptions(stages=[0], init=init))
    shared = model.resprobe_shared["blocks"].attn.qkv.weight
    expected = torch.stack(weights).double().mean(0).float() if init == "average" else weights[-1]
    torch.testing.assert_close(shared, expected)
    # the recursive ViT trains: a gradient reaches the shared weight and every iteration's norms
    x, y = data(4)
    model.train()
    F.cross_entropy(model(x), y).backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert all(model.get_submodule(f"blocks.{i}.norm1").weight.grad is not None for i in range(3))
    assert all(model.get_submodule(f"blocks.{i}.ls1").gamma.grad is not None for i in range(3))


def test_share_one_identity_block_stage_is_an_error(run, arrays_file, tmp_path):
    result = run("share", "timm:resnet18", "--num-classes", "5", "--stages", "1", "--input-size", "32",
                 "--out", tmp_path / "s.pt", code=1)
    assert result.stderr.count("\n") == 1 and "only one identity block (layer2.1)" in result.stderr
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.slow
def test_blocks_on_the_224_architectures_without_a_glob():
    """`resprobe blocks` on 17+ architectures at 224×224, against the class-based reference."""
    import timm
    import torchvision

    specs = ["timm:convnext_atto", "timm:convnextv2_atto", "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
             "timm:swin_tiny_patch4_window7_224", "timm:regnetx_002", "timm:regnety_002", "timm:efficientnet_b0",
             "timm:mobilenetv2_100", "timm:mobilenetv3_small_100", "timm:nf_resnet26", "timm:cspresnet50",
             "timm:cspdarknet53", "torchvision:convnext_tiny", "torchvision:regnet_y_400mf",
             "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
             "torchvision:vit_b_16", "torchvision:swin_t", "torchvision:swin_v2_t"]
    for spec in specs:
        source, name = spec.split(":")
        model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
        anatomy = discover_blocks(model.eval(), (3, 224, 224))
        assert [(b.name, b.kind) for b in anatomy.blocks] == reference_blocks(model, 224), spec
        assert anatomy.can_run_suffix and bool(anatomy.segments) == ("csp" in name), spec  # CSP: segments


@pytest.mark.slow
@pytest.mark.parametrize("name", ["regnetz_b16", "regnetz_c16", "regnetz_d8"])
def test_blocks_command_finds_regnetz_blocks_without_a_glob(name, run):
    """`resprobe blocks timm:regnetz_*` at the model's own size, against the class-based reference."""
    import json

    import timm

    payload = json.loads(run("blocks", f"timm:{name}", "-f", "json", "-q").stdout)
    size = payload["preprocessing"]["input_size"][-1]
    reference = reference_blocks(timm.create_model(name).eval(), size)
    assert [(b["name"], b["kind"]) for b in payload["blocks"]] == reference and len(reference) >= 18


def test_discovering_a_torchvision_model_does_not_import_timm():
    import os
    import subprocess
    import sys

    code = ("import sys, torchvision; from resprobe.models.blocks import discover_blocks; "
            "discover_blocks(torchvision.models.resnet18(num_classes=3), (3, 32, 32)); "
            "print('timm' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("model,kwargs", [
    ("timm:swin_tiny_patch4_window7_224", {"img_size": SIZE, "patch_size": 2, "window_size": 4, "embed_dim": 12,
                                           "depths": [2, 2], "num_heads": [2, 2]}),
    ("timm:convnext_atto", {"depths": [1, 2, 1, 1], "dims": [8, 16, 24, 32], "ls_init_value": 0.5}),
])
def test_shared_checkpoint_round_trip_with_full_rank_lora(model, kwargs, run, arrays_file, tmp_path):
    import json

    data, out = arrays_file(12), tmp_path / "shared.pt"
    common = ["--num-classes", 5, "--model-kwargs", json.dumps(kwargs), "--data", data, "-f", "json", "-q"]
    payload = json.loads(run("share", model, "--out", out, "--lora-rank", 1000, *common).stdout)
    assert payload["eval_shared"]["loss"] == pytest.approx(payload["eval_original"]["loss"], rel=1e-4)  # float32 rounding of W + BA
    evaluated = json.loads(run("eval", out, "--data", data, "-f", "json", "-q").stdout)
    assert evaluated["loss"] == pytest.approx(payload["eval_shared"]["loss"], abs=1e-6)
