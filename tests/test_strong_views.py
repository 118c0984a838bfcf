"""Strong views: drawn once and stored by stage one, replayed to the same bytes in stage two, and trained on
by MLKD (+ RichKD) from a cache; a cache without them is refused for MLKD in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from typer.testing import CliRunner

from cache_store import open_cache
from pipelines.cli import app
from richkd_cache.data import create_dataset, normalize
from richkd_cache.models import create_model, load_checkpoint, save_checkpoint
from richkd_cache.view_ops import OPS, apply_op
from richkd_cache.views import create_policy, stored_views

runner = CliRunner()
K = 2
OP = {name: i for i, (name, _, _) in enumerate(OPS)}
STRONG = create_policy("mlkd-strong", 32)


@pytest.fixture(scope="module")
def strong_cache(tmp_path_factory) -> tuple[Path, Path]:
    """The digits with the clean view, K = 2 strong views per image, an untrained resnet8 teacher, tiny CLIP."""
    root = tmp_path_factory.mktemp("strong")
    teacher = root / "teacher.pth"
    save_checkpoint(str(teacher), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    out = root / "strong.zarr"
    result = runner.invoke(app, ["build", "--dataset", "digits", "--teacher-checkpoint", str(teacher), "--clip",
                                 "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single", "--teacher-views",
                                 "clean", "--strong-views", str(K), "--device", "cpu", "--workers", "0", "--quiet",
                                 "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, teacher


def one_view(op: str = "identity", level: int = 0, cutout: tuple[int, int, int, int] = (1, 1, 0, 0),
             n: int = 1) -> dict[str, torch.Tensor]:
    """n strong views' fields: no crop offset, no flip, `op` at `level` then identity, and a cutout box
    (x0, y0, x1, y1; x1 < x0: none)."""
    row = {"dy": 4, "dx": 4, "flip": 0, "op0": OP[op], "level0": level, "op1": OP["identity"], "level1": 0,
           **dict(zip(("cut_x0", "cut_y0", "cut_x1", "cut_y1"), cutout))}
    return {name: torch.full((n,), value, dtype=torch.long) for name, value in row.items()}


def images(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_a_replayed_strong_view_gives_the_cached_teacher_logits(strong_cache) -> None:
    out, teacher_file = strong_cache
    cache = open_cache(str(out))
    assert cache.layout.strong_views == K and cache.manifest["views"]["strong"]["num_views"] == K
    params, cached = cache.load("views/strong_params"), cache.load("teacher/strong_logits")  # (N, K, 8), (N, K, C)
    assert params.shape == (1442, K, STRONG.record.nbytes) and cached.shape == (1442, K, 10)
    dataset = create_dataset("digits", None, "train")
    rows = [0, 7, 700, 1441]
    x = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in rows])  # (4, 3, 32, 32) uint8
    teacher, _ = load_checkpoint(str(teacher_file), num_classes=10)
    teacher.eval()
    for k in range(K):
        view = torch.from_numpy(params[rows, k])
        pixels = STRONG.replay_packed(x, view)
        assert torch.equal(pixels, STRONG.replay_packed(x, view))  # replay is bit-identical across calls
        assert not torch.equal(pixels, x)
        with torch.no_grad():
            logits, _ = teacher(normalize(pixels, dataset.mean, dataset.std))
        np.testing.assert_allclose(logits.numpy(), cached[rows, k].astype(np.float32), rtol=1e-2, atol=1e-2)


def test_strong_views_are_drawn_from_the_seed_within_their_ranges() -> None:
    def draw(seed: int) -> np.ndarray:
        return np.stack([stored_views(4, STRONG, seed, i, 4) for i in range(50)])  # (50, 4, 8)

    a = draw(3)
    assert np.array_equal(a, draw(3)) and not np.array_equal(a, draw(4))
    fields = STRONG.record.unpack(a.reshape(200, -1))
    assert fields["dy"].max() <= 8 and fields["dx"].max() <= 8  # RandomCrop(32, padding=4): offsets -4..4
    assert {int(v) for v in fields["op0"]} | {int(v) for v in fields["op1"]} <= set(range(len(OPS)))
    side = (fields["cut_x1"] - fields["cut_x0"]).float()
    assert side.max() <= 16 and side.mean() > 3  # the cutout side: up to half the image


def test_identity_without_cutout_is_the_image_and_cutout_fills_its_box() -> None:
    x = images()
    assert torch.equal(STRONG.replay(x, one_view(n=3)), x)
    # columns 12..20 and rows 4..12, ends included as ImageDraw's
    out = STRONG.replay(x, one_view(cutout=(12, 4, 20, 12), n=3))
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[4:13, 12:21] = True
    assert (out[:, :, box] == torch.tensor([125, 123, 114], dtype=torch.uint8).view(1, 3, 1)).all()
    assert torch.equal(out[:, :, ~box], x[:, :, ~box])


def drawn(op: str, n: int) -> torch.Tensor:
    """n magnitudes of `op` as a strong view stores them: a level 0..255 of the op's range (float64)."""
    _, low, high = OPS[OP[op]]
    levels = torch.from_numpy(np.random.default_rng(OP[op]).integers(0, 256, size=n)).double()
    return low + (high - low) * levels / 255


