"""Tiny residual networks of every family, for fast tests (8–64 channels, 16×16 or 32×32 inputs).

timm zero-initializes each block's last norm (``zero_init_last``), which makes every residual branch
output zero; ``randomize_norms`` gives every norm layer random affine parameters and running
statistics so that the blocks really do something.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=g) * 1.0 + 0.25)
                module.bias.copy_(torch.randn(n, generator=g) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        elif isinstance(module, nn.GroupNorm) and module.affine:
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.num_channels, generator=g) + 0.25)
                module.bias.copy_(torch.randn(module.num_channels, generator=g) * 0.2)
    return model


def timm_basic(num_classes: int = 5, **kwargs) -> nn.Module:
    """timm ResNet with BasicBlocks: 3 stages' worth of identity and transition blocks."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=num_classes, layers=[2, 2, 1, 1], channels=[8, 16, 16, 32],
                              stem_width=4, stem_type="deep", zero_init_last=False, **kwargs)
    return randomize_norms(model, 1).eval()


def timm_seresnext(num_classes: int = 5) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("seresnext26d_32x4d", num_classes=num_classes, layers=[2, 2, 1, 1],
                              channels=[16, 16, 32, 32], stem_width=8, base_width=4, cardinality=4,
                              zero_init_last=False)
    return randomize_norms(model, 2).eval()


def timm_resnetv2(num_classes: int = 5) -> nn.Module:
    """Pre-activation ResNetV2 (PreActBottleneck)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50", num_classes=num_classes, layers=[2, 2, 1, 1],
                              channels=(16, 16, 32, 32), stem_chs=8)
    return randomize_norms(model, 3).eval()


def torchvision_tiny(num_classes: int = 5) -> nn.Module:
    """torchvision ResNet (in-place ReLU, ``out += identity``) with BasicBlocks [2, 1, 1, 1]."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return randomize_norms(ResNet(BasicBlock, [2, 1, 1, 1], num_classes=num_classes), 4).eval()


def torchvision_bottleneck(num_classes: int = 5) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    return randomize_norms(ResNet(Bottleneck, [2, 1, 1, 1], num_classes=num_classes, width_per_group=16), 5).eval()


class PlainNet(nn.Module):
    """A network with no residual blocks at all."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def plain_net(num_classes: int = 5) -> nn.Module:
    return PlainNet(num_classes)


class CustomBlock(nn.Module):
    """A residual block resprobe does not know: out = x + F(x), named with --blocks."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


class CustomNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(CustomBlock(8), CustomBlock(8), CustomBlock(8))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def custom_net(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return CustomNet(num_classes)
