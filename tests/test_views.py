"""Augmentation-consistent caches: stored views replay to the exact pixels the teachers saw."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cache_store import open_cache
from pipelines.cli import app
from pipelines.targets import Targets, augment
from richkd_cache.data import create_dataset, normalize
from richkd_cache.models import create_model, load_checkpoint, save_checkpoint
from richkd_cache.views import all_crop_flips, apply_views, num_views, random_resized_crops, view_params

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
    root = tmp_path_factory.mktemp("views")
    data = write_tiny_cifar10(root / "data")
    teacher = root / "teacher.pth"
    save_checkpoint(str(teacher), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    out = root / "all.zarr"
    result = runner.invoke(app, ["build", "--dataset", "cifar10", "--data-root", str(data), "--teacher-checkpoint",
                                 str(teacher), "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts",
                                 "single", "--views", "all", "--device", "cpu", "--workers", "0", "--quiet",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, data, teacher


def test_replayed_views_give_the_cached_targets(all_views_cache) -> None:
    out, data, teacher = all_views_cache
    cache = open_cache(str(out))
    assert cache.layout.num_views == 162 and cache.manifest["views"]["policy"] == "all"
    params = torch.from_numpy(cache.load("views/params"))
    cached = torch.from_numpy(cache.load("teacher/logits").astype(np.float32))  # (N, 162, C)
    dataset = create_dataset("cifar10", str(data), "train")
    images = torch.from_numpy(dataset.images.transpose(0, 3, 1, 2).copy())
    model, _ = load_checkpoint(str(teacher))
    v = torch.tensor([0, 17, 80, 161, 100, 55])
    replayed = apply_views(images, params[torch.arange(6), v])
    with torch.no_grad():
        logits, _ = model(normalize(replayed, dataset.mean, dataset.std))
    assert torch.allclose(logits, cached[torch.arange(6), v], rtol=2e-3, atol=2e-3)  # fp16 storage


def test_training_draws_cover_every_stored_view(all_views_cache) -> None:
    out, _, _ = all_views_cache
    params = torch.from_numpy(open_cache(str(out)).load("views/params"))
    targets = Targets(None, None, params)
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)  # only the rows matter here
    generator = torch.Generator().manual_seed(0)
    seen: set[tuple[int, int]] = set()
    for _ in range(3000):
        index = torch.arange(6)
        _, rows = augment(images, index, targets, generator)
        seen.update((int(r) // 162, int(r) % 162) for r in rows)
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
                                 "--topk", "3", "--device", "cpu", "--workers", "0", "--quiet", "--out", str(out)])
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
