"""Block discovery on the architectures the foundation issue names, and lesions per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tinymodels
from resprobe.models.blocks import discover_blocks, replaced_blocks
from resprobe.errors import ModelError
from resprobe.models.loading import LoadOptions, load_model

# (MODEL, blocks per stage, basic blocks?) — "layer{i}.{k}" names, or ResNetV2's "stages.{i}.blocks.{k}".
ARCHITECTURES = [
    ("torchvision:resnet18", [2, 2, 2, 2], True),
    ("torchvision:resnet34", [3, 4, 6, 3], True),
    ("torchvision:resnet50", [3, 4, 6, 3], False),
    ("torchvision:resnet101", [3, 4, 23, 3], False),
    ("torchvision:resnext50_32x4d", [3, 4, 6, 3], False),
    ("torchvision:wide_resnet50_2", [3, 4, 6, 3], False),
    ("timm:resnet18", [2, 2, 2, 2], True),
    ("timm:resnet50d", [3, 4, 6, 3], False),
    ("timm:resnet26t", [2, 2, 2, 2], False),
    ("timm:seresnext26d_32x4d", [2, 2, 2, 2], False),
    ("timm:ecaresnet50t", [3, 4, 6, 3], False),
    ("timm:skresnet18", [2, 2, 2, 2], True),
    ("timm:resnest14d", [1, 1, 1, 1], False),
    ("timm:res2net50_14w_8s", [3, 4, 6, 3], False),
    ("timm:resnetv2_50", [3, 4, 6, 3], False),
    ("timm:resnetrs50", [3, 4, 6, 3], False),
]


@pytest.mark.parametrize("spec,layers,basic", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_discovery_names_order_and_kinds(spec, layers, basic):
    loaded = load_model(spec, LoadOptions(num_classes=10))
    anatomy = discover_blocks(loaded.model, (3, 64, 64))
    v2 = "resnetv2" in spec
    want = [(f"stages.{i}.blocks.{k}" if v2 else f"layer{i + 1}.{k}", i, k)
            for i, n in enumerate(layers) for k in range(n)]
    assert [(b.name, b.stage, b.index) for b in anatomy.blocks] == want
    for block in anatomy.blocks:
        # the first block of a stage changes shape, except a basic-block network's first stage
        transition = block.index == 0 and not (basic and block.stage == 0)
        assert block.kind == ("transition" if transition else "identity"), block.name
    assert anatomy.can_run_suffix


def test_model_without_blocks_is_a_clear_error():
    with pytest.raises(ModelError, match="no residual blocks"):
        discover_blocks(tinymodels.plain_net(), (3, 16, 16))


def test_custom_blocks_by_glob_and_generic_lesion():
    model = tinymodels.custom_net()
    anatomy = discover_blocks(model, (3, 16, 16), ["body.*"])
    assert anatomy.names == ["body.0", "body.1", "body.2"]
    assert all(b.kind == "identity" for b in anatomy.blocks)
    with pytest.raises(ModelError, match="matches no module"):
        discover_blocks(model, (3, 16, 16), ["nothing.*"])


def hand_lesion(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Residual branch removed, shortcut kept, written out per family without resprobe."""
    name = type(block).__name__
    if name.startswith("PreAct"):
        return block.downsample(block.norm1(h))
    return F.relu(block.downsample(h))


@pytest.mark.parametrize("make", [tinymodels.timm_basic, tinymodels.timm_seresnext, tinymodels.timm_resnetv2,
                                  tinymodels.torchvision_tiny, tinymodels.torchvision_bottleneck],
                         ids=lambda f: f.__name__)
