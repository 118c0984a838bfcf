"""Grad-CAM (Selvaraju et al., ICCV 2017) maps of students, and the side-by-side grid of the paper's Fig. 7.

For class c and a feature map A (B, K, h, w) of the last stage:
    alpha_k = mean_ij d y_c / d A_k,ij                    (Grad-CAM, eq. 1)
    map     = ReLU( sum_k alpha_k A_k )   (B, h, w)        (Grad-CAM, eq. 2)
upsampled bilinearly to the image and scaled to [0, 1] per image.

Which A:
- convolutional students: the output of the last of the model's direct children to return a spatial map
  (h x w > 1) — the last stage (`layer3` of a CIFAR ResNet, the final ReLU of a WRN, `stages` of PVTv2);
- ViT students (a class token: timm's DeiT, PiT): the tokens entering the last transformer block (its
  `norm1` output) without the class token, laid out on the patch grid. The block's own output is the
  wrong place: only its class token reaches the head, so its patch tokens get no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.errors import ModelError

CELL = 96  # pixels per grid cell: a 32x32 image is drawn 3x (nearest)
GAP = 2  # pixels between cells
HEADER = 14  # pixels of column titles above the first row


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images, (B,) classes -> (B, H, W) maps in [0, 1] on the CPU. The model is put in
    eval mode; its weights get no gradient."""
    model.eval()
    watched, prefix = _watched(model)
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in watched]
    try:
        with torch.enable_grad():
            logits, _ = model(x.detach().requires_grad_(True))  # the input needs grad so A is in the graph
            raw = _last_map(outputs, prefix is not None)
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            grad = torch.autograd.grad(score, raw)[0]
    finally:
        for hook in hooks:
            hook.remove()
    maps, grads = raw.detach(), grad
    if prefix is not None:
        maps, grads = _token_grid(maps, prefix, x.shape[-2:]), _token_grid(grads, prefix, x.shape[-2:])
    # maps, grads: (B, K, h, w)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # eq. 1
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True))  # eq. 2, (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu()


def _watched(model: nn.Module) -> tuple[list[nn.Module], int | None]:
    """The modules whose outputs may hold A, and the number of class tokens (None: a convolutional map)."""
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None and isinstance(getattr(model, "cls_token", None), torch.Tensor):
        prefix = model.cls_token.shape[1]  # PiT: one class token (two when distilled)
    if prefix is not None:
        blocks = [m for m in model.modules() if hasattr(m, "attn") and isinstance(getattr(m, "norm1", None), nn.Module)]
        if not blocks:
            raise ModelError(f"{type(model).__name__} has a class token but no transformer block with norm1 to map")
        return [blocks[-1].norm1], prefix
    return list(model.children()), None


def _last_map(outputs: list, tokens: bool) -> torch.Tensor:
    """The last watched output that is a token sequence (B, prefix + N, D) or a spatial map (B, K, h, w)."""
    if tokens:
        return outputs[-1]
    maps = [o for o in outputs if isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[2] * o.shape[3] > 1]
    if not maps:
        raise ModelError("the model has no stage that returns a spatial feature map (B, K, h, w) to draw Grad-CAM on")
    return maps[-1]


def _token_grid(tokens: torch.Tensor, prefix: int, image_hw: Sequence[int]) -> torch.Tensor:
    """(B, prefix + N, D) -> (B, D, h, w): patch tokens are stored row by row; h / w follows the image's shape."""
    patches = tokens[:, prefix:]
    n = patches.shape[1]
    h = round(math.sqrt(n * image_hw[0] / image_hw[1]))
    w = n // max(h, 1)
    if h * w != n:
        raise ModelError(f"cannot lay {n} tokens out on a patch grid of the image's shape {tuple(image_hw)}")
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


# ---------------------------------------------------------------- the figure


def render_grid(images: np.ndarray, maps: Sequence[np.ndarray], titles: Sequence[str]):
    """Fig. 7's layout as a PIL image: one row per image, the image first, then each student's map over it.

    images (N, H, W, 3) uint8; maps: one (N, H, W) array in [0, 1] per student; titles: one per student.
    Size: width (1 + S) * CELL + S * GAP, height HEADER + N * CELL + (N - 1) * GAP.
    """
    from PIL import Image, ImageDraw

    n, cols = len(images), 1 + len(maps)
    canvas = np.full((HEADER + n * CELL + (n - 1) * GAP, cols * CELL + (cols - 1) * GAP, 3), 255, np.uint8)
    for row, image in enumerate(images):
        cells = [_cell(image)] + [_cell(_overlay(image, m[row])) for m in maps]
        top = HEADER + row * (CELL + GAP)
        for col, cell in enumerate(cells):
            left = col * (CELL + GAP)
            canvas[top : top + CELL, left : left + CELL] = cell
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for col, title in enumerate(["image", *titles]):
        draw.text((col * (CELL + GAP) + 2, 1), _fit(draw, title), fill=(0, 0, 0))
    return picture


def _overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Half image, half jet-coloured map: (H, W, 3) uint8."""
    return (0.5 * image + 0.5 * 255.0 * jet(cam)).round().clip(0, 255).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' as piecewise-linear ramps: (...) in [0, 1] -> (..., 3) RGB in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)


def _cell(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (CELL, CELL, 3), nearest, so pixels stay visible."""
    rows = np.arange(CELL) * image.shape[0] // CELL
    cols = np.arange(CELL) * image.shape[1] // CELL
    return image[rows][:, cols]


def _fit(draw, text: str) -> str:
    """The title, shortened with '..' to fit one cell."""
    while len(text) > 1 and draw.textlength(text, font=None) > CELL - 4:
        text = text[:-3] + ".."
    return text
