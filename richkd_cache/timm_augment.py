"""The ViT students' augmentation, timm's DeiT training pipeline, as the stored-view policy `deit`.

The DeiT-Ti / PiT-Ti recipes follow LG (Li et al., ECCV 2022, lkhl/tiny-transformers; read in its copy
sunshangquan/logit-standardization-KD, tiny-transformers/pycls/datasets/transforms.py): `create_train_transform`
calls timm's `create_transform(input_size=(224, 224), is_training=True, color_jitter=0.4,
auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', re_count=1, interpolation='bicubic')` with
the ImageNet mean/std (IMAGENET_DEFAULT_*, as no mean is passed) on CIFAR's 32 px images (pycls/core/config.py:
MODEL.IMG_SIZE 224, TRAIN.STRONG_AUGMENTATION True). timm 1.0 (timm/data/transforms_factory.py,
transforms_imagenet_train) builds from it:

1. RandomResizedCropAndInterpolation(224, scale (0.08, 1), ratio (3/4, 4/3), bicubic) and
   RandomHorizontalFlip(0.5): views.py's `ResizedCrop` (the same box sampling) and `Flip`.
2. rand_augment_transform (timm/data/auto_augment.py): 2 ops drawn with replacement from
   `_RAND_INCREASING_TRANSFORMS` ('inc1'), each applied with probability 0.5, at magnitude gauss(9, 0.5)
   ('m9', 'mstd0.5') clipped to [0, 10] (`_LEVEL_DENOM`); hparams translate_pct 0.45 (its default),
   img_mean = round(255 * mean) as the fill, bicubic resampling: `TimmRandAugment`. Colour jitter is *not*
   applied: timm drops it when an auto-augment is set (`disable_color_jitter`; an `elif` in older releases).
3. ToTensor, Normalize, RandomErasing(0.25, mode='pixel', max_count=1) (timm/data/random_erasing.py: area
   U(0.02, 1/3), aspect log-uniform in (0.3, 1/0.3), 10 tries): `TimmRandomErasing`.

`deit_policy(size)` does all of it at the view size it is given (LG's: 224). The draws follow timm's
distributions from a torch.Generator (timm draws from Python's `random` and numpy). What differs, and why:

- The crop is resized bilinear with antialiasing (views.py's `ResizedCrop`, shared with `random-resized-crop`)
  where timm resizes bicubic.
- A RandAugment magnitude is stored as a level 0..255 of [0, 10] (steps of 1/25.5 against timm's std of 0.5),
  255 exactly when timm's clip to 10 binds. The arguments come from the stored level through timm's
  level-to-arg formulas, so the integer ones (posterize bits, solarize thresholds) see the stored magnitude.
- Brightness, Color, Contrast and Sharpness use view_ops' integer blends (1/256 factor steps, rounded): 0 or
  1 level above Pillow's truncated float blend, Color -1..+2 (its luma rounds apart from Pillow's); the other
  ops give Pillow's bytes (tests/test_vit_views.py): AutoContrast in Pillow's float64 steps, the geometric
  ops as Pillow's BICUBIC affine (libImaging/Geometry.c: the a = -1 cubic, in float64 on the host).
- PosterizeIncreasing at magnitude 10 keeps 0 bits: black, as the Pillow of LG's time gave; Pillow 13
  refuses 0 bits with a ValueError, so timm itself raises there today.
- Normalisation: the fill colour and the erasing noise follow the *student's* normalisation (the dataset's
  mean/std, recorded with the cache's views; CIFAR-100's for the CIFAR recipes); LG normalises with ImageNet's, so its fill
  is (124, 116, 104) where ours is (129, 124, 112).
- Erasing works on the uint8 view before normalisation: a value of timm's N(0, 1) noise z becomes
  round(255 * (mean + std * z)) clipped to 0..255, the uint8 that normalises nearest to z. Noise outside
  about (-1.9, 1.9) (-1.6 for blue) saturates at 0 or 255: 5-8 % of the erased values per channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from richkd_cache import view_ops
from richkd_cache.views import Fields, Flip, ResizedCrop, Stage, ViewPolicy

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MAGNITUDE_MAX = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10]
LEVELS = 255  # a magnitude m is stored as the level round(m * 25.5)
SEED_BITS = 16  # the erasing noise's generator seed
DEIT_STREAM = 2


def fill_colour(mean: tuple[float, ...]) -> tuple[int, ...]:
    """timm's hparams img_mean (transforms_factory.py): the normalisation mean in 0..255, rounded."""
    return tuple(min(255, round(255 * m)) for m in mean)