def test_a_stored_level_replays_its_ops_magnitude() -> None:
    """The record's level k of 255 is the magnitude low + (high - low) k / 255 the op is applied with."""
    x = images(2)
    out = STRONG.replay(x, {**one_view(n=2), "op0": torch.full((2,), OP["solarize"]), "level0": torch.tensor([0, 255])})
    assert torch.equal(out, apply_op(x, "solarize", torch.tensor([0.0, 256.0], dtype=torch.float64)))

def pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


# MLKD's augment_list (mdistiller/dataset/cifar100.py of Jin-Ying/Multi-Level-Logit-Distillation), op by op
PILLOW = {
    "auto_contrast": lambda im, v: ImageOps.autocontrast(im),
    "brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "equalize": lambda im, v: ImageOps.equalize(im),
    "identity": lambda im, v: im,
    "posterize": lambda im, v: ImageOps.posterize(im, max(1, int(v))),
    "rotate": lambda im, v: im.rotate(v),
    "sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "shear_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda im, v: ImageOps.solarize(im, v),
    "translate_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}
EXACT = ("auto_contrast", "equalize", "identity", "posterize", "solarize", "translate_x", "translate_y")
BLENDS = ("brightness", "color", "contrast", "sharpness")
FIXED_POINT = ("rotate", "shear_x", "shear_y")


def test_every_op_is_replayed_against_pillow() -> None:
    assert set(PILLOW) == {name for name, _, _ in OPS} == {*EXACT, *BLENDS, *FIXED_POINT}


@pytest.mark.parametrize("op", EXACT)
def test_ops_match_pillow_exactly(op: str) -> None:
    """Point ops on integers, and translations (Pillow's float64 map, truncated as ours is floored): the same
    bytes as Pillow at every drawn magnitude, on full-range noise and on low-contrast images (levels 40..124,
    where auto-contrast's float steps matter)."""
    magnitudes = drawn(op, 12)
    for x in (images(len(magnitudes)), images(len(magnitudes)) // 3 + 40):
        out = apply_op(x, op, magnitudes)
        for i, m in enumerate(magnitudes):
            assert np.array_equal(hwc(out[i]), np.asarray(PILLOW[op](pil(x[i]), float(m)))), (op, float(m))


@pytest.mark.parametrize("op", BLENDS)
def test_blends_are_pillows_but_rounded_where_pillow_truncates(op: str) -> None:
    """ImageEnhance blends towards a degenerate image (black, the luma, its mean grey, SMOOTH) in float32
    and truncates. Ours blends in integers with the factor in 1/256 steps and rounds to the nearest level, so
    the same parameters give the same bytes on every device (float arithmetic truncated at integer boundaries
    depends on how a device rounds: a fused multiply-add rounds once where a multiply and an add round twice).
    Cost: ours is up
    to 1 level above Pillow's (about half the values, 0.5 level on average); `color` also differs where its
    luma (integer 0.299/0.587/0.114 weights in 1/1000) and Pillow's (16-bit fixed point) round apart, which
    moves a pixel by one more level in either direction."""
    magnitudes = drawn(op, 24)
    x = images(len(magnitudes))
    out = apply_op(x, op, magnitudes)
    diff = np.stack([hwc(out[i]).astype(int) - np.asarray(PILLOW[op](pil(x[i]), float(m))).astype(int)
                     for i, m in enumerate(magnitudes)])
    low = -1 if op == "color" else 0
    assert low <= diff.min() and diff.max() <= (2 if op == "color" else 1)
    assert 0.3 < diff.mean() < 0.7  # rounding where Pillow truncates: +0.5 level on average


def test_cutout_is_pillows_rectangle_at_the_drawn_box() -> None:
    """CutoutAbs as MLKD draws it (side v = U(0, 0.5) x 32, centre uniform in (1, 32]): ImageDraw.rectangle from
    (int(max(0, c - v/2))) to min(S, that + v), both ends included, filled with (125, 123, 114); the stored
    corners replay exactly that rectangle."""
    from richkd_cache.views import Cutout

    generator = torch.Generator().manual_seed(5)
    side = 0.5 * torch.rand(24, generator=generator, dtype=torch.float64) * 32
    centre = 32 - 31 * torch.rand(24, 2, generator=generator, dtype=torch.float64)
    boxes = Cutout().draw(torch.Generator().manual_seed(5), 24, 32, 32, 32)
    x = images(24)
    out = Cutout().replay(x, boxes, 32)
    for i in range(24):
        expected = pil(x[i])
        v = float(side[i])
        x0, y0 = int(max(0, float(centre[i, 0]) - v / 2)), int(max(0, float(centre[i, 1]) - v / 2))
        ImageDraw.Draw(expected).rectangle((x0, y0, min(32, x0 + v), min(32, y0 + v)), fill=(125, 123, 114))
        assert np.array_equal(hwc(out[i]), np.asarray(expected)), i


def coordinates(n: int) -> torch.Tensor:
    """(n, 3, 32, 32) uint8: each pixel names its source, row in red (x 8), column in green (x 8), blue 255
    (black: outside the image)."""
    rows = (torch.arange(32) * 8).view(32, 1).expand(32, 32)
    picture = torch.stack([rows, rows.T, torch.full_like(rows, 255)]).to(torch.uint8)
    return picture.expand(n, 3, 32, 32).contiguous()


@pytest.mark.parametrize("op", FIXED_POINT)
def test_rotate_and_shears_take_pillows_source_pixels_up_to_its_fixed_point(op: str) -> None:
    """Pillow maps a rotated or sheared output pixel to its source in 16.16 fixed point (libImaging/Geometry.c,
    affine_fixed: each coefficient rounded to 1/65536, summed along the row), ours with the exact float64 map
    (`_affine`). They disagree only where the true source coordinate lies within about 1e-4 of a pixel edge,
    and then each takes the neighbour of the other's pixel. At the magnitudes stage one draws (uniform
    floats) that is rare: a few pixels of a few images. A magnitude such as 0.2, whose multiples land on pixel
    edges, makes it a whole row or column. Ours is kept: the index maps are host float64, the same on every
    device, and every cache with strong views was built with them."""
    magnitudes = drawn(op, 64)
    x = coordinates(len(magnitudes))
    out = apply_op(x, op, magnitudes)
    differing = 0
    for i, m in enumerate(magnitudes):
        ours = hwc(out[i]).astype(int)
        theirs = np.asarray(PILLOW[op](pil(x[i]), float(m))).astype(int)
        apart = (ours != theirs).any(-1)
        differing += apart.sum()
        inside = (ours[..., 2] == 255) & (theirs[..., 2] == 255)
        assert (np.abs(ours - theirs)[apart & inside][:, :2] <= 8).all()  # a neighbouring source pixel
        edge = np.where(ours[..., 2:] == 255, ours[..., :2], theirs[..., :2]) // 8  # the one pixel inside
        assert np.isin(edge[apart & ~inside], (0, 31)).any(-1).all()  # in and out only across the border
    assert differing <= 0.002 * out[..., 0, :, :].numel()


def test_mlkd_with_richkd_trains_an_epoch_from_strong_views(strong_cache, tmp_path: Path) -> None:
    out, _ = strong_cache
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--recipe", "cifar100-r32x4-r8x4-mlkd-richkd", "--cache", str(out),
                                 "--dataset", "digits", "--student", "resnet8", "--epochs", "1", "--fraction", "0.25",
                                 "--device", "cpu", "--workers", "0", "--quiet", "--out", str(run)])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["target"], config["feature_loss"]) == ("mlkd", "richkd", None)
    assert config["method_params"] == {"ce_weight": 0.1, "weight": 0.9, "temperature": 4.0, "percentile": 50.0}
    import pyarrow.parquet as pq

    metrics = pq.read_table(run / "metrics.parquet").to_pylist()[0]
    assert all(metrics[f"train_logit_{t}"] > 0 for t in ("kd", "cc", "bc")) and np.isfinite(metrics["loss"])


