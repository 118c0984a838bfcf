"""Batched image operations on uint8 tensors, on whatever device the batch lives (GPU when there is one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from richkd_cache.views import apply_views


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


def random_resized_crop_flip(
    images: torch.Tensor, generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """ImageNet's training augmentation for a whole batch (mdistiller's ImageNet recipe: torchvision's
    RandomResizedCrop(S), scale 0.08-1, ratio 3/4-4/3, bilinear, then RandomHorizontalFlip).

    The box is drawn in fractions of the (centre-cropped) image as `views.random_resized_crops` draws
    stored views, and `apply_views` cuts and resizes it. images: (B, C, S, S) uint8 -> same.
    """
    b = images.shape[0]
    gen_device = generator.device if generator is not None else images.device
    u = torch.rand(5, b, generator=generator, device=gen_device, dtype=torch.float64).cpu()
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_ratio = torch.tensor(ratio, dtype=torch.float64).log()
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
    width = (area * aspect).sqrt().clamp(0.05, 1.0)
    height = (area / aspect).sqrt().clamp(0.05, 1.0)
    params = torch.stack([u[2] * (1 - height), u[3] * (1 - width), height, width, (u[4] < 0.5).double()], dim=1)
    return apply_views(images, params.float())
