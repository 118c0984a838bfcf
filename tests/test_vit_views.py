"""The `deit` view policy (richkd_cache/timm_augment.py): timm's DeiT augmentation as stored records, replayed
against timm's own ops and compared with timm's draws."""

from __future__ import annotations

import math
import random
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import (
    _RAND_INCREASING_TRANSFORMS,
    AugmentOp,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing

from richkd_cache.timm_augment import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    RAND_INCREASING_OPS,
    TimmRandAugment,
    TimmRandomErasing,
    fill_colour,
    magnitude_of,
    quantise,
)
from richkd_cache.views import Flip, ResizedCrop, create_policy, list_policies

SIZE = 32
OP = {op.name: i for i, op in enumerate(RAND_INCREASING_OPS)}
BLENDS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
EXACT = tuple(name for name in OP if name not in BLENDS)
FILL = fill_colour(CIFAR100_MEAN)
# what transforms_imagenet_train hands rand_augment_transform for LG's call, with our normalisation's mean
HPARAMS = {"translate_const": int(SIZE * 0.45), "img_mean": FILL, "interpolation": Image.BICUBIC}


def images(n: int, seed: int = 1) -> torch.Tensor:
    """(n, 3, 32, 32) uint8 noise, each image in its own range of values so that auto-contrast and equalize
    have something to do."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 100, (n, 1, 1, 1), generator=gen)
    high = low + torch.randint(20, 156, (n, 1, 1, 1), generator=gen)
    return (low + torch.rand(n, 3, SIZE, SIZE, generator=gen) * (high - low)).to(torch.uint8)


def one_op(op: str, levels: list[int], negs: list[int]) -> dict[str, torch.Tensor]:
    """Fields applying `op` in slot 0 at each (level, sign), slot 1 off."""
    n = len(levels)
    zeros = torch.zeros(n, dtype=torch.long)
    return {"ra_apply0": torch.ones(n, dtype=torch.long), "ra_op0": torch.full((n,), OP[op]),
            "ra_level0": torch.tensor(levels), "ra_neg0": torch.tensor(negs),
            "ra_apply1": zeros, "ra_op1": zeros, "ra_level1": zeros, "ra_neg1": zeros}


def timm_op(name: str, image: torch.Tensor, level: int, negate: bool) -> np.ndarray:
    """timm's AugmentOp at the stored magnitude (prob 1, no magnitude noise), its random sign forced to the
    stored coin (_randomly_negate negates when random() > 0.5): (32, 32, 3) uint8."""
    op = AugmentOp(name, prob=1.0, magnitude=magnitude_of(level), hparams=HPARAMS)
    with mock.patch("timm.data.auto_augment.random.random", return_value=0.9 if negate else 0.1):
        try:
            out = op(Image.fromarray(image.permute(1, 2, 0).numpy()))
        except ValueError:  # Pillow 13 refuses to posterize to 0 bits; LG's Pillow (mask ~255) gave black
            assert name == "PosterizeIncreasing" and level == 255
            return np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    return np.asarray(out)


def ours_and_timms(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) int replays and timm's on the same images: levels as the stage draws them (around m9)
    plus the ends and the posterize / solarize steps, both signs."""
    drawn = TimmRandAugment().draw(torch.Generator().manual_seed(OP[name]), n - 6, SIZE, SIZE, SIZE)["ra_level0"]
    levels = [0, 255, 191, 192, 254, 128, *drawn.tolist()]
    negs = [k % 2 for k in range(n)]
    x = images(n, seed=OP[name])
    out = TimmRandAugment().replay(x, one_op(name, levels, negs), SIZE)
    ours = out.permute(0, 2, 3, 1).numpy().astype(int)
    theirs = np.stack([timm_op(name, x[i], levels[i], bool(negs[i])) for i in range(n)]).astype(int)
    return ours, theirs