def test_the_cache_reports_and_verifies_its_strong_views(strong_cache) -> None:
    out, _ = strong_cache
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["views"]["strong"] == {"policy": "mlkd-strong", "num_views": K, "seed": 0}
    assert summary["bytes_per_sample_view"]["strong"]["bytes_per_row"] == 20  # 10 fp16 logits
    verify = runner.invoke(app, ["verify", str(out), "--recompute", "3", "--device", "cpu"])
    assert verify.exit_code == 0 and "ok" in verify.output, verify.output


def test_verify_recompute_catches_a_wrong_strong_row(strong_cache, tmp_path: Path) -> None:
    out, _ = strong_cache
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    logits = zarr.open_group(str(copy), mode="r+")["teacher/strong_logits"]
    logits[:] = logits[:] + np.float16(1.0)  # stored through zarr: the checksums still hold, the numbers do not
    verify = runner.invoke(app, ["verify", str(copy), "--recompute", "3", "--device", "cpu"])
    assert verify.exit_code != 0 and "teacher/strong_logits" in verify.output, verify.output


def test_a_cache_without_strong_views_records_no_strong_layout(digits_cache: Path) -> None:
    layout = open_cache(str(digits_cache)).manifest["layout"]
    assert not {"strong_views", "strong_param_dim"} & set(layout) and "clip_views" in layout