CIFAR100_FILL = fill_colour(CIFAR100_MEAN)  # (129, 124, 112)


# ---------------------------------------------------------------- timm's level-to-argument mappings


def _signed(value: float, negate: bool) -> float:
    """timm's _randomly_negate, with the coin stored in the record."""
    return -value if negate else value


def _no_argument(m: float, negate: bool) -> float:
    return 0.0


def _rotate_degrees(m: float, negate: bool) -> float:
    return _signed((m / MAGNITUDE_MAX) * 30.0, negate)


def _posterize_bits(m: float, negate: bool) -> float:
    """_posterize_increasing_level_to_arg: keep 4 down to 0 bits."""
    return 4 - int((m / MAGNITUDE_MAX) * 4)


def _solarize_threshold(m: float, negate: bool) -> float:
    """_solarize_increasing_level_to_arg: 256 down to 0."""
    return 256 - min(256, int((m / MAGNITUDE_MAX) * 256))


def _solarize_add(m: float, negate: bool) -> float:
    return min(128, int((m / MAGNITUDE_MAX) * 110))


def _enhance_factor(m: float, negate: bool) -> float:
    """_enhance_increasing_level_to_arg: 1 +- 0.9 m / 10, at least 0.1."""
    return max(0.1, 1.0 + _signed((m / MAGNITUDE_MAX) * 0.9, negate))


def _shear_factor(m: float, negate: bool) -> float:
    return _signed((m / MAGNITUDE_MAX) * 0.3, negate)


def _translate_fraction(m: float, negate: bool) -> float:
    """_translate_rel_level_to_arg with timm's default translate_pct 0.45."""
    return _signed((m / MAGNITUDE_MAX) * 0.45, negate)


# ---------------------------------------------------------------- the ops: (n, 3, H, W) uint8, n arguments


Fill = tuple[int, ...]
Matrix = tuple[float, float, float, float, float, float]
PixelOp = Callable[[torch.Tensor, list[float], Fill], torch.Tensor]  # images, one argument per image, fill


def _invert(x: torch.Tensor, args: list[float], fill: Fill) -> torch.Tensor:
    return 255 - x


def _posterize(x: torch.Tensor, args: list[float], fill: Fill) -> torch.Tensor:
    """ImageOps.posterize keeping 0..8 bits: value & ~(2 ** (8 - bits) - 1). timm asks for 0 bits at magnitude
    10; the Pillow of LG's time made that black (this mask), Pillow 13 refuses it with a ValueError (so timm's
    PosterizeIncreasing raises there), view_ops' posterize keeps at least one bit."""
    masks = [(0xFF << (8 - int(bits))) & 0xFF for bits in args]
    return x & torch.tensor(masks, dtype=torch.uint8, device=x.device).view(-1, 1, 1, 1)


def _solarize_add_op(x: torch.Tensor, args: list[float], fill: Fill) -> torch.Tensor:
    """timm's solarize_add: values below 128 raised by `add`, saturating at 255."""
    add = torch.tensor(args, dtype=torch.int32, device=x.device).view(-1, 1, 1, 1)
    raised = (x.to(torch.int32) + add).clamp_max(255).to(torch.uint8)
    return torch.where(x < 128, raised, x)


def _view_op(name: str) -> PixelOp:
    """view_ops' op `name` at the given arguments (Pillow's semantics, see its docstring)."""
    return lambda x, args, fill: view_ops.apply_op(x, name, torch.tensor(args, dtype=torch.float64))


