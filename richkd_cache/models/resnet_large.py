"""ResNet18 and ResNet50 in their CIFAR form (3x3 stem, no max-pool), as mdistiller's resnetv2 defines them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.models._base import Classifier, global_pool


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNetLarge(Classifier):
    def __init__(self, block: type, blocks: tuple[int, ...], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            layers = []
            for j in range(n):
                layers.append(block(c_in, planes, (1 if i == 1 else 2) if j == 0 else 1))
                c_in = planes * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*layers))
        self.linear = nn.Linear(c_in, num_classes)
        self.num_features, self.num_classes = c_in, num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return global_pool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def head(self) -> nn.Module:
        return self.linear


def make(name: str, num_classes: int) -> CifarResNetLarge:
    if name == "ResNet18":
        return CifarResNetLarge(Basic, (2, 2, 2, 2), num_classes)
    return CifarResNetLarge(Bottleneck, (3, 4, 6, 3), num_classes)