def test_mlkd_on_a_cache_without_strong_views_names_the_build_flag(digits_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--cache", str(digits_cache), "--student", "resnet8", "--method", "mlkd",
                                 "--epochs", "1", "--device", "cpu", "--workers", "0", "--quiet", "--out", str(run)])
    assert result.exit_code != 0 and "--strong-views K" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not run.exists()


@pytest.mark.parametrize("pair", ["r32x4-r8x4", "wrn402-wrn401"])
def test_mlkd_recipes_carry_its_own_schedule(pair: str) -> None:
    from pipelines.config import load_recipe

    # Jin-Ying/Multi-Level-Logit-Distillation configs/cifar100/ours/*.yaml, for the RichKD paper's 480 epochs
    for name, target in ((f"cifar100-{pair}-mlkd", "kd"), (f"cifar100-{pair}-mlkd-richkd", "richkd")):
        recipe = load_recipe(name)
        assert (recipe["method"], recipe["target"], recipe["epochs"], recipe["lr"]) == ("mlkd", target, 480, 0.025)
        assert recipe["milestones"] == [150, 180, 210] and recipe["batch_size"] == 64


def test_strong_views_of_another_view_seed_verify(teacher, tmp_path: Path) -> None:
    """`--view-seed` draws the strong views; verify --recompute draws them again from the recorded seed."""
    out = tmp_path / "seeded.zarr"
    result = runner.invoke(app, ["build", "--dataset", "digits", "--split", "val", "--teacher-checkpoint", str(teacher),
                                 "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single",
                                 "--teacher-views", "clean", "--strong-views", "1", "--view-seed", "5", "--device",
                                 "cpu", "--workers", "0", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cache = open_cache(str(out))
    assert not np.array_equal(cache.load("views/strong_params")[:20, 0],
                              np.stack([stored_views(1, STRONG, 0, i, 1)[0] for i in range(20)]))
    verify = runner.invoke(app, ["verify", str(out), "--recompute", "3", "--device", "cpu"])
    assert verify.exit_code == 0 and "ok" in verify.output, verify.output
