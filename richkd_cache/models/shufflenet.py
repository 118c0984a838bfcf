"""ShuffleNet V1 (groups 3) and V2 (size 1x) for CIFAR, as mdistiller/RepDistiller define them.

Parameter names follow theirs (layer1.0.conv1, linear, ...) for strict loading.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.models._base import Classifier, global_pool


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, H, W): interleave the channels of `groups` groups."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_planes // 4
        self.g = 1 if in_planes == 24 else groups  # the first block's input is too thin to group
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:  # downsampling blocks concatenate an average-pooled shortcut
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(Classifier):
    def __init__(self, num_classes: int = 100, out_planes=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        for i, (planes, n) in enumerate(zip(out_planes, blocks), start=1):
            layers = []
            for j in range(n):
                # a downsampling block outputs its own planes concatenated with its input
                layers.append(ShuffleV1Block(c_in, planes - (c_in if j == 0 else 0), 2 if j == 0 else 1, groups))
                c_in = planes
            self.add_module(f"layer{i}", nn.Sequential(*layers))
        self.linear = nn.Linear(out_planes[-1], num_classes)
        self.num_features, self.num_classes = out_planes[-1], num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return global_pool(self.layer3(self.layer2(self.layer1(x))))

    def head(self) -> nn.Module:
        return self.linear


class ShuffleV2Block(nn.Module):
    """Keeps half the channels, transforms the other half, concatenates and shuffles."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        keep, work = x[:, :c], x[:, c:]
        work = F.relu(self.bn1(self.conv1(work)))
        work = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(work)))))
        return channel_shuffle(torch.cat([keep, work], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)  # left branch
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)  # right branch
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(Classifier):
    def __init__(self, num_classes: int = 100, channels=(116, 232, 464, 1024), blocks=(3, 7, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in = 24
        for i, (c, n) in enumerate(zip(channels[:3], blocks), start=1):
            self.add_module(f"layer{i}", nn.Sequential(ShuffleV2Down(c_in, c), *[ShuffleV2Block(c) for _ in range(n)]))
            c_in = c
        self.conv2 = nn.Conv2d(channels[2], channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.linear = nn.Linear(channels[3], num_classes)
        self.num_features, self.num_classes = channels[3], num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_pool(F.relu(self.bn2(self.conv2(x))))

    def head(self) -> nn.Module:
        return self.linear


def make(name: str, num_classes: int) -> Classifier:
    return ShuffleNetV1(num_classes) if name == "ShuffleV1" else ShuffleNetV2(num_classes)
