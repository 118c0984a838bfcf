"""Batched image operations on uint8 tensors, on whatever device the batch lives (views: richkd_cache/views.py)."""

from __future__ import annotations

import torch


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 (x / 255 - mean) / std."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s