def test_deit_is_a_registered_whole_image_policy_of_timms_stages() -> None:
    policy = create_policy("deit", 224)
    assert "deit" in list_policies() and policy.name == "deit" and policy.whole_image
    assert [type(s) for s in policy.stages] == [ResizedCrop, Flip, TimmRandAugment, TimmRandomErasing]
    streams = {create_policy(name, 224).stream for name in list_policies() if name != "deit"}
    assert policy.stream not in streams
    # 4 x 15 box bits, flip, 2 x (apply, 4-bit op, 8-bit level, sign), erase + 4 x 8 box bits + 16-bit seed
    assert policy.record.nbytes == math.ceil((60 + 1 + 28 + 49) / 8) == 18


def test_the_op_list_and_its_settings_are_timms_rand_m9_mstd05_inc1() -> None:
    assert [op.name for op in RAND_INCREASING_OPS] == _RAND_INCREASING_TRANSFORMS
    timm = rand_augment_transform("rand-m9-mstd0.5-inc1", dict(HPARAMS))
    stage = TimmRandAugment()
    assert [op.name for op in timm.ops] == [op.name for op in stage.ops] and timm.choice_weights is None
    assert timm.num_layers == stage.count
    assert {(op.prob, op.magnitude, op.magnitude_std) for op in timm.ops} == {(stage.prob, stage.magnitude,
                                                                                 stage.std)}
    assert FILL == (129, 124, 112)  # timm's img_mean rule on CIFAR-100's mean


@pytest.mark.parametrize("name", EXACT)
def test_ops_replay_timms_bytes(name: str) -> None:
    """Point ops on integers, and the geometric ops' bicubic affine (Pillow's double arithmetic, fill colour):
    timm's bytes for the stored magnitude and sign."""
    ours, theirs = ours_and_timms(name, 16)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", BLENDS)
def test_blends_are_timms_up_to_view_ops_rounding(name: str) -> None:
    """view_ops' integer blends (factor in 1/256 steps, rounded) against ImageEnhance's float blend, truncated:
    0 or 1 level above it; Color -1..+2, where its luma rounds apart from Pillow's (tests/test_strong_views.py
    shows the same for MLKD's magnitudes). Every other pixel is moved, so this is not the identity."""
    ours, theirs = ours_and_timms(name, 24)
    diff = ours - theirs
    low, high = (-1, 2) if name == "ColorIncreasing" else (0, 1)
    assert low <= diff.min() and diff.max() <= high
    assert 0.2 < diff.mean() < 0.6


def test_erasing_fills_the_stored_box_with_the_seeded_noise() -> None:
    stage = TimmRandomErasing(probability=1.0)
    f = stage.draw(torch.Generator().manual_seed(0), 40, SIZE, SIZE, SIZE)
    assert f["erase"].sum() >= 38  # a box fits within 10 tries almost always
    x = images(40)
    out = stage.replay(x, f, SIZE)
    mean, std = np.array(CIFAR100_MEAN)[:, None, None], np.array(CIFAR100_STD)[:, None, None]
    for i in range(40):
        top, left, h, w = (int(f[f"erase_{k}"][i]) for k in ("top", "left", "height", "width"))
        box = np.zeros((SIZE, SIZE), dtype=bool)
        box[top : top + h, left : left + w] = True
        assert np.array_equal(out[i][:, ~box].numpy(), x[i][:, ~box].numpy())
        if not f["erase"][i]:
            assert not box.any()
            continue
        z = torch.randn(3, h, w, generator=torch.Generator().manual_seed(int(f["erase_seed"][i]))).numpy()
        pixels = out[i][:, box].numpy().reshape(3, h, w)
        assert np.array_equal(pixels, np.clip(np.rint(255 * (mean + std * z)), 0, 255))
        # the uint8 normalises back to the noise within half a level, where it is not clipped
        back = (pixels / 255 - mean) / std
        inside = (pixels > 0) & (pixels < 255)
        assert np.abs(back - z)[inside].max() <= 0.5 / (255 * std.min()) + 1e-6


def timm_boxes(n: int) -> list[tuple[int, int] | None]:
    """(height, width) of the box timm's RandomErasing(0.25, 'pixel', max_count=1) erases in n 32 x 32 images
    (None: no box), read off a zero image."""
    random.seed(0)
    torch.manual_seed(0)
    erase = RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    out = []
    for _ in range(n):
        mask = erase(torch.zeros(3, SIZE, SIZE))[0] != 0
        out.append((int(mask.any(1).sum()), int(mask.any(0).sum())) if mask.any() else None)
    return out


