"""Pillow's image ops on uint8 batches, exact and device-independent: the RandAugment ops of strong views
(richkd_cache/views.py's `mlkd-strong` policy) and CutoutAbs.

The ops and their magnitude ranges are those of MLKD's mdistiller/dataset/cifar100.py (augment_list); the pixel arithmetic is ours and exact: blends in
1/256 steps on integers, lookup tables from integer histograms, and geometry as nearest-neighbour index
maps computed in float64 on the host. A replay of the same parameters gives the same bytes, on any device.
Against Pillow on the same parameters (tests/test_strong_views.py): the point ops and translations give its
bytes; the ImageEnhance blends round where Pillow truncates (up to one level higher); rotate and the shears
take a neighbouring source pixel where Pillow's 16.16 fixed-point map crosses a pixel edge and ours does not.
"""

from __future__ import annotations

import torch

# (name, low, high): augment_list() of mdistiller/dataset/cifar100.py in MLKD's repository, in its order (the
# op ids); a stored magnitude is a level 0..255 of [low, high]
OPS = (
    ("auto_contrast", 0.0, 1.0),
    ("brightness", 0.05, 0.95),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0),
    ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0),  # bits kept
    ("rotate", -30.0, 30.0),  # degrees, counter-clockwise
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0),  # threshold
    ("translate_x", -0.3, 0.3),  # fraction of the side
    ("translate_y", -0.3, 0.3),
)
CUTOUT_FILL = (125, 123, 114)  # CutoutAbs's colour


