"""Batched image operations on uint8 tensors, on whatever device the batch lives (GPU when there is one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 (x / 255 - mean) / std."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """CIFAR's training augmentation for a whole batch: zero-pad, random crop back to size, random h-flip.

    Same distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, without a
    Python loop over samples: every sample's crop is an index gather into the padded batch.
    images: (B, C, H, W) uint8 -> (B, C, H, W) uint8.
    """
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros, like RandomCrop(padding=p)
    gen_device = generator.device if generator is not None else device
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(device)
    flip = torch.rand(b, generator=generator, device=gen_device).to(device) < 0.5
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reverses the column order
    batch = torch.arange(b, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
