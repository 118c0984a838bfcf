"""Caches built with --no-features: no pooled features (teacher/features, each CLIP model's features), the
rest as usual; logit targets, export, info, verify and added CLIP models work; a feature loss is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_store import CacheError, CacheLayout, open_cache, verify_cache
from cache_store.schema import layout_record
from clirun import invoke

TRAIN = ["--student", "resnet8", "--epochs", "1", "--batch-size", "128", "--device", "cpu", "--workers", "0", "--quiet"]


def test_logits_only_cache_stores_no_features_and_the_same_logit_rows(digits_cache: Path,
                                                                      digits_logits_cache: Path) -> None:
    reader, full = open_cache(str(digits_logits_cache)), open_cache(str(digits_cache))
    assert reader.manifest["layout"]["features"] is False and "features" not in full.manifest["layout"]
    assert not (digits_logits_cache / "teacher" / "features").exists()
    assert not (digits_logits_cache / "clip" / "richkd-tiny" / "features").exists()
    assert (digits_cache / "teacher" / "features").exists()
    assert set(full.arrays()) - set(reader.arrays()) == {"teacher/features", "clip/richkd-tiny/features"}
    for name in ("teacher/logits", "clip/richkd-tiny/image_embeds", "labels"):
        np.testing.assert_array_equal(reader.load(name), full.load(name))
    assert verify_cache(str(digits_logits_cache)).problems == []
    # info prices a sample-view without the features: Ft (resnet8: 64) and Fc (richkd-tiny: 64) fp16 values less
    storage = {c: json.loads(invoke("info", c, "--json").output)["storage"] for c in (digits_cache, digits_logits_cache)}
    saved = storage[digits_cache]["bytes_per_sample_view"] - storage[digits_logits_cache]["bytes_per_sample_view"]
    assert saved == 2 * (full.layout.teacher_dim + full.clip_records["richkd-tiny"]["feature_dim"])


def test_logits_only_cache_trains_exports_and_recomputes(digits_cache: Path, digits_logits_cache: Path,
                                                         tmp_path: Path) -> None:
    for target in ("richkd", "kd", "clip"):  # RichKD (L) and the single-source targets, no feature loss
        result = invoke("train", "--cache", digits_logits_cache, *TRAIN, "--target", target, "--feature-loss", "none",
                        "--out", tmp_path / target)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "richkd" / "last.pth").exists()
    exported = {}
    for cache in (digits_cache, digits_logits_cache):
        out = tmp_path / f"{cache.parent.name}.npz"
        assert invoke("export", cache, "--out", out).exit_code == 0
        with np.load(out) as arrays:
            exported[cache] = arrays["soft_labels"]
    np.testing.assert_array_equal(exported[digits_cache], exported[digits_logits_cache])
    result = invoke("verify", digits_logits_cache, "--recompute", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_feature_loss_on_logits_only_cache_is_one_line(digits_logits_cache: Path, tmp_path: Path) -> None:
    for loss in ("cosine", "crd"):
        result = invoke("train", "--cache", digits_logits_cache, *TRAIN, "--feature-loss", loss, "--out", tmp_path / loss)
        assert result.exit_code != 0 and "--no-features" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / loss).exists()
    result = invoke("export", digits_logits_cache, "--out", tmp_path / "f.npz", "--features")
    assert result.exit_code != 0 and "--no-features" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "f.npz").exists()


def test_clip_model_added_to_logits_only_cache_stores_no_features(digits_logits_cache: Path, teacher: Path,
                                                                  tmp_path: Path) -> None:
    cache = tmp_path / "digits.zarr"
    shutil.copytree(digits_logits_cache, cache)
    result = invoke("build", "--dataset", "digits", "--teacher-checkpoint", teacher, "--clip", "richkd-tiny,richkd-tiny2",
                    "--clip-pretrained", "random", "--prompts", "single,multi", "--teacher-views", "clean",
                    "--device", "cpu", "--workers", "0", "--quiet", "--out", cache)  # the cache keeps its choice
    assert result.exit_code == 0, result.output
    reader = open_cache(str(cache))
    assert sorted(reader.clips) == ["richkd-tiny", "richkd-tiny2"] and not reader.layout.stores_features
    assert "clip/richkd-tiny2/image_embeds" in reader.arrays() and "clip/richkd-tiny2/features" not in reader.arrays()
    assert verify_cache(str(cache)).problems == []
    result = invoke("prompts", "add", cache, "--file", "complex", "--clip-model", "ensemble")
    assert result.exit_code == 0, result.output


def test_layout_records_features_only_when_left_out() -> None:
    sizes = dict(num_samples=8, num_views=1, num_classes=3, teacher_dim=4, view_param_dim=1, block_rows=8)
    assert "features" not in layout_record(CacheLayout(**sizes))  # older caches' layouts, read unchanged
    logits_only = CacheLayout(**sizes, features=False)
    assert layout_record(logits_only)["features"] is False and "teacher/features" not in logits_only.arrays()
    with pytest.raises(CacheError, match="features"):
        CacheLayout(**sizes, features="no")


def test_on_a_logits_only_cache_train_defaults_to_no_feature_loss(digits_logits_cache: Path, tmp_path: Path) -> None:
    """The feature loss defaults to cosine where a cache has features; on one without, to none, so a plain
    `train --cache C` works; asking for a feature loss there is still refused (above)."""
    result = invoke("train", "--cache", digits_logits_cache, *TRAIN, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["feature_loss"] is None
