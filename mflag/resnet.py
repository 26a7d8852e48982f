"""ResNet-50 (He et al., 2016; the "v1.5" variant, stride on the 3x3 convolution), without torchvision.

Why not torchvision: importing it loads its detection ops and, through them, torch._dynamo, 2.5 to 4 s
per process on a 2-core machine; each of the 42 fine-tune cells is its own process, and only the
segmentation cells need torchvision (through segmentation-models-pytorch).

The module tree, parameter names and shapes are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` ...), so its ImageNet state dicts load as they are. Construction also draws
from the random generator in torchvision's order (each block's shortcut before its own convolutions,
the 2048 -> 1000 classifier last, then Kaiming-normal fan-out on every convolution in module order),
so a seed gives the very weights ``torchvision.models.resnet50()`` gives (tests/test_resnet.py checks
both, and the forward pass, against torchvision).
"""

from __future__ import annotations

import torch
import torch.nn as nn

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride) of layer1..layer4
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, each with batch norm; identity or projected shortcut."""

    def __init__(self, in_ch: int, width: int, stride: int, shortcut: nn.Module | None):
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut  # registered last, as in torchvision (it fixes the init order below)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


def _stage(in_ch: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    out_ch = width * EXPANSION
    shortcut = None
    if stride != 1 or in_ch != out_ch:  # built before the block: torchvision draws its weights first
        shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
    layers = [Bottleneck(in_ch, width, stride, shortcut)]
    layers += [Bottleneck(out_ch, width, 1, None) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet50(nn.Module):
    """(B, 3, H, W) -> (B, 2048) pooled features; ``fc`` is an identity (the classifier is not part of a trunk)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, (width, blocks, stride) in enumerate(STAGES, start=1):
            setattr(self, f"layer{i}", _stage(in_ch, width, blocks, stride))
            in_ch = width * EXPANSION
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        nn.Linear(in_ch, 1000)  # drawn and dropped: keeps the generator where torchvision's classifier leaves it
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