def test_lesions_per_family(make):
    model = make()
    anatomy = discover_blocks(model, (3, 32, 32))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = {}
    hooks = [b.module.register_forward_pre_hook(lambda m, a, n=b.name: inputs.__setitem__(n, a[0].clone()))
             for b in anatomy.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for block in anatomy.blocks:
            h = inputs[block.name]
            want = h if block.is_identity else hand_lesion(block.module, h)
            torch.testing.assert_close(block.lesion(h), want)
            # the lesioned model through its own forward equals the suffix engine
            with replaced_blocks([block]):
                full = model(x)
            suffix = anatomy.run_from(anatomy.position(block.name), h, {anatomy.position(block.name): block.lesion})
            torch.testing.assert_close(suffix, full, rtol=1e-5, atol=1e-5)


def test_zoo_cifar_resnet_is_analysable():
    from resprobe.probe import open_probe

    probe = open_probe("resprobe.models.zoo:cifar_resnet", num_classes=10, model_kwargs={"depth": 14}, device="cpu")
    assert probe.preprocessing.input_size == (3, 32, 32) and probe.preprocessing.mean[0] == 0.4914
    assert [b.kind for b in probe.anatomy.blocks] == ["identity", "identity", "transition", "identity",
                                                      "transition", "identity"]
    assert probe.anatomy.can_run_suffix


# --------------------------------------------------------------------------------------------------
# A projection on a shape-preserving shortcut makes a transition (issue 22 item 5)


def resnetv2_stem_as_wide_as_stage0() -> torch.nn.Module:
    """timm ResNetV2 whose stage 0 keeps the stem's 8 channels: its first block projects anyway."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50", num_classes=5, layers=[2, 1, 1, 1], channels=[8, 16, 16, 32],
                              stem_chs=8)
    return tinymodels.randomize_norms(model, 3).eval()


def block_inputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].clone()))
             for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return inputs


def test_resnetv2_projection_with_equal_shapes_is_a_transition_and_f_is_its_branch():
    from resprobe.recording.recorder import Recorder
    from resprobe.runtime import make_runtime

    model = resnetv2_stem_as_wide_as_stage0().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    block = anatomy["stages.0.blocks.0"]
    assert block.in_shape == block.out_shape and block.module.downsample is not None
    assert block.kind == "transition"
    assert anatomy["stages.0.blocks.1"].kind == "identity"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
    h = block_inputs(model, [block.name], x)[block.name]
    b = block.module
    with torch.no_grad():  # the pre-activation bottleneck's branch, written out
        branch = b.conv3(b.norm3(b.conv2(b.norm2(b.conv1(b.norm1(h))))))
    j = anatomy.position(block.name)
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        got = recorder.run_batch(x, y, torch.arange(6)).stats
    np.testing.assert_allclose(got["branch_norm"][:, j], branch.flatten(1).double().norm(dim=1).numpy(), rtol=1e-4)
    assert not np.isfinite(got["cos"][:, j]).any()  # transitions: only norms
    # removing it keeps the projection: downsample(norm1(h)), not h
    with torch.no_grad():
        torch.testing.assert_close(block.lesion(h), b.downsample(b.norm1(h)))


def projected_torchvision_basic() -> torch.nn.Module:
    """torchvision ResNet whose first block is given a 1×1 conv + BN shortcut at stride 1, 64 → 64."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    model = tinymodels.torchvision_tiny()
    torch.manual_seed(1)
    first = model.layer1[0]
    model.layer1[0] = BasicBlock(64, 64, downsample=nn.Sequential(nn.Conv2d(64, 64, 1, bias=False),
                                                                  nn.BatchNorm2d(64)))
    model.layer1[0].load_state_dict(first.state_dict(), strict=False)
    return tinymodels.randomize_norms(model, 6).eval()


def projected_timm_basic() -> torch.nn.Module:
    """timm ResNet whose first block is given an avg-down shortcut (``downsample_avg``) at stride 1."""
    from timm.models.resnet import BasicBlock, downsample_avg

    model = tinymodels.timm_basic()
    torch.manual_seed(1)
    model.layer1[0] = BasicBlock(8, 8, downsample=downsample_avg(8, 8, 1))
    return tinymodels.randomize_norms(model, 6).eval()


@pytest.mark.parametrize("make", [projected_torchvision_basic, projected_timm_basic], ids=lambda f: f.__name__)
def test_shape_preserving_downsample_makes_a_transition(make):
    from resprobe.recording.recorder import Recorder
    from resprobe.runtime import make_runtime

    model = make().requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    block = anatomy["layer1.0"]
    assert block.in_shape == block.out_shape and block.kind == "transition"
    assert anatomy["layer1.1"].kind == "identity"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
    h = block_inputs(model, [block.name], x)[block.name]
    b = block.module
    with torch.no_grad():
        branch = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))
        torch.testing.assert_close(block.lesion(h), F.relu(b.downsample(h)))
    with Recorder(anatomy, make_runtime("cpu")) as recorder:
        got = recorder.run_batch(x, y, torch.arange(6)).stats
    j = anatomy.position(block.name)
    np.testing.assert_allclose(got["branch_norm"][:, j], branch.flatten(1).double().norm(dim=1).numpy(), rtol=1e-4)


def test_identity_shortcut_modules_keep_blocks_identity():
    """An ``nn.Identity`` or empty shortcut is no projection: the block stays an identity block."""
    from torch import nn

    model = tinymodels.torchvision_tiny()
    model.layer1[1].downsample = nn.Sequential(nn.Identity())
    model.layer1[0].downsample = nn.Identity()
    anatomy = discover_blocks(model, (3, 32, 32))
    assert anatomy["layer1.0"].kind == anatomy["layer1.1"].kind == "identity"
