"""End to end through the real CLI: train a teacher, build a cache, train a student from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from clirun import invoke


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    result = invoke("train", "--dataset", "digits", "--student", "resnet8", "--epochs", "1",
                    "--device", "cpu", "--workers", "0", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    return out / "last.pth"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_ckpt) -> Path:
    out = tmp_path_factory.mktemp("cache") / "digits.zarr"
    result = invoke("build", "--dataset", "digits", "--teacher-checkpoint", teacher_ckpt,
                    "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single,multi",
                    "--teacher-views", "clean", "--device", "cpu", "--workers", "0", "--batch-size", "128", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_build_writes_a_cache_plain_zarr_can_read(cache: Path) -> None:
    group = zarr.open_group(str(cache), mode="r")
    labels = group["labels"][:]
    logits = group["teacher/logits"][:]
    assert labels.shape == (logits.shape[0],) and logits.shape[1:] == (1, 10)
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
    manifest = group.attrs["richkd_cache"]
    assert manifest["status"] == "complete"
    assert set(group["clip/richkd-tiny/text"].array_keys()) == {"single", "multi"}


def test_train_from_cache_writes_checkpoint_and_metrics(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = invoke("train", "--cache", cache, "--student", "resnet8", "--epochs", "1",
                    "--device", "cpu", "--workers", "0", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["epoch"] for m in metrics] == [1]
    assert {"train_ce", "train_logit", "train_feat", "val_top1", "val_top5"} <= set(metrics[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "richkd" and 0.0 <= summary["best_top1"] <= 100.0
    assert (out / "last.pth").exists() and (out / "best.pth").exists()


def test_rebuilding_with_another_teacher_is_refused(cache: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    invoke("train", "--dataset", "digits", "--student", "resnet8", "--epochs", "1", "--seeds", "3",
           "--device", "cpu", "--workers", "0", "--quiet", "--out", other)
    result = invoke("build", "--dataset", "digits", "--teacher-checkpoint", other / "last.pth",
                    "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single",
                    "--teacher-views", "clean", "--device", "cpu", "--workers", "0", "--quiet", "--out", cache)
    assert result.exit_code == 2
    assert "--overwrite" in result.output


def test_unknown_student_is_one_line_listing_valid_names(tmp_path: Path) -> None:
    result = invoke("train", "--dataset", "digits", "--student", "resnet9000", "--epochs", "1",
                    "--device", "cpu", "--quiet", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "resnet8" in result.output
    assert "Traceback" not in result.output


def test_missing_cifar_root_is_one_line(tmp_path: Path) -> None:
    result = invoke("train", "--dataset", "cifar100", "--data-root", tmp_path / "nowhere", "--student", "resnet8",
                    "--device", "cpu", "--quiet", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "cifar-100-python" in result.output and "Traceback" not in result.output


def test_analyze_and_evaluate_commands(cache: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    result = invoke("analyze", cache, "--out", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and (tmp_path / "plots" / "alpha_sweep.png").exists()
    result = invoke("evaluate", teacher_ckpt, "--no-attacks", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output


def test_info_names_every_array_whole_and_prices_a_small_cache_at_its_own_size(digits_cache: Path) -> None:
    """At 80 columns: array names are never cut. A digits (or CIFAR) cache is priced at its own size: no
    ImageNet-1k table, which only an image-folder cache gets (tests/test_imagenet.py)."""
    storage = json.loads(invoke("info", digits_cache, "--json").output)["storage"]
    assert "imagenet_1k" not in storage and "references" not in storage
    own = storage["this_cache"]
    assert own["bytes"] == own["samples"] * own["views"] * storage["bytes_per_sample_view"] and own["samples"] == 1442
    table = invoke("info", digits_cache).output
    assert "clip/richkd-tiny/image_embeds" in table and "…" not in table
    assert "ImageNet" not in table and "TinyViT" not in table
    assert "this cache (1,442 images x 1 view(s))" in table
