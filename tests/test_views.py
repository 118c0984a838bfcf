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

import zarr

from cache_store import MANIFEST_KEY, open_cache
from pipelines.cli import app
from cache_store.schema import model_views
from pipelines.cached import clean_view
from pipelines.config import TrainConfig
from pipelines.targets import augment
from stagetwo import Batches
from richkd_cache.clip import load_clip, resolve_clip
from richkd_cache.data import create_dataset, normalize
from richkd_cache.models import create_model, load_checkpoint, save_checkpoint
from richkd_cache.views import (
    all_crop_flips,
    apply_views,
    clean_view_index,
    clip_policy,
    num_views,
    random_resized_crops,
    teacher_policy,
    view_params,
)

runner = CliRunner()


def test_cifar_augmentation_has_exactly_162_views() -> None:
    table = all_crop_flips(32)
    assert table.shape == (162, 5) and len({tuple(r) for r in table.tolist()}) == 162
    assert num_views("all", 32) == 162


def test_all_views_are_the_padded_crops_and_flips() -> None:
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = F.pad(images, (4, 4, 4, 4))
    for k, row in enumerate(all_crop_flips(32)[::7]):
        params = torch.from_numpy(np.tile(row, (3, 1)))
        top, left = int(round(row[0] * 32)) + 4, int(round(row[1] * 32)) + 4
        expected = padded[:, :, top : top + 32, left : left + 32]
        expected = expected.flip(-1) if row[4] else expected
        assert torch.equal(apply_views(images, params), expected), k


def test_random_resized_views_are_deterministic_and_in_range() -> None:
    a, b = random_resized_crops(10, 4, seed=3), random_resized_crops(10, 4, seed=3)
    assert np.array_equal(a, b) and a.shape == (10, 4, 5)
    assert (a[..., 0] + a[..., 2] <= 1 + 1e-6).all() and (a[..., 1] + a[..., 3] <= 1 + 1e-6).all()


def test_resized_views_match_torchvisions_crop_resize_and_flip() -> None:
    """The reference: torchvision's resized_crop (bilinear, antialiased) and horizontal_flip on known boxes."""
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    boxes = [(4, 6, 20, 16, 0), (0, 0, 9, 30, 1), (10, 3, 22, 12, 1)]  # pixels: top, left, height, width, flip
    params = torch.tensor([[t / 32, l / 32, h / 32, w / 32, f] for t, l, h, w, f in boxes])
    ours = apply_views(images, params)
    for i, (top, left, height, width, flip) in enumerate(boxes):
        expected = TF.resized_crop(images[i].float(), top, left, height, width, [32, 32],
                                   interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        expected = expected.round().clamp(0, 255).to(torch.uint8)
        expected = TF.horizontal_flip(expected) if flip else expected
        assert torch.equal(ours[i], expected), boxes[i]


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
    params = torch.from_numpy(cache.load("views/params"))
    dataset = create_dataset("cifar10", str(data), "train")
    images = torch.from_numpy(dataset.images.transpose(0, 3, 1, 2).copy())
    model, _ = load_checkpoint(str(teacher))
    v = torch.tensor([0, 17, 80, 161, 100, 55])
    replayed = apply_views(images, params[torch.arange(6), v])
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


def test_view_params_of_the_clean_policy() -> None:
    assert view_params("clean", 3, 32).tolist() == [[[0, 0, 1, 1, 0]]] * 3


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


def as_shared_policy_cache(url: Path) -> None:
    """Rewrite a manifest as caches were written when both models shared one view policy."""
    group = zarr.open_group(str(url), mode="r+", use_consolidated=False)
    manifest = dict(group.attrs[MANIFEST_KEY])
    manifest["layout"] = {k: v for k, v in manifest["layout"].items() if k != "clip_views"}
    manifest["views"] = {k: v for k, v in manifest["views"].items() if k not in ("teacher", "clip")}
    group.attrs[MANIFEST_KEY] = manifest
    zarr.consolidate_metadata(group.store)


@pytest.mark.filterwarnings("ignore::UserWarning")  # zarr: consolidated metadata is outside the v3 spec
def test_a_cache_with_one_shared_view_policy_still_opens_reports_and_trains(all_views_cache, tmp_path: Path) -> None:
    _, data, teacher = all_views_cache
    out = tmp_path / "shared.zarr"
    build_tiny(data, teacher, out, "--teacher-views", "all", "--clip-views", "same")
    as_shared_policy_cache(out)
    cache = open_cache(str(out))
    assert cache.layout.clip_num_views == 162 and model_views(cache.manifest)["clip"]["policy"] == "all"
    _, z_t, embeds = clean_view(cache)
    assert np.array_equal(embeds["richkd-tiny"].numpy(), cache.load("clip/richkd-tiny/image_embeds")[:, 80].astype(np.float32))
    cfg = TrainConfig(student="resnet8", out="unused", cache=str(out), alpha=0.7)
    logits, _, _ = Batches(cfg)([2], [40])
    z_t_all = torch.from_numpy(cache.load("teacher/logits").astype(np.float64))
    e = torch.from_numpy(cache.load("clip/richkd-tiny/image_embeds").astype(np.float64))
    z_c = cache.clip_records["richkd-tiny"]["tau"] * e @ torch.from_numpy(cache.text_embeddings("single")).double().mean(0).T
    assert torch.allclose(logits[0].double(), 0.7 * z_t_all[2, 40] + 0.3 * z_c[2, 40], atol=1e-4)
    assert runner.invoke(app, ["info", str(out)]).exit_code == 0
    trained = runner.invoke(app, ["train", "--cache", str(out), "--data-root", str(data), "--student", "resnet8",
                                  "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0",
                                  "--quiet", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output


def test_random_teacher_views_have_no_clean_view_to_report_on(all_views_cache, tmp_path: Path) -> None:
    _, data, teacher = all_views_cache
    out = tmp_path / "random.zarr"
    build_tiny(data, teacher, out, "--teacher-views", "3")
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["prompt_sets"] == []
    analysis = runner.invoke(app, ["analyze", str(out)])
    assert analysis.exit_code == 2 and "no clean view of the teacher" in analysis.output
    assert len(analysis.output.strip().splitlines()) == 1


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
    assert teacher_policy("auto", 32) == "all" and teacher_policy("auto", 224) == "clean"
    assert clip_policy("same", 4) == 4 and clip_policy("all", "all") == "all" and clip_policy("clean", "all") == "clean"
    assert clean_view_index("all", 32) == 80 and clean_view_index(5, 32) is None


def test_larger_images_without_stored_views_get_random_resized_crops() -> None:
    """mdistiller's ImageNet recipe (RandomResizedCrop + flip), not a zero-padded shift: a constant image
    stays constant (a padded crop would bring in black borders), and the crops zoom in."""
    generator = torch.Generator().manual_seed(0)
    flat_grey = torch.full((32, 3, 64, 64), 200, dtype=torch.uint8)
    out = augment(flat_grey, None, generator)
    assert torch.equal(out, flat_grey)
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(32, 3, 64, 64).contiguous()  # column c is 4c
    out = augment(ramp, None, generator)
    spans = (out[:, 0, 0, -1].int() - out[:, 0, 0, 0].int()).abs()  # a whole-width view spans 252
    assert (spans < 150).float().mean() > 0.3  # scale 0.08-1: many crops are narrower than half the image
