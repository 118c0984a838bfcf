"""Views: the augmented versions of each image that the teachers see in stage one and the student in stage two.

A view is stored as parameters (top, left, height, width as fractions of the image; hflip 0/1), and
`apply_views` turns an image batch plus parameters into pixels with integer arithmetic only, so the
pixels replayed in stage two are bit-identical to those the teachers saw.

Policies:
- `clean`: one view, the image itself.
- `all`: every view of CIFAR's standard augmentation (zero-pad 4, 32x32 crop, horizontal flip):
  9 x 9 x 2 = 162 views, so training from the cache is distributed exactly like online KD.
- an integer K: K random views per sample of a continuous policy (random-resized-crop, scale
  0.08-1, ratio 3/4-4/3, and flip), drawn from a seeded generator and stored, as FKD and dataset
  reinforcement do.

The teacher and CLIP each have a policy. The paper's code runs the teacher on the student's augmented
batch and CLIP on the clean image upsampled to 224, so the default for CIFAR-sized (32 px) data is the
teacher over `all` views and CLIP on the `clean` view; CLIP's views are either the clean one or the
teacher's own (then view v of both is the same pixels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from richkd_cache.errors import ConfigError

PARAM_NAMES = ("top", "left", "height", "width", "hflip")
CLEAN = np.array([0.0, 0.0, 1.0, 1.0, 0.0], dtype=np.float32)
CIFAR_PAD = 4
CIFAR_SIZE = 32


def parse_policy(text: str, flag: str = "--teacher-views") -> str | int:
    """`clean`, `all`, or a positive number of random views."""
    if text in ("clean", "all"):
        return text
    if text.isascii() and text.isdigit() and int(text) > 0:  # isdigit alone accepts "²", which int() refuses
        return int(text)
    raise ConfigError(f"{flag} takes clean, all or a number of random views, not {text!r}")


def teacher_policy(text: str, image_size: int) -> str | int:
    """`auto` is `all` for CIFAR-sized images (what the paper's teacher saw: every crop+flip the student
    draws) and `clean` otherwise (a larger image's random crops are drawn with `K`)."""
    if text == "auto":
        return "all" if image_size == CIFAR_SIZE else "clean"
    return parse_policy(text)


def clip_policy(text: str, teacher: str | int) -> str | int:
    """CLIP's views: `clean` (one row per sample, the paper's setting), or the teacher's own views
    (`same`, or the teacher's policy spelled out), so that CLIP row v is the teacher's view v."""
    if text == "clean":
        return "clean"
    if text == "same" or (text.isascii() and text.isdigit() and int(text) == teacher) or text == teacher:
        return teacher
    raise ConfigError(f"--clip-views takes clean or same (the teacher's views, here {teacher}), not {text!r}")


def clean_view_index(policy: str | int, image_size: int) -> int | None:
    """Which stored view is the clean image: 0 for `clean`, the zero-offset unflipped crop for `all`,
    None for random views (none of them is the whole image)."""
    if policy == "clean":
        return 0
    if policy == "all":
        rows = all_crop_flips(image_size)
        return int(np.flatnonzero((rows == CLEAN).all(axis=1))[0])
    return None


def num_views(policy: str | int, image_size: int) -> int:
    if policy == "clean":
        return 1
    if policy == "all":
        return (2 * pad_for(image_size) + 1) ** 2 * 2
    return int(policy)


def pad_for(image_size: int) -> int:
    """CIFAR's 4 pixels of padding at 32 px, scaled with the image."""
    return max(1, image_size * CIFAR_PAD // CIFAR_SIZE)


def view_params(policy: str | int, num_samples: int, image_size: int, seed: int = 0) -> np.ndarray:
    """(N, V, 5) float32 view parameters for every sample, deterministic for (policy, N, size, seed)."""
    if policy == "clean":
        return np.broadcast_to(CLEAN, (num_samples, 1, 5)).copy()
    if policy == "all":
        return np.broadcast_to(all_crop_flips(image_size), (num_samples, num_views("all", image_size), 5)).copy()
    return random_resized_crops(num_samples, int(policy), seed)


def all_crop_flips(image_size: int) -> np.ndarray:
    """(162, 5) for 32 px: each padded-crop offset (as a fraction, may be negative) with and without flip."""
    pad = pad_for(image_size)
    offsets = np.arange(-pad, pad + 1) / image_size
    rows = [(top, left, 1.0, 1.0, flip) for top in offsets for left in offsets for flip in (0.0, 1.0)]
    return np.asarray(rows, dtype=np.float32)


def random_resized_crops(num_samples: int, k: int, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """(N, K, 5): random-resized-crop boxes as fractions of the image (area and aspect sampled as
    torchvision does, in fractional form so one table fits images of any size), and a flip."""
    rng = np.random.default_rng(seed)
    area = rng.uniform(*scale, size=(num_samples, k))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(num_samples, k)))
    width = np.clip(np.sqrt(area * aspect), 0.05, 1.0)
    height = np.clip(np.sqrt(area / aspect), 0.05, 1.0)
    top = rng.uniform(0, 1, size=(num_samples, k)) * (1 - height)
    left = rng.uniform(0, 1, size=(num_samples, k)) * (1 - width)
    flip = (rng.uniform(0, 1, size=(num_samples, k)) < 0.5).astype(np.float64)
    return np.stack([top, left, height, width, flip], axis=-1).astype(np.float32)


def crop_box(params: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 5) fractions -> (B, 4) integer (top, left, height, width) in pixels of a size x size image."""
    box = torch.round(params[:, :4].double() * size).long()
    box[:, 2:] = box[:, 2:].clamp_min(1)
    return box


def apply_views(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Pixels of one view per image: (B, 3, S, S) uint8 and (B, 5) params -> (B, 3, S, S) uint8.

    A full-size crop (height = width = 1) is a shifted window over the zero-padded image, CIFAR's
    augmentation, done as one gather; a smaller box is resized back to S with bilinear
    interpolation, rounded to uint8. Flips reverse columns. Integer boxes make the result exact.
    """
    b, _, size, _ = images.shape
    box = crop_box(params.to(images.device), size)
    flip = params[:, 4].to(images.device) > 0.5
    out = torch.empty_like(images)
    shifted = (box[:, 2] == size) & (box[:, 3] == size)
    if shifted.any():
        out[shifted] = _shifted_windows(images[shifted], box[shifted])
    for i in torch.nonzero(~shifted).flatten().tolist():
        top, left, h, w = box[i].tolist()
        crop = images[i : i + 1, :, top : top + h, left : left + w].float()
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True).round().clamp(0, 255).to(torch.uint8)[0]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _shifted_windows(images: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) with integer offsets (possibly negative) into the zero-padded image."""
    b, _, size, _ = images.shape
    pad = int(box[:, :2].abs().max().item()) if len(box) else 0
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = box[:, 0:1] + pad + torch.arange(size, device=images.device)  # (B, S)
    cols = box[:, 1:2] + pad + torch.arange(size, device=images.device)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
