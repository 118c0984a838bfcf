"""Views: the augmented versions of each image that the teachers see in stage one and the student in stage two.

A view is a small record of integers (a crop box in pixels, a flip bit, op ids and magnitude levels, ...)
packed into a few bytes, and a **policy** is a sequence of stages that draws such records and replays them on
pixels. The same replay runs in stage one (the teachers' inputs) and stage two (the student's), so the student
sees the very pixels the cached targets were computed on. Every augmentation in the product is a policy:

- `clean`: the image itself (one view, no fields).
- `crop-flip`: CIFAR's augmentation, zero-pad 4 (scaled with the side), crop back, horizontal flip, enumerated
  (9 x 9 x 2 = 162 views at 32 px) so that training from the cache is distributed exactly like online KD.
- `random-resized-crop`: torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, its rejection sampling
  and centre-crop fallback) of the **whole decoded image**, resized bilinear with antialiasing, then a flip.
  8 bytes per view: with top-10 fp16 values and int16 indices a sample-view costs 48 bytes.
- `mlkd-strong`: MLKD's strong augmentation (pad-crop and flip, RandAugment(2) over its 14 ops, CutoutAbs).

Policies that crop the whole image (`whole_image`) are replayed on the CPU, in DataLoader workers for image
files, from the decoded image; the others are replayed on the device, on the batch of clean images.

Random draws take a `torch.Generator`; stage one gives each sample its own (seeded from the build's view seed,
the policy's stream and the sample index), so a view never depends on batch order, workers or resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from richkd_cache import view_ops
from richkd_cache.errors import ConfigError, DataError

CIFAR_PAD = 4
CIFAR_SIZE = 32
BOX_BITS = 15  # a crop box coordinate of an image up to 32,767 px a side
Fields = dict[str, torch.Tensor]  # field name -> (n,) int64


def parse_policy(text: str, flag: str = "--teacher-views") -> str | int:
    """`clean`, `all`, or a positive number of random views."""
    if text in ("clean", "all"):
        return text
    if text.isascii() and text.isdigit() and int(text) > 0:  # isdigit alone accepts "²", which int() refuses
        return int(text)
    raise ConfigError(f"{flag} takes clean, all or a number of random views, not {text!r}")


AUTO_RANDOM_VIEWS = 100  # the ImageNet recipes' epochs: one fresh view per epoch trained, as TinyViT stores


def teacher_policy(text: str, image_size: int) -> str | int:
    """`auto` is `all` for CIFAR-sized images (what the paper's teacher saw: every crop+flip the student
    draws) and 100 random views otherwise (one per epoch of the ImageNet recipes)."""
    if text == "auto":
        return "all" if image_size == CIFAR_SIZE else AUTO_RANDOM_VIEWS
    return parse_policy(text)


def clip_policy(text: str, teacher: str | int) -> str | int:
    """CLIP's views: `clean` (one row per sample, the paper's setting), or the teacher's own views
    (`same`, or the teacher's policy spelled out), so that CLIP row v is the teacher's view v."""
    if text == "clean":
        return "clean"
    if text == "same" or (text.isascii() and text.isdigit() and int(text) == teacher) or text == teacher:
        return teacher
    raise ConfigError(f"--clip-views takes clean or same (the teacher's views, here {teacher}), not {text!r}")


def pad_for(image_size: int) -> int:
    """CIFAR's 4 pixels of padding at 32 px, scaled with the image."""
    return max(1, image_size * CIFAR_PAD // CIFAR_SIZE)


def num_views(policy: str | int, image_size: int) -> int:
    if policy == "clean":
        return 1
    if policy == "all":
        return (2 * pad_for(image_size) + 1) ** 2 * 2
    return int(policy)


def clean_view_index(policy: str | int, image_size: int) -> int | None:
    """Which stored view is the clean image: 0 for `clean`, the zero-offset unflipped crop for `all`,
    None for random views (none of them is the whole image)."""
    if policy == "clean":
        return 0
    if policy == "all":
        pad = pad_for(image_size)
        return (pad * (2 * pad + 1) + pad) * 2  # offsets (0, 0), no flip, in the table's order
    return None


# ---------------------------------------------------------------- records: integer fields packed into bytes


@dataclass(frozen=True)
class Record:
    """A view's fields (name, bits), packed little-endian into `nbytes` bytes. The last byte keeps its top bit
    zero, so no record is all 0xFF bytes: the cache's fill value, which zarr never writes as a chunk."""

    fields: tuple[tuple[str, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(bits for _, bits in self.fields) // 8 + 1

    def pack(self, values: Fields, count: int) -> np.ndarray:
        """{name: (n,) ints} -> (n, nbytes) uint8."""
        bits = [np.zeros((count, 0), dtype=np.uint8)]
        for name, width in self.fields:
            v = values[name].numpy().astype(np.int64) if torch.is_tensor(values[name]) else np.asarray(values[name])
            if (v < 0).any() or (v >> width).any():
                raise DataError(f"view field {name} = {int(v.max())} does not fit its {width} bits")
            bits.append(((v[:, None] >> np.arange(width)) & 1).astype(np.uint8))
        flat = np.concatenate(bits, axis=1)
        flat = np.pad(flat, ((0, 0), (0, 8 * self.nbytes - flat.shape[1])))
        return np.packbits(flat, axis=1, bitorder="little")

    def unpack(self, raw: torch.Tensor | np.ndarray) -> Fields:
        """(n, nbytes) uint8 -> {name: (n,) int64}, on the rows' device."""
        raw = torch.as_tensor(raw)
        bits = ((raw.long()[:, :, None] >> torch.arange(8, device=raw.device)) & 1).flatten(1)  # (n, 8 * nbytes)
        out, start = {}, 0
        for name, width in self.fields:
            weights = 1 << torch.arange(width, device=raw.device)
            out[name] = (bits[:, start : start + width] * weights).sum(1)
            start += width
        return out

    def manifest(self) -> list[list]:
        return [[name, bits] for name, bits in self.fields]


# ---------------------------------------------------------------- stages


class Stage:
    """One step of a policy: its fields, how a view's fields are drawn, how they are replayed on pixels."""

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        raise NotImplementedError

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        """n views' fields for one image of height x width (the output is size x size)."""
        raise NotImplementedError

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, size, size) uint8 (only a crop stage changes the geometry)."""
        raise NotImplementedError


@dataclass(frozen=True)
class PadCrop(Stage):
    """RandomCrop(S, padding=p): a window at offset (dy - p, dx - p) of the zero-padded image."""

    pad: int

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        bits = (2 * self.pad).bit_length()
        return (("dy", bits), ("dx", bits))

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        # RandomCrop draws the row offset, then the column offset
        return {"dy": torch.randint(0, 2 * self.pad + 1, (n,), generator=gen, device=gen.device),
                "dx": torch.randint(0, 2 * self.pad + 1, (n,), generator=gen, device=gen.device)}

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        """One gather over the padded batch: rows dy .. dy + S, columns dx .. dx + S."""
        b, _, s, _ = images.shape
        padded = F.pad(images, (self.pad,) * 4)  # zeros, like RandomCrop(padding=p)
        steps = torch.arange(s, device=images.device)
        rows = f["dy"].to(images.device)[:, None] + steps  # (B, S)
        cols = f["dx"].to(images.device)[:, None] + steps
        batch = torch.arange(b, device=images.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Flip(Stage):
    """RandomHorizontalFlip(0.5)."""

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        return (("flip", 1),)

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        return {"flip": (torch.rand(n, generator=gen, device=gen.device) < 0.5).long()}

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        if len(images) == 1:  # a loader worker's one view: no full-size select
            return images.flip(-1) if bool(f["flip"][0]) else images
        flip = f["flip"].to(images.device).bool()[:, None, None, None]
        return torch.where(flip, images.flip(-1), images)


@dataclass(frozen=True)
class ResizedCrop(Stage):
    """RandomResizedCrop(S, scale, ratio) of the whole image: torchvision's box sampling, resize bilinear with
    antialiasing (torchvision's tensor path)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        return tuple((name, BOX_BITS) for name in ("top", "left", "height", "width"))

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        if max(height, width) >= 1 << BOX_BITS:
            raise DataError(f"an image of {width} x {height} px is larger than views support ({(1 << BOX_BITS) - 1} "
                            "px a side); shrink it")
        boxes = [resized_crop_box(gen, height, width, self.scale, self.ratio) for _ in range(n)]
        return {name: torch.tensor([b[k] for b in boxes], dtype=torch.long)
                for k, name in enumerate(("top", "left", "height", "width"))}

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        out = [TF.resized_crop(images[i], int(f["top"][i]), int(f["left"][i]), int(f["height"][i]),
                               int(f["width"][i]), [size, size], interpolation=TF.InterpolationMode.BILINEAR,
                               antialias=True) for i in range(len(images))]
        return torch.stack(out) if out else images.new_empty((0, images.shape[1], size, size))


def resized_crop_box(gen: torch.Generator, height: int, width: int, scale: tuple[float, float],
                     ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit generator, the same draws in the same
    order: up to ten tries of an area and a log-uniform aspect ratio, a box that fits placed uniformly, else
    the centre crop at the nearest allowed ratio. Returns (top, left, height, width) in pixels."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class RandOps(Stage):
    """`count` ops drawn with replacement from `ops` ((name, low, high), the op id is the index), each with a
    magnitude level 0..255 of [low, high]; replayed with Pillow's arithmetic (richkd_cache/view_ops.py)."""

    ops: tuple[tuple[str, float, float], ...] = view_ops.OPS
    count: int = 2

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        op_bits = (len(self.ops) - 1).bit_length()
        return tuple(f for k in range(self.count) for f in ((f"op{k}", op_bits), (f"level{k}", 8)))

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        out = {}
        for k in range(self.count):
            out[f"op{k}"] = torch.randint(0, len(self.ops), (n,), generator=gen)
            out[f"level{k}"] = torch.randint(0, 256, (n,), generator=gen)
        return out

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        out = images.clone()
        for k in range(self.count):
            ops, levels = f[f"op{k}"].cpu(), f[f"level{k}"].cpu().double()
            for op in ops.unique().tolist():
                rows = torch.nonzero(ops == op).flatten()
                name, low, high = self.ops[op]
                magnitude = low + (high - low) * levels[rows] / 255
                out[rows.to(out.device)] = view_ops.apply_op(out[rows.to(out.device)], name, magnitude)
        return out


@dataclass(frozen=True)
class Cutout(Stage):
    """MLKD's Cutout(v = U(0, max_side) of the side): CutoutAbs's square at a centre uniform in (1, S], stored
    as its clipped corners (x0, y0, x1, y1), both included as ImageDraw.rectangle includes them."""

    max_side: float = 0.5

    def fields(self, size: int) -> tuple[tuple[str, int], ...]:
        bits = size.bit_length()
        return tuple((name, bits) for name in ("cut_x0", "cut_y0", "cut_x1", "cut_y1"))

    def draw(self, gen: torch.Generator, n: int, height: int, width: int, size: int) -> Fields:
        side = self.max_side * torch.rand(n, generator=gen, dtype=torch.float64) * size
        # CutoutAbs draws the centre with np.random.uniform(w), i.e. low = w, high = 1: a pixel in (1, w]
        centre = size - (size - 1) * torch.rand(n, 2, generator=gen, dtype=torch.float64)
        start = torch.floor(torch.clamp_min(centre - side[:, None] / 2, 0))
        stop = torch.floor(torch.clamp_max(start + side[:, None], size))
        stop = torch.where(side[:, None] > 0, stop, start - 1).clamp_min(0)  # v = 0: no square
        start = torch.where(side[:, None] > 0, start, torch.ones_like(start))
        return {"cut_x0": start[:, 0].long(), "cut_y0": start[:, 1].long(),
                "cut_x1": stop[:, 0].long(), "cut_y1": stop[:, 1].long()}

    def replay(self, images: torch.Tensor, f: Fields, size: int) -> torch.Tensor:
        box = torch.stack([f["cut_x0"], f["cut_y0"], f["cut_x1"], f["cut_y1"]], dim=1)
        return view_ops.cutout(images, box)


# ---------------------------------------------------------------- policies


@dataclass(frozen=True)
class ViewPolicy:
    """A named sequence of stages producing size x size views; `whole_image`: its first stage crops the whole
    decoded image (replayed on the CPU), else it works on the clean image of that size."""

    name: str
    stages: tuple[Stage, ...]
    size: int
    whole_image: bool = False
    stream: int = 0  # keeps the policy's random draws apart from another policy's with the same seed
    record: Record = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "record", Record(tuple(f for s in self.stages for f in s.fields(self.size))))

    def draw(self, gen: torch.Generator, n: int, height: int | None = None, width: int | None = None) -> Fields:
        """n views of one image (height x width: the whole image's, else the clean view's)."""
        out: Fields = {}
        for stage in self.stages:
            out.update(stage.draw(gen, n, height or self.size, width or self.size, self.size))
        return out

    def replay(self, images: torch.Tensor, f: Fields) -> torch.Tensor:
        """(B, 3, H, W) uint8 and the views' fields {name: (B,)} -> (B, 3, size, size) uint8, bit-identical for
        the same fields wherever it runs (whole-image policies: on the CPU)."""
        for stage in self.stages:
            images = stage.replay(images, f, self.size)
        return images

    def replay_packed(self, images: torch.Tensor, raw: torch.Tensor | np.ndarray) -> torch.Tensor:
        """`replay` from packed records (B, nbytes) uint8."""
        return self.replay(images, self.record.unpack(raw))

    def sample_views(self, seed: int, index: int, k: int, height: int | None = None,
                     width: int | None = None) -> Fields:
        """The K stored views of sample `index`: drawn from the sample's own generator."""
        return self.draw(sample_generator(seed, self.stream, index), k, height, width)


def sample_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A generator for one sample: its views depend on (seed, stream, index) alone."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


_STRONG_STREAM = 0x5747
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # the dataset's (mean, std): the student's inputs
# name -> factory(view side, normalisation); only pixel-filling stages (deit's erasing noise and fill) read the latter
_POLICIES: dict[str, Callable[[int, Normalization | None], ViewPolicy]] = {
    "clean": lambda size, norm: ViewPolicy("clean", (), size),
    "crop-flip": lambda size, norm: ViewPolicy("crop-flip", (PadCrop(pad_for(size)), Flip()), size),
    "random-resized-crop": lambda size, norm: ViewPolicy("random-resized-crop", (ResizedCrop(), Flip()), size,
                                                         whole_image=True, stream=1),
    "mlkd-strong": lambda size, norm: ViewPolicy("mlkd-strong", (PadCrop(pad_for(size)), Flip(), RandOps(),
                                                                 Cutout()), size, stream=_STRONG_STREAM),
    "deit": lambda size, norm: _lazy_deit(size, norm),
}


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def create_policy(name: str, size: int, norm: Normalization | None = None) -> ViewPolicy:
    """Policy `name` making size x size views; `norm`: the dataset's (mean, std), which a policy that fills
    pixels (deit) fills for (None: CIFAR-100's)."""
    if name not in _POLICIES:
        raise ConfigError(f"unknown view policy {name!r}; valid: {', '.join(list_policies())}")
    return _POLICIES[name](size, norm)


RANDOM_POLICIES = ("random-resized-crop", "deit")  # what `--view-policy` may name for K random views


def check_random_policy(name: str) -> None:
    if name not in RANDOM_POLICIES:
        raise ConfigError(f"--view-policy takes {' or '.join(RANDOM_POLICIES)}, not {name!r}")


def policy_of(views: str | int, size: int, augment: str = "random-resized-crop",
              norm: Normalization | None = None) -> ViewPolicy:
    """The policy of a `--teacher-views` value: clean, all (crop-flip, enumerated), K (draws of `augment`)."""
    if views == "clean":
        return create_policy("clean", size)
    if views == "all":
        return create_policy("crop-flip", size)
    return create_policy(augment, size, norm)


def enumerated_views(policy: ViewPolicy) -> Fields:
    """Every view of the `crop-flip` policy, (V,) per field: each offset (row, then column) without and with
    the flip; view `clean_view_index("all")` is the image itself."""
    (crop, _) = policy.stages
    offsets = torch.arange(2 * crop.pad + 1)
    dy, dx, flip = torch.meshgrid(offsets, offsets, torch.arange(2), indexing="ij")
    return {"dy": dy.flatten(), "dx": dx.flatten(), "flip": flip.flatten()}


def stored_views(views: str | int, policy: ViewPolicy, seed: int, index: int, k: int,
                 height: int | None = None, width: int | None = None) -> np.ndarray:
    """Sample `index`'s stored view records (k, nbytes) uint8: the clean view, the enumerated crop-flips, or
    K draws from the sample's generator (of its whole image's size for whole-image policies)."""
    if views == "clean":
        return np.zeros((1, policy.record.nbytes), dtype=np.uint8)
    if views == "all":
        table = enumerated_views(policy)
        return policy.record.pack(table, len(table["flip"]))
    return policy.record.pack(policy.sample_views(seed, index, k, height, width), k)


def _lazy_deit(size: int, norm: Normalization | None) -> ViewPolicy:
    """The `deit` policy (richkd_cache/timm_augment.py), imported when asked for: that module imports this one."""
    from richkd_cache.timm_augment import deit_policy

    return deit_policy(size, norm)