def test_erasing_draws_follow_timms_distribution() -> None:
    n = 2000
    f = TimmRandomErasing().draw(torch.Generator().manual_seed(1), n, SIZE, SIZE, SIZE)
    ours = [(int(h), int(w)) for e, h, w in zip(f["erase"], f["erase_height"], f["erase_width"], strict=True) if e]
    theirs = [b for b in timm_boxes(n) if b is not None]
    assert abs(len(ours) / n - 0.25) < 0.04 and abs(len(theirs) / n - 0.25) < 0.04
    h, w = np.array(ours).T
    assert (h < SIZE).all() and (w < SIZE).all() and (f["erase_top"] + f["erase_height"] <= SIZE).all()
    assert (f["erase_left"] + f["erase_width"] <= SIZE).all()
    th, tw = np.array(theirs).T
    assert abs((h * w).mean() - (th * tw).mean()) < 25  # about 180 px each, standard error about 7
    for ours_side, timm_side in ((h, th), (w, tw)):
        assert np.abs(np.quantile(ours_side, [0.1, 0.5, 0.9]) - np.quantile(timm_side, [0.1, 0.5, 0.9])).max() <= 2


@pytest.mark.parametrize("size", [32, 224])
def test_records_pack_and_unpack_to_the_same_fields(size: int) -> None:
    policy = create_policy("deit", size)
    f = policy.sample_views(seed=5, index=3, k=64, height=32, width=32)
    back = policy.record.unpack(policy.record.pack(f, 64))
    assert set(back) == set(f) and all(torch.equal(back[k], f[k]) for k in f)