def _rotate_matrix(degrees: float, width: int, height: int) -> Matrix:
    """Pillow's Image.rotate(degrees) as its inverse affine matrix, in Pillow's own float steps (the angle
    taken modulo 360, cos and sin rounded to 15 decimals, the centre moved in and out), so the same doubles
    reach the transform. |degrees| <= 30 here, away from Pillow's transpose shortcuts; 0 is the identity."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return (a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy)


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor,
           d: torch.Tensor) -> torch.Tensor:
    """Geometry.c's BICUBIC macro (the a = -1 cubic through v2, v3 at offset d) in its order of operations:
    integer taps give integer p1..p4 (exact), double ones float64 p's; each torch op rounds once, as the C
    expression does without fused multiply-adds."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


def _affine(x: torch.Tensor, matrices: list[Matrix], fill: Fill) -> torch.Tensor:
    """Pillow's Image.transform(AFFINE, matrix, BICUBIC, fillcolor=fill) per image: output pixel (u, v) reads
    the input at (a u' + b v' + c, d u' + e v' + f), u' = u + 0.5; a point outside the image takes `fill`,
    else its 4 x 4 neighbours (clamped to the image) are interpolated along each row, then down, and the
    result truncated to 0..255. Computed on the host in float64, so every machine gives the same bytes."""
    n, c, h, w = x.shape
    m = torch.tensor(matrices, dtype=torch.float64).view(n, 6, 1, 1)
    u = (torch.arange(w, dtype=torch.float64) + 0.5).view(1, w)
    v = (torch.arange(h, dtype=torch.float64) + 0.5).view(h, 1)
    xin = m[:, 0] * u + m[:, 1] * v + m[:, 2]  # (n, H, W) source coordinates, summed in C's order
    yin = m[:, 3] * u + m[:, 4] * v + m[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    x0, y0 = torch.floor(xin - 0.5), torch.floor(yin - 0.5)
    dx, dy = ((xin - 0.5) - x0)[:, None], ((yin - 0.5) - y0)[:, None]  # (n, 1, H, W)
    cols = [(x0.long() + t).clamp(0, w - 1) for t in range(-1, 3)]  # 4 x (n, H, W)
    rows = [(y0.long() + t).clamp(0, h - 1) * w for t in range(-1, 3)]
    flat = x.cpu().flatten(2).to(torch.int32)  # (n, C, H*W)

    def tap(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:  # (n, C, H, W) int32
        return flat.gather(2, (row + col).view(n, 1, -1).expand(n, c, -1)).view(n, c, h, w)

    across = [_cubic(*(tap(row, col) for col in cols), dx) for row in rows]  # each row's value at xin
    value = torch.floor(_cubic(*across, dy).clamp(0, 255)).to(torch.uint8)
    colour = torch.tensor(fill, dtype=torch.uint8).view(1, c, 1, 1)
    return torch.where(inside[:, None], value, colour).to(x.device)


def _geometric(matrix: Callable[[float, int, int], Matrix]) -> PixelOp:
    """An op whose argument gives each image's affine matrix (for its width and height)."""
    return lambda x, args, fill: _affine(x, [matrix(a, x.shape[-1], x.shape[-2]) for a in args], fill)


@dataclass(frozen=True)
class TimmOp:
    """One of timm's RandAugment ops: its name in timm's NAME_TO_OP, its level-to-argument mapping (magnitude
    0..10 and the stored sign coin -> argument), whether that mapping negates at random, and the pixel op."""

    name: str
    argument: Callable[[float, bool], float]
    signed: bool
    apply: PixelOp


# timm's _RAND_INCREASING_TRANSFORMS, in its order (the stored op id); the arguments are LEVEL_TO_ARG's
RAND_INCREASING_OPS = (
    TimmOp("AutoContrast", _no_argument, False, _view_op("auto_contrast")),
    TimmOp("Equalize", _no_argument, False, _view_op("equalize")),
    TimmOp("Invert", _no_argument, False, _invert),
    TimmOp("Rotate", _rotate_degrees, True, _geometric(_rotate_matrix)),
    TimmOp("PosterizeIncreasing", _posterize_bits, False, _posterize),
    TimmOp("SolarizeIncreasing", _solarize_threshold, False, _view_op("solarize")),
    TimmOp("SolarizeAdd", _solarize_add, False, _solarize_add_op),
    TimmOp("ColorIncreasing", _enhance_factor, True, _view_op("color")),
    TimmOp("ContrastIncreasing", _enhance_factor, True, _view_op("contrast")),
    TimmOp("BrightnessIncreasing", _enhance_factor, True, _view_op("brightness")),
    TimmOp("SharpnessIncreasing", _enhance_factor, True, _view_op("sharpness")),
    TimmOp("ShearX", _shear_factor, True, _geometric(lambda f, w, h: (1.0, f, 0.0, 0.0, 1.0, 0.0))),
    TimmOp("ShearY", _shear_factor, True, _geometric(lambda f, w, h: (1.0, 0.0, 0.0, f, 1.0, 0.0))),
    TimmOp("TranslateXRel", _translate_fraction, True, _geometric(lambda p, w, h: (1.0, 0.0, p * w, 0.0, 1.0, 0.0))),
    TimmOp("TranslateYRel", _translate_fraction, True, _geometric(lambda p, w, h: (1.0, 0.0, 0.0, 0.0, 1.0, p * h))),
)


def magnitude_of(level: int) -> float:
    """The magnitude 0..10 a stored level stands for."""
    return level * MAGNITUDE_MAX / LEVELS


def quantise(magnitude: torch.Tensor) -> torch.Tensor:
    """(n,) float64 magnitudes clipped to [0, 10] -> (n,) levels 0..255; 255 only where timm's clip binds, so
    the mass timm puts on magnitude 10 (about 2 % at m9 mstd0.5: posterize to 0 bits, solarize everything) is
    kept exactly."""
    level = torch.round(magnitude * LEVELS / MAGNITUDE_MAX).clamp_max(LEVELS - 1)
    return torch.where(magnitude >= MAGNITUDE_MAX, LEVELS, level).long()


# ---------------------------------------------------------------- stages


@dataclass(frozen=True)
class TimmRandAugment(Stage):
    """timm's RandAugment('rand-m9-mstd0.5-inc1'): `count` slots, each an op drawn with replacement, applied
    with probability `prob` at magnitude gauss(magnitude, std) clipped to [0, 10], its argument negated with
    probability 1/2 where timm's mapping does. Fields per slot k: ra_apply{k}, ra_op{k} (index into `ops`),
    ra_level{k} (the quantised magnitude), ra_neg{k} (0 for ops without a sign)."""

    ops: tuple[TimmOp, ...] = RAND_INCREASING_OPS
    count: int = 2
    magnitude: float = 9.0
    std: float = 0.5
    prob: float = 0.5
    fill: Fill = CIFAR100_FILL  # rotate, shear and translate fill with it

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        op_bits = (len(self.ops) - 1).bit_length()
        return tuple(f for k in range(self.count)
                     for f in ((f"ra_apply{k}", 1), (f"ra_op{k}", op_bits), (f"ra_level{k}", 8), (f"ra_neg{k}", 1)))

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        signed = torch.tensor([op.signed for op in self.ops])
        out = {}
        for k in range(self.count):
            # AugmentOp.__call__ skips the op when random() > prob
            out[f"ra_apply{k}"] = (torch.rand(n, generator=gen, dtype=torch.float64) <= self.prob).long()
            out[f"ra_op{k}"] = torch.randint(0, len(self.ops), (n,), generator=gen)
            noise = torch.randn(n, generator=gen, dtype=torch.float64)
            out[f"ra_level{k}"] = quantise((self.magnitude + self.std * noise).clamp(0, MAGNITUDE_MAX))
            coin = torch.rand(n, generator=gen, dtype=torch.float64) > 0.5  # _randomly_negate's test
            out[f"ra_neg{k}"] = (coin & signed[out[f"ra_op{k}"]]).long()
        return out

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        out = images.clone()
        for k in range(self.count):
            applied = f[f"ra_apply{k}"].cpu().bool()
            ops, levels, negs = (f[f"ra_{name}{k}"].cpu() for name in ("op", "level", "neg"))
            for op_id in ops[applied].unique().tolist():
                rows = torch.nonzero(applied & (ops == op_id)).flatten()
                op = self.ops[op_id]
                args = [op.argument(magnitude_of(int(levels[i])), bool(negs[i])) for i in rows.tolist()]
                picked = rows.to(out.device)
                out[picked] = op.apply(out[picked], args, self.fill)
        return out


@dataclass(frozen=True)
class TimmRandomErasing(Stage):
    """timm's RandomErasing(probability, mode='pixel', max_count=1) on the size x size view: with probability
    `probability`, up to 10 tries of an area U(scale) of the view and a log-uniform aspect h / w in
    (min_aspect, 1 / min_aspect); the first box strictly smaller than the view is placed uniformly and filled
    with per-pixel noise (no box after 10 failed tries). Fields: erase (1 if a box is erased), erase_top,
    erase_left, erase_height, erase_width, erase_seed (the noise generator's seed). The noise is N(0, 1) in
    the student's normalised space, stored as the uint8 that normalises nearest to it (module docstring)."""

    probability: float = 0.25
    scale: tuple[float, float] = (0.02, 1 / 3)
    min_aspect: float = 0.3  # timm's max_aspect defaults to 1 / min_aspect
    mean: tuple[float, ...] = CIFAR100_MEAN
    std: tuple[float, ...] = CIFAR100_STD

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        bits = size.bit_length()
        box = tuple((f"erase_{name}", bits) for name in ("top", "left", "height", "width"))
        return (("erase", 1), *box, ("erase_seed", SEED_BITS))

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        """Vectorised over the 10 tries; the box is in the view's pixels (size x size)."""
        applied = torch.rand(n, generator=gen, dtype=torch.float64) <= self.probability
        area = size * size * (self.scale[0] + (self.scale[1] - self.scale[0])
                              * torch.rand(n, 10, generator=gen, dtype=torch.float64))
        log_low, log_high = math.log(self.min_aspect), math.log(1 / self.min_aspect)
        aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(n, 10, generator=gen, dtype=torch.float64))
        # int(round(.)) rounds half to even, as torch.round does
        h, w = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
        fits = (w < size) & (h < size)
        first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        erase = applied & fits.any(1)
        # random.randint(0, size - h): a uniform integer in 0..size - h
        top = torch.floor(torch.rand(n, generator=gen, dtype=torch.float64) * (size - h + 1)).long()
        left = torch.floor(torch.rand(n, generator=gen, dtype=torch.float64) * (size - w + 1)).long()
        seed = torch.randint(0, 1 << SEED_BITS, (n,), generator=gen)
        keep = erase.long()  # a view without a box stores zeros
        return {"erase": keep, "erase_top": top * keep, "erase_left": left * keep, "erase_height": h * keep,
                "erase_width": w * keep, "erase_seed": seed * keep}

    def noise(self, seed: int, height: int, width: int) -> torch.Tensor:
        """(3, height, width) uint8: N(0, 1) from torch.Generator().manual_seed(seed) (float32, as timm's
        normal_()), mapped to round(255 * (mean + std * z)) and clipped."""
        z = torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed)).double()
        mean = torch.tensor(self.mean, dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float64).view(3, 1, 1)
        return torch.round(255 * (mean + std * z)).clamp(0, 255).to(torch.uint8)

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        out = images.clone()
        for i in torch.nonzero(f["erase"].cpu()).flatten().tolist():
            top, left, h, w = (int(f[f"erase_{name}"][i]) for name in ("top", "left", "height", "width"))
            out[i, :, top : top + h, left : left + w] = self.noise(int(f["erase_seed"][i]), h, w).to(out.device)
        return out


def deit_policy(size: int, norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> ViewPolicy:
    """LG's / timm's DeiT training views of the whole image: random-resized crop and flip, RandAugment
    rand-m9-mstd0.5-inc1, random erasing (0.25, pixel noise); `norm`: the dataset's (mean, std), which the fill
    colour and the erasing noise follow (None: CIFAR-100's)."""
    mean, std = norm or (CIFAR100_MEAN, CIFAR100_STD)
    return ViewPolicy("deit", (ResizedCrop(), Flip(), TimmRandAugment(fill=fill_colour(mean)),
                               TimmRandomErasing(mean=tuple(mean), std=tuple(std))), size,
                      whole_image=True, stream=DEIT_STREAM)
