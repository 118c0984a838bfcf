"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19): five conv blocks, one linear layer.

Parameter names follow mdistiller (block0..block4 Sequentials, classifier) for strict loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.models._base import Classifier, global_pool

CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def conv_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU per width; the block's last ReLU is applied by the caller (its input is a stage output)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])


class VGG(Classifier):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        ins = [3] + [c[-1] for c in cfg[:-1]]
        for i, (widths, c_in) in enumerate(zip(cfg, ins)):
            self.add_module(f"block{i}", conv_block(widths, c_in))
        self.classifier = nn.Linear(512, num_classes)
        self.num_features, self.num_classes = 512, num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2)  # 16x16 for CIFAR
        x = F.max_pool2d(F.relu(self.block1(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.block2(x)), 2)  # 4x4
        x = F.relu(self.block3(x))
        if h == 64:  # 64px inputs (Tiny-ImageNet) get one more halving, as in mdistiller
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return global_pool(x)

    def head(self) -> nn.Module:
        return self.classifier


def make(name: str, num_classes: int) -> VGG:
    return VGG(CONFIGS[name], num_classes)
