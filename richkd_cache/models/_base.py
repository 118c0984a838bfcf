"""The one interface every model has: `model(x) -> (logits (B, C), pooled feature (B, F))`.

`num_features` (F) and `num_classes` (C) are attributes, known without a forward pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Classifier(nn.Module):
    num_features: int
    num_classes: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled penultimate feature (B, F): the input of the final linear layer."""
        raise NotImplementedError

    def head(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward_features(x)
        return self.head()(feats), feats


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): the average pooling every CIFAR model ends with."""
    return x.mean(dim=(2, 3))
