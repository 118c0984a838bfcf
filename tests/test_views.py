"""Augmentation-consistent caches: stored views replay to the exact pixels the teachers saw."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner


from cache_store import open_cache
from pipelines.cli import app
from cache_store.schema import model_views
from pipelines.cached import clean_view
from pipelines.config import TrainConfig
from pipelines.targets import augment, student_policy
from stagetwo import Batches
from richkd_cache.clip import load_clip, resolve_clip
from richkd_cache.data import create_dataset, normalize
from richkd_cache.models import create_model, load_checkpoint, save_checkpoint
from richkd_cache.views import (
    BOX_BITS,
    Record,
    clean_view_index,
    clip_policy,
    create_policy,
    enumerated_views,
    num_views,
    resized_crop_box,
    stored_views,
    teacher_policy,
)

runner = CliRunner()


def test_cifar_augmentation_has_exactly_162_views() -> None:
    table = enumerated_views(create_policy("crop-flip", 32))
    rows = set(zip(*(v.tolist() for v in table.values())))
    assert len(rows) == 162 and num_views("all", 32) == 162
    records = stored_views("all", create_policy("crop-flip", 32), 0, 0, 162)
    assert records.shape == (162, 2) and len({r.tobytes() for r in records}) == 162  # 9 bits: two bytes a view


def test_all_views_are_the_padded_crops_and_flips() -> None:
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = F.pad(images, (4, 4, 4, 4))
    policy = create_policy("crop-flip", 32)
    table = enumerated_views(policy)
    for k in range(0, 162, 7):
        fields = {name: values[k].repeat(3) for name, values in table.items()}
        top, left = int(table["dy"][k]), int(table["dx"][k])
        expected = padded[:, :, top : top + 32, left : left + 32]
        expected = expected.flip(-1) if table["flip"][k] else expected
        assert torch.equal(policy.replay(images, fields), expected), k
    clean = clean_view_index("all", 32)
    assert torch.equal(policy.replay(images, {n: v[clean].repeat(3) for n, v in table.items()}), images)


def test_records_pack_every_field_into_their_bits() -> None:
    record = Record((("a", 3), ("b", 15), ("c", 1)))
    values = {"a": torch.tensor([0, 7, 5]), "b": torch.tensor([0, (1 << 15) - 1, 1234]), "c": torch.tensor([1, 0, 1])}
    raw = record.pack(values, 3)
    assert raw.shape == (3, 3) and raw.dtype == np.uint8  # 19 bits
    assert all(torch.equal(record.unpack(raw)[n], values[n]) for n in values)
    with pytest.raises(Exception, match="does not fit its 3 bits"):
        record.pack({**values, "a": torch.tensor([8, 0, 0])}, 3)


def test_random_resized_crop_views_cost_8_bytes() -> None:
    """A whole-image crop box (15 bits a coordinate) and a flip: with top-10 fp16 values and int16 indices, a
    sample-view is 48 bytes."""
    policy = create_policy("random-resized-crop", 224)
    assert policy.whole_image and policy.record.nbytes == 8 and BOX_BITS == 15
    assert policy.record.nbytes + 10 * (2 + 2) == 48


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (64, 80), (40, 900), (900, 40)])
def test_boxes_are_torchvisions_random_resized_crop_params(size: tuple[int, int]) -> None:
    """The same draws in the same order as RandomResizedCrop.get_params: with the global generator and our
    generator seeded alike, the boxes are equal, the rejection sampling's centre-crop fallback (extreme
    aspect ratios) included."""
    from torchvision.transforms import RandomResizedCrop

    height, width = size
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for seed in range(25):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        assert resized_crop_box(torch.Generator().manual_seed(seed), height, width, (0.08, 1.0), (3 / 4, 4 / 3)) \
            == tuple(expected), seed


def test_a_resized_crop_view_is_torchvisions_resized_crop_of_the_whole_image() -> None:
    """The replay of a stored record is torchvision's resized_crop (bilinear, antialiased) of the full image at
    the stored box, flipped when the bit says so."""
    from torchvision.transforms.v2 import functional as TF

    whole = torch.randint(0, 256, (3, 120, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    policy = create_policy("random-resized-crop", 32)
    records = stored_views(4, policy, seed=3, index=7, k=4, height=120, width=90)
    assert np.array_equal(records, stored_views(4, policy, 3, 7, 4, 120, 90))  # a sample's views: its seed alone
    fields = policy.record.unpack(records)
    replayed = policy.replay(whole[None].expand(4, -1, -1, -1), fields)
    for k in range(4):
        top, left, height, width = (int(fields[n][k]) for n in ("top", "left", "height", "width"))
        assert top + height <= 120 and left + width <= 90
        expected = TF.resized_crop(whole, top, left, height, width, [32, 32],
                                   interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        expected = TF.horizontal_flip(expected) if fields["flip"][k] else expected
        assert torch.equal(replayed[k], expected), k


def write_tiny_cifar10(root: Path) -> Path:
    """Six training images (CIFAR-10's five batch files) and two test images, in the real pickle layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        count = 2 if name in ("data_batch_1", "test_batch") else 1
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, count).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