def test_draws_are_deterministic_and_within_their_ranges() -> None:
    policy = create_policy("deit", SIZE)
    a, b = (policy.sample_views(seed=3, index=7, k=200, height=32, width=32) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = policy.sample_views(seed=3, index=8, k=200, height=32, width=32)
    assert not torch.equal(a["ra_level0"], other["ra_level0"])
    signed = torch.tensor([op.signed for op in RAND_INCREASING_OPS])
    for k in range(2):
        ops, levels, negs = a[f"ra_op{k}"], a[f"ra_level{k}"], a[f"ra_neg{k}"]
        assert ops.max() < len(RAND_INCREASING_OPS) and levels.max() <= 255 and (negs <= signed[ops]).all()
    assert (a["erase_seed"] < 1 << 16).all() and (a["erase_seed"][a["erase"] == 0] == 0).all()


def test_levels_keep_timms_clip_to_ten_exact() -> None:
    """Level 255 stands for magnitude 10 and only timm's clipped draws get it; others round to the nearest
    level, within half a step (1/51)."""
    m = torch.tensor([0.0, 0.01, 4.5, 8.99, 9.97, 9.99, 10.0], dtype=torch.float64)
    levels = quantise(m)
    assert levels.tolist() == [0, 0, 115, 229, 254, 254, 255]
    assert magnitude_of(255) == 10.0
    assert max(abs(magnitude_of(int(q)) - float(v)) for q, v in zip(levels[:-2], m[:-2], strict=True)) <= 0.5 / 25.5


def test_op_choice_magnitude_and_sign_follow_timms_distribution() -> None:
    """2000 views, 4000 slots: each op about 1/15 (standard error 0.004), applied half the time, magnitude
    gauss(9, 0.5) clipped at 10 (P(> 10) = 2.3 %), signs half negative."""
    f = TimmRandAugment().draw(torch.Generator().manual_seed(2), 2000, SIZE, SIZE, SIZE)
    ops = torch.cat([f["ra_op0"], f["ra_op1"]])
    applied = torch.cat([f["ra_apply0"], f["ra_apply1"]]).double()
    levels = torch.cat([f["ra_level0"], f["ra_level1"]])
    share = torch.bincount(ops, minlength=15).double() / len(ops)
    assert (share - 1 / 15).abs().max() < 0.02
    assert abs(applied.mean().item() - 0.5) < 0.03
    magnitude = levels.double() * 10 / 255
    assert abs(magnitude.mean().item() - 8.99) < 0.05 and abs(magnitude.std().item() - 0.48) < 0.03
    assert 0.013 < (levels == 255).double().mean().item() < 0.033
    signed = torch.tensor([op.signed for op in RAND_INCREASING_OPS])[ops]
    negs = torch.cat([f["ra_neg0"], f["ra_neg1"]])
    assert abs(negs[signed].double().mean().item() - 0.5) < 0.04


def test_a_deit_view_replays_bit_identically_from_its_packed_record() -> None:
    policy = create_policy("deit", 224)
    x = images(1)
    raw = torch.from_numpy(policy.record.pack(policy.sample_views(seed=0, index=11, k=4, height=32, width=32), 4))
    views = policy.replay_packed(x.expand(4, -1, -1, -1), raw)
    assert views.shape == (4, 3, 224, 224) and views.dtype == torch.uint8
    assert torch.equal(views, policy.replay_packed(x.expand(4, -1, -1, -1), raw))
    assert not torch.equal(views[0], views[1])


def test_a_deit_cache_replays_its_views_for_the_teacher_and_trains(teacher, tmp_path) -> None:
    """`build --teacher-views K --view-policy deit`: the policy stage two rebuilds from the manifest fills with
    the dataset's normalisation, its replay of a stored record gives the teacher's cached logits, and a student
    trains from the cache (its views replayed on the host)."""
    from clirun import invoke

    from cache_store import open_cache
    from pipelines.cached import stored_policy
    from richkd_cache.data import create_dataset, normalize
    from richkd_cache.models import load_checkpoint
    from richkd_cache.timm_augment import fill_colour

    out = tmp_path / "deit.zarr"
    result = invoke("build", "--dataset", "digits", "--teacher-checkpoint", teacher, "--clip", "richkd-tiny",
                    "--clip-pretrained", "random", "--prompts", "single", "--teacher-views", "2", "--view-policy",
                    "deit", "--no-features", "--device", "cpu", "--workers", "0", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    cache = open_cache(str(out))
    dataset = create_dataset("digits", None, "train")
    policy = stored_policy(cache)
    assert policy.name == "deit" and policy.stages[2].fill == fill_colour(dataset.mean)
    assert policy.stages[3].mean == tuple(dataset.mean) and cache.layout.teacher_clean
    rows = np.array([0, 9, 700])
    records = cache.load("views/params")[rows]  # (3, 2, nbytes)
    model, _ = load_checkpoint(str(teacher))
    model.eval()
    images = torch.stack([dataset[int(i)]["image"] for i in rows])
    for v in range(2):
        pixels = policy.replay_packed(images, records[:, v])
        with torch.no_grad():
            logits, _ = model(normalize(pixels, dataset.mean, dataset.std))
        cached = torch.from_numpy(cache.load("teacher/logits")[rows, v].astype(np.float32))
        assert torch.allclose(logits, cached, rtol=2e-3, atol=2e-3), v
    # stage two replays a batch's views with its rows, in the background thread: the pixels the teacher saw
    from pipelines.config import TrainConfig
    from pipelines.progress import Reporter
    from pipelines.targets import setup_targets
    from pipelines.train import gatherer, setup_images

    cfg = TrainConfig(student="resnet8", out="unused", cache=str(out), target="kd", feature_loss=None)
    cpu, pool = torch.device("cpu"), torch.arange(len(dataset))
    source = setup_targets(cfg, cache, dataset.labels, pool, cpu, cpu, Reporter(quiet=True))
    batch = source.rows.draw(pool, torch.Generator().manual_seed(0), epoch=1).batch(0, 5)
    gathered, _ = gatherer(source, dataset, setup_images(dataset, cpu))(batch)
    expected = policy.replay_packed(torch.stack([dataset[int(i)]["image"] for i in batch.index]),
                                    cache.load("views/params")[batch.index.numpy(), 1])
    assert torch.equal(gathered["pixels"], expected) and "views/params" not in gathered
    trained = invoke("train", "--cache", out, "--student", "resnet8", "--epochs", "1", "--fraction", "0.1",
                     "--device", "cpu", "--workers", "0", "--quiet", "--out", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
