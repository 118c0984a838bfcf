"""MobileNetV2 for CIFAR, mdistiller's `mobile_half` (expansion T=6, width 0.5), registered as MobileNetV2.

Parameter names follow mdistiller (conv1.0, blocks.i.j.conv.k, conv2.0, classifier.0) for strict loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from richkd_cache.models._base import Classifier, global_pool


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Classifier):
    def __init__(self, expand: int = 6, width: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        # (expansion, channels, repeats, first stride) per stage
        stages = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
                  (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        c_in = int(32 * width)
        self.conv1 = conv_bn_relu(3, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in stages:
            c_out = int(c * width)
            self.blocks.append(nn.Sequential(*[InvertedResidual(c_in if i == 0 else c_out, c_out, s if i == 0 else 1, t)
                                               for i in range(n)]))
            c_in = c_out
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(c_in, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.num_features, self.num_classes = last, num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return global_pool(self.conv2(x))  # (B, 1280), from 2x2 maps for CIFAR

    def head(self) -> nn.Module:
        return self.classifier


def make(name: str, num_classes: int) -> MobileNetV2:
    return MobileNetV2(6, 0.5, num_classes)