def apply_op(images: torch.Tensor, name: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """One op on a batch: (n, 3, S, S) uint8 and (n,) float64 host magnitudes -> (n, 3, S, S) uint8."""
    return _OP_FUNCTIONS[name](images, magnitudes)


# ---------------------------------------------------------------- the ops: (n, 3, S, S) uint8, (n,) float64 host


def _factor(magnitude: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A blend factor in 1/256 steps, (n, 1, 1, 1) int32 on the images' device."""
    return torch.round(magnitude * 256).to(torch.int32).to(like.device).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """ImageEnhance's blend, degenerate + f * (image - degenerate), rounded, in integers."""
    deg, img = degenerate.to(torch.int32), image.to(torch.int32)
    mixed = deg + torch.div((img - deg) * _factor(magnitude, image) + 128, 256, rounding_mode="floor")
    return mixed.clamp(0, 255).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (PIL's "L"), (n, 1, S, S) int32."""
    r, g, b = x.to(torch.int32).unbind(1)
    return torch.div(r * 299 + g * 587 + b * 114 + 500, 1000, rounding_mode="floor")[:, None]


def _brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, m)


def _color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(_grey(x).expand_as(x), x, m)


def _contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend towards the image's mean grey level, rounded to an integer as PIL does."""
    grey = _grey(x).flatten(1)
    mean = torch.div(grey.sum(1) + grey.shape[1] // 2, grey.shape[1], rounding_mode="floor")
    return _blend(mean.view(-1, 1, 1, 1).expand_as(x), x, m)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend towards PIL's SMOOTH filter (3 x 3, centre 5, others 1, over 13); border pixels are kept."""
    v = x.to(torch.int32)
    s = v.shape[-1]
    window = sum(v[..., i : s - 2 + i, j : s - 2 + j] for i in range(3) for j in range(3))
    smooth = v.clone()
    smooth[..., 1:-1, 1:-1] = torch.div(window + 4 * v[..., 1:-1, 1:-1] + 6, 13, rounding_mode="floor")
    return _blend(smooth, x, m)


def _auto_contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast per channel, in its float64 steps: int(v * scale + offset) with scale = 255.0 /
    (hi - lo) and offset = -lo * scale (an exact integer stretch lands one level higher where that sum falls
    just below an integer); unchanged where a channel is flat. Separate float64 ops round alike on every device."""
    v = x.double()
    low, high = v.amin(dim=(2, 3), keepdim=True), v.amax(dim=(2, 3), keepdim=True)
    scale = torch.full_like(high, 255.0) / (high - low).clamp_min(1)  # a true division: 255.0 / t is 255 * (1 / t)
    stretched = torch.trunc(v * scale + -low * scale).clamp(0, 255).to(torch.uint8)
    return torch.where(high > low, stretched, x)


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel: a lookup table from the cumulative histogram, in integers."""
    n, c, s, _ = x.shape
    flat = x.reshape(n * c, s * s).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = 255 - (hist > 0).flip(1).long().argmax(1)  # the last occupied level
    step = torch.div(s * s - hist.gather(1, last[:, None]).squeeze(1), 255, rounding_mode="floor")  # (n*c,)
    before = hist.cumsum(1) - hist  # pixels below each level
    safe = step.clamp_min(1)[:, None]
    lut = torch.div(before + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor").clamp_max(255)
    lut = torch.where(step[:, None] > 0, lut, torch.arange(256, device=x.device).expand_as(lut))
    return lut.gather(1, flat).to(torch.uint8).reshape(n, c, s, s)


def _identity(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Keep the top max(1, int(m)) bits of every value."""
    bits = m.long().clamp(1, 8)
    mask = (0xFF << (8 - bits)) & 0xFF
    return x & mask.to(torch.uint8).to(x.device).view(-1, 1, 1, 1)


def _solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Invert every value at or above the threshold (value < m kept: integer values, so < ceil(m))."""
    threshold = torch.ceil(m).to(torch.int32).to(x.device).view(-1, 1, 1, 1)
    return torch.where(x.to(torch.int32) < threshold, x, 255 - x)


def _rotate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL's rotate(m): counter-clockwise by m degrees about the centre, nearest neighbour, black outside."""
    a = -torch.deg2rad(m)
    cos, sin = torch.cos(a), torch.sin(a)
    half = x.shape[-1] / 2.0
    # input = R (output - centre) + centre
    return _affine(x, cos, sin, half - cos * half - sin * half, -sin, cos, half + sin * half - cos * half)


def _shear_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, m, zero, zero, one, zero)


def _shear_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, zero, m, one, zero)


def _translate_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, m * x.shape[-1], zero, one, zero)


def _translate_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, zero, zero, one, m * x.shape[-1])


def _affine(x: torch.Tensor, a, b, c, d, e, f) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)) with nearest neighbour: output pixel (u, v) takes the
    input pixel under (a u' + b v' + c, d u' + e v' + f) at pixel centres u' = u + 0.5, black outside. The
    index map is computed on the host in float64, so every device gathers the same pixels."""
    n, _, s, _ = x.shape
    centres = torch.arange(s, dtype=torch.float64) + 0.5
    v, u = centres.view(1, s, 1), centres.view(1, 1, s)
    col = torch.floor(a.view(-1, 1, 1) * u + b.view(-1, 1, 1) * v + c.view(-1, 1, 1)).long()  # (n, S, S)
    row = torch.floor(d.view(-1, 1, 1) * u + e.view(-1, 1, 1) * v + f.view(-1, 1, 1)).long()
    inside = ((col >= 0) & (col < s) & (row >= 0) & (row < s)).to(x.device)
    index = (row.clamp(0, s - 1) * s + col.clamp(0, s - 1)).flatten(1).to(x.device)  # (n, S*S)
    picked = x.flatten(2).gather(2, index[:, None].expand(n, x.shape[1], s * s)).view_as(x)
    return torch.where(inside[:, None], picked, torch.zeros_like(picked))


def cutout(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """CutoutAbs's square: (n, 3, S, S) uint8, box (n, 4) integer (x0, y0, x1, y1), both corners included as
    ImageDraw.rectangle includes them, filled with CUTOUT_FILL; x1 < x0 draws nothing."""
    s = x.shape[-1]
    box = box.to(x.device)
    pixels = torch.arange(s, device=x.device)
    cols = (pixels >= box[:, 0:1]) & (pixels <= box[:, 2:3])  # (n, S)
    rows = (pixels >= box[:, 1:2]) & (pixels <= box[:, 3:4])
    mask = rows[:, :, None] & cols[:, None, :]
    fill = torch.tensor(CUTOUT_FILL, dtype=torch.uint8, device=x.device).view(1, 3, 1, 1)
    return torch.where(mask[:, None], fill, x)


_OP_FUNCTIONS = {
    "auto_contrast": _auto_contrast,
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "equalize": _equalize,
    "identity": _identity,
    "posterize": _posterize,
    "rotate": _rotate,
    "sharpness": _sharpness,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "solarize": _solarize,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}
assert set(_OP_FUNCTIONS) == {name for name, _, _ in OPS}
