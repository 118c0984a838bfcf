"""The online reference (`train --online`: teacher and CLIP on every batch) and the proof that a cached run
trains on the same targets: on a cache whose views match the student's draws, per-step losses agree."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines.train
from richkd_cache.models import create_model, save_checkpoint
from clirun import invoke

TRAIN_STEP = pipelines.train.train_step
COMMON = ["--student", "resnet8", "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--device", "cpu",
          "--workers", "0", "--quiet"]


def write_cifar10(root: Path, per_batch: int = 8) -> Path:
    """CIFAR-10's pickle layout with `per_batch` images in each of the five training batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("online")
    data = write_cifar10(root / "data")
    teacher = root / "teacher.pth"
    torch.manual_seed(1)
    save_checkpoint(str(teacher), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    caches = {}
    for views in ("all", "clean"):
        out = root / f"{views}.zarr"
        result = invoke("build", "--dataset", "cifar10", "--data-root", data, "--teacher-checkpoint", teacher,
                        "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single",
                        "--teacher-views", views, "--device", "cpu", "--workers", "0", "--quiet", "--out", out)
        assert result.exit_code == 0, result.output
        caches[views] = out
    return {"data": data, "teacher": teacher, **caches}


def step_losses(monkeypatch, *args) -> list[dict[str, float]]:
    """Run `train` and record every step's loss terms."""
    recorded: list[dict[str, float]] = []
    real = TRAIN_STEP

    def recording(*a, **k):
        terms, logits = real(*a, **k)
        recorded.append({name: float(v) for name, v in terms.items()})
        return terms, logits

    monkeypatch.setattr(pipelines.train, "train_step", recording)
    result = invoke("train", *args)
    assert result.exit_code == 0, result.output
    return recorded


METHODS = {
    "KD": ["--target", "kd", "--method", "kd", "--feature-loss", "none"],
    "RichKD (L)": ["--target", "richkd", "--method", "kd", "--feature-loss", "none"],
    "RichKD (L+F) CRD": ["--target", "richkd", "--method", "kd", "--feature-loss", "crd"],
    "DKD": ["--target", "kd", "--method", "dkd", "--feature-loss", "none"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_cached_training_equals_online_training_step_by_step(setup, tmp_path, monkeypatch, method) -> None:
    flags = [*COMMON, *METHODS[method], "--data-root", setup["data"]]
    cached = step_losses(monkeypatch, "--cache", setup["all"], *flags, "--out", tmp_path / "cached")
    online = step_losses(monkeypatch, "--cache", setup["all"], *flags, "--online", "--out", tmp_path / "online")
    assert len(cached) == len(online) == 3  # 40 images, batch 16
    for step_c, step_o in zip(cached, online):
        assert step_c.keys() == step_o.keys() and "logit" in step_c
        for name in step_c:  # the cache stores fp16: agreement to its precision, not bit for bit
            assert step_c[name] == pytest.approx(step_o[name], rel=2e-3, abs=2e-4), (name, step_c, step_o)


def test_a_clean_view_cache_trains_towards_other_targets_than_online(setup, tmp_path, monkeypatch) -> None:
    """The control: with the teacher cached on the clean image only, the student's crops get the clean
    image's targets, which the online teacher (run on the crops) does not give."""
    flags = [*COMMON, *METHODS["KD"], "--data-root", setup["data"]]
    cached = step_losses(monkeypatch, "--cache", setup["clean"], *flags, "--out", tmp_path / "cached")
    online = step_losses(monkeypatch, "--cache", setup["clean"], *flags, "--online", "--out", tmp_path / "online")
    assert cached[0]["ce"] == pytest.approx(online[0]["ce"], rel=1e-6)  # the same student on the same pixels
    assert abs(cached[0]["logit"] - online[0]["logit"]) > 0.01 * online[0]["logit"]  # ... towards other targets


def test_online_refuses_a_teacher_file_other_than_the_cached_one(setup, tmp_path) -> None:
    other = tmp_path / "other.pth"
    save_checkpoint(str(other), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    result = invoke("train", "--cache", setup["all"], *COMMON, "--data-root", setup["data"], "--online",
                    "--teacher-checkpoint", other, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "sha256" in result.output
    assert not (tmp_path / "r").exists()


def test_online_runs_the_chosen_clip_models_like_the_cached_ensemble(setup, tmp_path, monkeypatch) -> None:
    """A second CLIP model added to a copy of the cache (only it runs); --clip-model ensemble online runs
    both models on each batch and trains towards the same ensembled logits and concatenated features."""
    import shutil

    cache = tmp_path / "two.zarr"
    shutil.copytree(setup["all"], cache)
    added = invoke("build", "--dataset", "cifar10", "--data-root", setup["data"], "--teacher-checkpoint",
                   setup["teacher"], "--clip", "richkd-tiny2", "--clip-pretrained", "random", "--prompts", "single",
                   "--teacher-views", "all", "--device", "cpu", "--workers", "0", "--quiet", "--out", cache)
    assert added.exit_code == 0, added.output
    flags = [*COMMON, "--target", "richkd", "--feature-loss", "cosine", "--clip-model", "ensemble",
             "--data-root", setup["data"]]
    cached = step_losses(monkeypatch, "--cache", cache, *flags, "--out", tmp_path / "cached")
    online = step_losses(monkeypatch, "--cache", cache, *flags, "--online", "--out", tmp_path / "online")
    single = step_losses(monkeypatch, "--cache", cache, *flags[:-3], "richkd-tiny", *flags[-2:], "--online",
                         "--out", tmp_path / "single")
    for step_c, step_o in zip(cached, online):
        for name in step_c:
            assert step_c[name] == pytest.approx(step_o[name], rel=2e-3, abs=2e-4), (name, step_c, step_o)
    assert abs(single[0]["logit"] - online[0]["logit"]) > 1e-3 * online[0]["logit"]  # the ensemble is not one model