@pytest.fixture(scope="module")
def all_views_cache(tmp_path_factory):
    """CIFAR-format data built with the default views: the teacher on all 162, CLIP on the clean view."""
    root = tmp_path_factory.mktemp("views")
    data = write_tiny_cifar10(root / "data")
    teacher = root / "teacher.pth"
    save_checkpoint(str(teacher), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    out = root / "all.zarr"
    result = runner.invoke(app, ["build", "--dataset", "cifar10", "--data-root", str(data), "--teacher-checkpoint",
                                 str(teacher), "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts",
                                 "single", "--device", "cpu", "--workers", "0", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, data, teacher


def test_replayed_views_give_the_cached_targets(all_views_cache) -> None:
    """A stored view's parameters, replayed on the dataset image, give the pixels the teacher's cached row
    came from; CLIP's single row per sample is CLIP on the clean image."""
    out, data, teacher = all_views_cache
    cache = open_cache(str(out))
    assert model_views(cache.manifest) == {"teacher": {"policy": "all", "num_views": 162, "clean_view": 80},
                                           "clip": {"policy": "clean", "num_views": 1, "clean_view": 0}}
    assert cache.load("teacher/logits").shape == (6, 162, 10) and cache.load("clip/richkd-tiny/image_embeds").shape[:2] == (6, 1)
    records = cache.load("views/params")  # (6, 162, 2) uint8
    dataset = create_dataset("cifar10", str(data), "train")
    images = torch.from_numpy(dataset.images.transpose(0, 3, 1, 2).copy())
    model, _ = load_checkpoint(str(teacher))
    v = torch.tensor([0, 17, 80, 161, 100, 55])
    replayed = create_policy("crop-flip", 32).replay_packed(images, records[np.arange(6), v.numpy()])
    with torch.no_grad():
        logits, feats = model(normalize(replayed, dataset.mean, dataset.std))
    for name, fresh in (("teacher/logits", logits), ("teacher/features", feats)):
        cached = torch.from_numpy(cache.load(name).astype(np.float32))[torch.arange(6), v]
        assert torch.allclose(fresh, cached, rtol=2e-3, atol=2e-3), name  # fp16 storage
    clip = load_clip(resolve_clip("richkd-tiny", "random"))
    embeds, _ = clip.encode_images(images)
    assert torch.allclose(embeds, torch.from_numpy(cache.load("clip/richkd-tiny/image_embeds")[:, 0].astype(np.float32)), atol=2e-3)


def test_stage_two_pairs_each_teacher_view_with_the_samples_clip_row(all_views_cache) -> None:
    """z_F of row (i, v) = alpha z_T(i, v) + (1 - alpha) tau e_i W^T (eq. 2-4), written out here."""
    out, _, _ = all_views_cache
    cache = open_cache(str(out))
    cfg = TrainConfig(student="resnet8", out="unused", cache=str(out), alpha=0.7)
    batches = Batches(cfg)
    space = batches.source.state.space
    z_t = torch.from_numpy(cache.load("teacher/logits").astype(np.float64))  # (6, 162, C)
    e = torch.from_numpy(cache.load("clip/richkd-tiny/image_embeds").astype(np.float64))[:, 0]  # (6, D)
    w = torch.from_numpy(cache.text_embeddings("single")).double().mean(0)  # (C, D)
    z_c = cache.clip_records["richkd-tiny"]["tau"] * e @ w.T  # (6, C)
    pairs = torch.tensor([[0, 0], [2, 80], [5, 161], [3, 17]])  # (sample i, view v)
    logits, parts, _ = batches(pairs[:, 0], pairs[:, 1])
    t_feats = torch.from_numpy(cache.load("teacher/features").astype(np.float32))  # (6, 162, Ft)
    c_feats = torch.from_numpy(cache.load("clip/richkd-tiny/features").astype(np.float32))[:, 0]  # (6, Fc)
    for k, (i, v) in enumerate(pairs.tolist()):
        assert torch.allclose(logits[k].double(), 0.7 * z_t[i, v] + 0.3 * z_c[i], atol=1e-4), (i, v)
        assert torch.allclose(parts["teacher"][k], space.teacher_part(t_feats[i, v]), atol=1e-5)
        assert torch.allclose(parts["clip"][k], space.clip_part(c_feats[i]), atol=1e-5)


def test_accuracy_reports_read_the_clean_view(all_views_cache) -> None:
    """With 162 views, view 0 is the crop shifted by (-4, -4); info and analyze use the clean view (80)."""
    out, _, _ = all_views_cache
    cache = open_cache(str(out))
    labels, z_t, embeds = clean_view(cache)
    stored = cache.load("teacher/logits").astype(np.float32)
    assert np.array_equal(z_t.numpy(), stored[:, 80]) and not np.array_equal(z_t.numpy(), stored[:, 0])
    assert np.array_equal(embeds["richkd-tiny"].numpy(), cache.load("clip/richkd-tiny/image_embeds")[:, 0].astype(np.float32))
    clean_top1 = 100.0 * float((stored[:, 80].argmax(1) == labels.numpy()).mean())
    assert cache.manifest["teacher"]["accuracy"] == pytest.approx(clean_top1)
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["prompt_sets"][0]["teacher_top1"] == pytest.approx(clean_top1)
    sizes = summary["bytes_per_sample_view"]
    assert (sizes["teacher"]["rows"], sizes["richkd-tiny"]["rows"]) == (6 * 162, 6)
    assert sizes["teacher"]["bytes_per_row"] == 2 * (10 + 64)  # fp16 logits + resnet8's 64 pooled features


def test_training_draws_cover_every_stored_view(all_views_cache) -> None:
    """Each epoch draws one stored view per sample; over epochs every (sample, view) row is drawn."""
    out, _, _ = all_views_cache
    rows = Batches(TrainConfig(student="resnet8", out="unused", cache=str(out), target="kd",
                               feature_loss=None)).source.rows
    generator = torch.Generator().manual_seed(0)
    seen: set[tuple[int, int]] = set()
    for _ in range(3000):
        draws = rows.draw(torch.arange(6), generator)
        assert sorted(draws.index.tolist()) == list(range(6))  # a full shuffle: every sample once
        seen.update(zip(draws.index.tolist(), draws.view.tolist()))
    assert seen == {(n, v) for n in range(6) for v in range(162)}


def test_a_student_trains_from_a_views_cache(all_views_cache, tmp_path: Path) -> None:
    out, data, _ = all_views_cache
    result = runner.invoke(app, ["train", "--cache", str(out), "--data-root", str(data), "--student", "resnet8",
                                 "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0",
                                 "--quiet", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output


def test_topk_logits_rebuild_and_report_their_cost(tmp_path: Path) -> None:
    from richkd_cache.distill import logits_from_topk, topk_kl, topk_log_probs

    logits = torch.randn(5, 2, 12) * 3
    values, indices = topk_log_probs(logits, 4)
    rebuilt = logits_from_topk(values, indices, 12)
    assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(5, 2), atol=1e-5)
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(rebuilt.gather(-1, indices), full.gather(-1, indices), atol=1e-6)
    others = torch.ones_like(full, dtype=torch.bool).scatter(-1, indices, False)
    rest = (1 - values.exp().sum(-1, keepdim=True)) / 8
    assert torch.allclose(rebuilt[others].exp(), rest.expand(-1, -1, 12)[others], atol=1e-6)
    kl = (full.exp() * (full - rebuilt)).sum(-1)
    assert torch.allclose(topk_kl(logits, 4), kl, atol=1e-6) and (kl >= -1e-6).all()


def test_a_topk_cache_trains_and_reports_its_kl(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pth"
    save_checkpoint(str(teacher), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    out = tmp_path / "topk.zarr"
    result = runner.invoke(app, ["build", "--dataset", "digits", "--teacher-checkpoint", str(teacher),
                                 "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single",
                                 "--teacher-views", "clean", "--topk", "3", "--device", "cpu", "--workers", "0", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cache = open_cache(str(out))
    assert cache.load("teacher/topk_indices").shape == (1442, 1, 3) and cache.layout.teacher_topk == 3
    assert cache.manifest["teacher"]["topk_kl_rows"] == 1442 and cache.manifest["teacher"]["topk_kl_mean"] >= 0
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "top-k" in info.output
    analysis = runner.invoke(app, ["analyze", str(out), "--json"])
    assert analysis.exit_code == 0, analysis.output
    verify = runner.invoke(app, ["verify", str(out), "--recompute", "3", "--device", "cpu"])
    assert verify.exit_code == 0, verify.output
    trained = runner.invoke(app, ["train", "--cache", str(out), "--student", "resnet8", "--epochs", "1",
                                  "--device", "cpu", "--workers", "0", "--quiet", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output


def build_tiny(data: Path, teacher: Path, out: Path, *views: str) -> None:
    result = runner.invoke(app, ["build", "--dataset", "cifar10", "--data-root", str(data), "--teacher-checkpoint",
                                 str(teacher), "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts",
                                 "single", *views, "--device", "cpu", "--workers", "0", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_random_teacher_views_keep_the_clean_row_that_accuracy_is_measured_on(all_views_cache,
                                                                               tmp_path: Path) -> None:
    """K random views hold no clean view: the teacher's logits on the clean image are stored beside them
    (`teacher/clean_logits`), so info, the manifest and analyze report accuracy as for any cache."""
    _, data, teacher = all_views_cache
    out = tmp_path / "random.zarr"
    build_tiny(data, teacher, out, "--teacher-views", "3")
    cache = open_cache(str(out))
    assert cache.layout.teacher_clean and cache.load("teacher/clean_logits").shape == (6, 1, 10)
    dataset = create_dataset("cifar10", str(data), "train")
    model, _ = load_checkpoint(str(teacher))
    with torch.no_grad():
        logits, _ = model(normalize(torch.from_numpy(dataset.images.transpose(0, 3, 1, 2).copy()), dataset.mean,
                                    dataset.std))
    cached = torch.from_numpy(cache.load("teacher/clean_logits")[:, 0].astype(np.float32))
    assert torch.allclose(logits, cached, rtol=2e-3, atol=2e-3)
    labels, z_t, _ = clean_view(cache)
    assert torch.equal(z_t, cached)
    top1 = 100.0 * float((cached.argmax(1) == labels).float().mean())
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["prompt_sets"][0]["teacher_top1"] == pytest.approx(top1)
    assert runner.invoke(app, ["analyze", str(out)]).exit_code == 0
    verify = runner.invoke(app, ["verify", str(out), "--recompute", "3", "--device", "cpu"])
    assert verify.exit_code == 0, verify.output


@pytest.mark.parametrize("teacher, clip, message", [
    ("some", "clean", "--teacher-views takes clean, all or a number"),
    ("all", "4", "--clip-views takes clean or same"),
])
def test_view_policy_errors_are_one_line(all_views_cache, tmp_path: Path, teacher: str, clip: str, message: str) -> None:
    _, data, checkpoint = all_views_cache
    result = runner.invoke(app, ["build", "--dataset", "cifar10", "--data-root", str(data), "--teacher-checkpoint",
                                 str(checkpoint), "--clip", "richkd-tiny", "--clip-pretrained", "random",
                                 "--teacher-views", teacher, "--clip-views", clip, "--device", "cpu", "--out",
                                 str(tmp_path / "x.zarr")])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "x.zarr").exists()


def test_default_teacher_views_follow_the_image_size() -> None:
    assert teacher_policy("auto", 32) == "all" and teacher_policy("auto", 224) == 100  # a fresh view per epoch
    assert clip_policy("same", 4) == 4 and clip_policy("all", "all") == "all" and clip_policy("clean", "all") == "clean"
    assert clean_view_index("all", 32) == 80 and clean_view_index(5, 32) is None


def test_larger_images_without_stored_views_get_random_resized_crops() -> None:
    """mdistiller's ImageNet recipe (RandomResizedCrop + flip), not a zero-padded shift: a constant image
    stays constant (a padded crop would bring in black borders), and the crops zoom in."""
    generator = torch.Generator().manual_seed(0)
    policy = student_policy(None, 64)
    assert policy.name == "random-resized-crop"
    flat_grey = torch.full((32, 3, 64, 64), 200, dtype=torch.uint8)
    out = augment(flat_grey, None, policy, generator)
    assert torch.equal(out, flat_grey)
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(32, 3, 64, 64).contiguous()  # column c is 4c
    out = augment(ramp, None, policy, generator)
    spans = (out[:, 0, 0, -1].int() - out[:, 0, 0, 0].int()).abs()  # a whole-width view spans 252
    assert (spans < 150).float().mean() > 0.3  # scale 0.08-1: many crops are narrower than half the image
