"""Small residual networks for 32×32 images, buildable as MODEL ``resprobe.models.zoo:cifar_resnet``.

ImageNet ResNets shrink a 32×32 image to 8×8 before their first block (stride-2 stem and max-pool)
and to 1×1 in the last stage. The CIFAR ResNets of He et al. (2016) — and of the paper this project
follows — keep the full resolution in a 3×3 stem and use three stages of widths 16·w, 32·w, 64·w.
This builds that network from timm's ``BasicBlock``, so every resprobe command knows its blocks::

    resprobe finetune resprobe.models.zoo:cifar_resnet --model-kwargs '{"depth": 20}' --num-classes 10 ...
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _block(inplanes: int, planes: int, stride: int) -> nn.Module:
    from timm.models.resnet import BasicBlock

    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride=stride, downsample=downsample)


class CifarResNet(nn.Module):
    """3×3 stem, three stages of ``n`` BasicBlocks (widths 16w, 32w, 64w), global pool, linear head."""

    def __init__(self, depth: int = 20, width: int = 1, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes
        # timm's convention: resolve_data_config(model=...) reads the model's preprocessing from here.
        self.pretrained_cfg = {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "crop_pct": 1.0,
                               "interpolation": "bilinear", "crop_mode": "center", "classifier": "fc",
                               "num_classes": num_classes}
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            blocks = [_block(inplanes if k == 0 else planes, planes, 2 if (k == 0 and i > 0) else 1) for k in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.global_pool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def cifar_resnet(depth: int = 20, width: int = 1, num_classes: int = 10) -> CifarResNet:
    """The CIFAR ResNet-``depth`` (20 → 0.27 M parameters at width 1)."""
    return CifarResNet(depth, width, num_classes)
