"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4): three stages of basic blocks.

Module and parameter names follow mdistiller/RepDistiller exactly, so their checkpoints load strictly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.models._base import Classifier, global_pool


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(Classifier):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        assert (depth - 2) % 6 == 0, "basic-block CIFAR ResNets have depth 6n + 2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], n, 1)
        self.layer2 = self._stage(widths[1], widths[2], n, 2)
        self.layer3 = self._stage(widths[2], widths[3], n, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features, self.num_classes = widths[3], num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(blocks)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w0, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, w3, 8, 8)
        return global_pool(x)

    def head(self) -> nn.Module:
        return self.fc


SMALL = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)
CIFAR_RESNETS = {f"resnet{d}": (d, SMALL) for d in (8, 14, 20, 32, 44, 56, 110)} | {
    "resnet8x4": (8, WIDE), "resnet32x4": (32, WIDE)}


def make(name: str, num_classes: int) -> CifarResNet:
    depth, widths = CIFAR_RESNETS[name]
    return CifarResNet(depth, widths, num_classes)
