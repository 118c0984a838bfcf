"""Bad input gets one line and exit code 2 before anything is written; settings are range-checked alike
from flags and from code; a build refuses what cannot fit and bounds each forward by --batch-size."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from cache_store.schema import ClipLayout
from pipelines import build
from pipelines.config import BuildConfig, TrainConfig
from pipelines.studies import corruption_accuracy
from richkd_cache.data import create_dataset
from richkd_cache.errors import ConfigError, DataError
from richkd_cache.models import create_model
from richkd_cache.views import create_policy
from clirun import invoke

TRAIN = ["train", "--dataset", "digits", "--student", "resnet8", "--epochs", "1", "--device", "cpu",
         "--workers", "0", "--quiet"]
BUILD = ["build", "--dataset", "digits", "--split", "val", "--clip", "richkd-tiny", "--clip-pretrained", "random",
         "--prompts", "single", "--teacher-views", "clean", "--device", "cpu", "--workers", "0", "--quiet"]


def refused(result, *words: str) -> None:
    """Exit 2 with one line naming the problem, never a traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--cache-device", "tpu"], ["--cache-device", "'tpu'"]),
    (["--lr", "-1"], ["--lr", "(0, inf)", "-1"]),
    (["--milestones", "a,b"], ["--milestones", "'a,b'"]),
    (["--seeds", "a"], ["--seeds", "'a'"]),
    (["--seeds", "1,1"], ["--seeds", "distinct"]),
    (["--alpha", "5"], ["alpha", "eq. 4", "[0, 1]"]),
    (["--lam", "7"], ["--lam", "eq. 7", "[0, 1]"]),
    (["--temperature", "-2"], ["--temperature", "(0, inf)"]),
    (["--temperature", "0"], ["--temperature", "(0, inf)"]),
    (["--beta", "-1"], ["--beta", "[0, inf)"]),
    (["--fraction", "0"], ["--fraction", "(0, 1]"]),
    (["--imbalance", "1.5"], ["--imbalance", "(0, 1]"]),
    (["--batch-size", "0"], ["--batch-size", "[1, inf)"]),
    (["--epochs", "0"], ["--epochs", "[1, inf)"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--clip-tau", "0"], ["--clip-tau"]),
    (["--milestones", "0,10"], ["--milestones", "[1, inf)"]),
    (["--seeds", "-1"], ["--seed", "[0, 4294967295]"]),
    (["--seeds", "0,12345678901234567890"], ["--seed", "[0, 4294967295]", "12345678901234567890"]),  # before seed 0
])
def test_bad_training_flags_are_one_line_and_write_nothing(tmp_path: Path, flags: list[str], words: list[str]) -> None:
    refused(invoke(*TRAIN, *flags, "--out", tmp_path / "run"), *words)
    assert not (tmp_path / "run").exists()


def test_settings_from_code_or_recipes_are_checked_like_flags() -> None:
    with pytest.raises(ConfigError, match="--alpha .* must be a number in \\[0, 1\\], got '0.7'"):
        TrainConfig(student="resnet8", out="x", alpha="0.7")  # a quoted number in a TOML recipe
    with pytest.raises(ConfigError, match="--epochs must be an integer"):
        TrainConfig(student="resnet8", out="x", epochs=2.5)
    with pytest.raises(ConfigError, match="--teacher-views"):
        BuildConfig("digits", None, "train", None, "t.pth", "richkd-tiny", None, None, ("single",), "o",
                    teacher_views="-3")


def test_info_and_analyze_share_the_alpha_check(tmp_path: Path) -> None:
    for command in ("info", "analyze"):
        refused(invoke(command, tmp_path / "nowhere.zarr", "--alpha", "1.5"), "--alpha", "[0, 1]", "1.5")


def test_evaluate_epsilons_must_be_numbers(tmp_path: Path) -> None:
    refused(invoke("evaluate", tmp_path / "last.pth", "--epsilons", "a,b"), "--epsilons", "'a,b'")


@pytest.mark.parametrize("flags, words", [
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--teacher-views", "99999999999"], ["the cache needs", "TiB", "store fewer views"]),  # before any view is drawn
    (["--teacher-views", "\u00b2"], ["--teacher-views", "clean, all or a number"]),
    (["--clip-views", "\u00b2"], ["--clip-views", "clean or same"]),
    (["--prompts", ""], ["--prompts", "at least one"]),
    (["--prompts", "single,single"], ["--prompts", "single", "more than once"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--topk", "11"], ["--topk", "between 1 and 10"]),
])
def test_bad_build_flags_are_one_line_and_write_nothing(tmp_path: Path, teacher: Path, flags: list[str],
                                                        words: list[str]) -> None:
    refused(invoke(*BUILD, *flags, "--teacher-checkpoint", teacher, "--out", tmp_path / "c.zarr"), *words)
    assert not (tmp_path / "c.zarr").exists()


def test_build_refuses_arrays_that_do_not_fit_on_the_disk(tmp_path: Path, teacher: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(build.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**4, 10**4))
    out = tmp_path / "sub" / "c.zarr"
    result = invoke(*BUILD, "--teacher-checkpoint", teacher, "--out", out)
    refused(result, "the cache needs", "9.8 KiB free")
    # at least the teacher's fp16 logits (10) and features (64) and the view (5 float32) of 355 samples
    assert float(result.output.split("needs ")[1].split(" KiB")[0]) * 1024 > 355 * (2 * (10 + 64) + 4 * 5)
    assert not (tmp_path / "sub").exists()


def test_views_all_is_refused_where_it_is_not_cifars_162(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "data" / "train" / cls / "0.png")
    result = invoke("build", "--dataset", "imagefolder", "--data-root", tmp_path / "data", "--teacher-views", "all",
                    "--teacher-checkpoint", tmp_path / "no-teacher-needed.pth", "--out", tmp_path / "c.zarr")
    refused(result, "--teacher-views all", "162", "224 px", "6498 views")
    assert not (tmp_path / "c.zarr").exists()


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, teacher: Path) -> Path:
    """The train split (1442 digits) with --topk equal to the class count, as the format allows (1..C)."""
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    result = invoke(*BUILD, "--split", "train", "--teacher-checkpoint", teacher, "--topk", "10", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_topk_may_equal_the_class_count(topk_cache: Path) -> None:
    assert zarr.open_group(str(topk_cache), mode="r")["teacher/topk_indices"].shape == (1442, 1, 10)


def test_teacher_target_needs_no_prompt_set(topk_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "no-prompts.zarr"  # as older versions built with --prompts ""
    shutil.copytree(topk_cache, cache)
    group = zarr.open_group(str(cache), mode="r+", use_consolidated=False)
    del group["clip/richkd-tiny/text"]
    zarr.consolidate_metadata(str(cache))
    train = ["train", "--cache", cache, "--student", "resnet8", "--epochs", "1", "--device", "cpu", "--workers", "0",
             "--quiet"]
    result = invoke(*train, "--target", "kd", "--out", tmp_path / "kd")
    assert result.exit_code == 0, result.output
    refused(invoke(*train, "--target", "richkd", "--out", tmp_path / "richkd"), "target richkd", "no prompt set")
    assert not (tmp_path / "richkd").exists()


class _Recorder(torch.nn.Module):
    """Stands in for both teachers: outputs that depend on each view's pixels, and the batch sizes seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(len(x))
        x = x.float()
        return x.mean((2, 3)), x[:, :, :2, :2].flatten(1)  # (B, 3), (B, 12)

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(images)


def test_forward_never_runs_more_than_batch_size_views_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    data = create_dataset("digits", None, "val")
    views = build.BuildViews(7, create_policy("mlkd-strong", 32), clip_views=7)  # 7 views per sample, on the device
    batch = {k: torch.stack([torch.as_tensor(data[i][k]) for i in range(3)]) for k in ("image", "label", "index")}
    outputs = {}
    for batch_size in (10**6, 4):
        model = _Recorder()
        teacher = build.Teacher(model=model, arch="recorder", manifest={})
        clip = ClipLayout("recorder", 3, 12, "clip/recorder", "clip/recorder/written")
        outputs[batch_size] = build.make_forward(teacher, [(clip, model)], data, torch.device("cpu"), views,
                                                 batch_size=batch_size)(batch)
        monkeypatch.setattr(build, "TEACHER_PIXELS_PER_CALL", 0)  # images as large as a CIFAR teacher's budget
        seen = model.seen
    # each view once through each model, 4 at a time, and the teacher once on each clean image (the clean row
    # random views store beside them)
    assert max(seen) <= 4 and sum(seen) == 2 * 3 * 7 + 3
    assert outputs[4]["teacher/logits"].shape == (3, 7, 3) and outputs[4]["clip/recorder/features"].shape == (3, 7, 12)
    for name, value in outputs[10**6].items():
        np.testing.assert_array_equal(outputs[4][name], value, err_msg=name)


def _cifar_c(folder: Path, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> Path:
    folder.mkdir()
    np.save(folder / "labels.npy", np.zeros(10, np.int64) if labels is None else labels)
    np.save(folder / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8) if images is None else images)
    return folder


@pytest.mark.parametrize("damage, words", [
    (lambda f: (f / "fog.npy").write_bytes(b"not an array"), ["fog.npy", "not a readable .npy"]),
    (lambda f: (f / "fog.npy").write_bytes((f / "fog.npy").read_bytes()[:200]), ["fog.npy", "not a readable .npy"]),
    (lambda f: np.save(f / "fog.npy", np.zeros((10, 32, 32, 3), np.float32)), ["fog.npy", "float32", "uint8"]),
    (lambda f: np.save(f / "fog.npy", np.zeros((10, 3072), np.uint8)), ["fog.npy", "(10, 3072)"]),
    (lambda f: np.save(f / "labels.npy", np.array([0.5] * 10)), ["labels.npy", "integer labels"]),
    (lambda f: np.save(f / "labels.npy", np.full(10, 10)), ["labels.npy", "outside 0..9"]),
    (lambda f: np.save(f / "labels.npy", np.array([None] * 10), allow_pickle=True), ["labels.npy", "not a readable .npy"]),
])
def test_malformed_corruption_files_are_one_line(tmp_path: Path, damage, words: list[str]) -> None:
    folder = _cifar_c(tmp_path / "c")
    damage(folder)
    data = create_dataset("digits", None, "val")
    with pytest.raises(DataError) as err:
        corruption_accuracy(create_model("resnet8", 10), str(folder), data, torch.device("cpu"))
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_malformed_corruption_file_through_evaluate(tmp_path: Path, teacher: Path) -> None:
    folder = _cifar_c(tmp_path / "c")
    (folder / "fog.npy").write_bytes(b"\x93NUMPY garbage")
    result = invoke("evaluate", teacher, "--dataset", "digits", "--no-attacks", "--device", "cpu",
                    "--corruptions", folder)
    refused(result, "fog.npy")


@pytest.mark.parametrize("flags, words", [
    (["--target", "ce", "--alpha", "0.3"], ["--alpha", "target richkd", "target ce"]),
    (["--target", "ce", "--temperature", "4", "--beta", "2"], ["--temperature", "--beta", "would not use them"]),
    (["--target", "ce", "--method", "dkd"], ["--method", "a target that distills"]),
    (["--target", "ce", "--method-param", "beta=6"], ["--method-param", "a target that distills"]),
    (["--target", "ce", "--feature-loss", "mse"], ["--feature-loss", "target ce"]),
    (["--target", "ce", "--prompts", "multi"], ["--prompts", "CLIP's logits"]),
    (["--target", "kd", "--alpha", "0.3"], ["--alpha", "target kd, feature loss cosine"]),
    (["--target", "kd", "--clip-tau", "50"], ["--clip-tau", "CLIP's logits"]),
    (["--target", "kd", "--alpha", "0"], ["--alpha", "target richkd"]),  # 0 is a value, not "off"
    (["--target", "clip", "--lam", "0.5"], ["--lam", "eq. 7"]),
    (["--feature-loss", "none", "--gamma", "2"], ["--gamma", "a feature loss", "feature loss none"]),
    (["--teacher-checkpoint", "teacher.pth"], ["--teacher-checkpoint", "--online"]),
])
def test_a_setting_the_run_would_not_use_is_refused(digits_cache: Path, tmp_path: Path, flags: list[str],
                                                    words: list[str]) -> None:
    refused(invoke(*TRAIN, "--cache", digits_cache, *flags, "--out", tmp_path / "run"), *words)
    assert not (tmp_path / "run").exists()


def test_recipe_settings_follow_the_target_the_flags_choose_and_defaults_never_count(monkeypatch) -> None:
    from pipelines import cli
    from pipelines.cli import train_settings

    recipe = "cifar100-r32x4-r8x4-dkd"  # target richkd, DKD's weights, alpha 0.7
    settings = train_settings(recipe, {"target": "ce", "out": "-"}, "train")
    assert settings["target"] == "ce" and not {"alpha", "method", "method_params"} & set(settings)
    with pytest.raises(ConfigError, match="--alpha .*target ce"):
        train_settings(recipe, {"target": "ce", "alpha": 0.5, "out": "-"}, "train")
    plain = {"student": "resnet8", "target": "ce", "out": "-"}
    assert train_settings(None, dict(plain), "train") == plain
    off = {**plain, "clip_renormalize": False, "method": "none", "feature_loss": "none"}
    assert train_settings(None, off, "train")["method"] is None  # switching an unused thing off is consistent
    monkeypatch.setattr(cli, "load_recipe", lambda name: {"student": "resnet8", "target": "kd", "alpha": 0.5, "out": "-"})
    with pytest.raises(ConfigError, match="the recipe setting alpha .*target kd"):  # a recipe at odds with itself
        train_settings("odd", {}, "train")


def test_a_swept_setting_the_runs_would_not_use_is_refused(digits_cache: Path, tmp_path: Path) -> None:
    result = invoke("sweep", "--cache", digits_cache, "--student", "resnet8", "--lam", "0.5,0.7", "--feature-loss",
                    "none", "--epochs", "1", "--device", "cpu", "--workers", "0", "--out", tmp_path / "sweep")
    refused(result, "--lam", "feature loss none")
    assert not (tmp_path / "sweep").exists()


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that says it is width x height 1-bit pixels, with almost no pixel data (PIL checks the size
    when it opens a file, before decoding anything)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_in_an_image_folder_is_one_line_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (12, 12), (10, 20, 30)).save(root / split / cls / "a.png")
    png_header_only(root / "train/dog/huge.png", 20_000, 20_000)
    result = invoke("train", "--dataset", "imagefolder", "--data-root", root, "--image-size", "8", "--resize", "8",
                    *TRAIN[3:], "--out", tmp_path / "run")
    refused(result, "huge.png", "too large to decode safely", "400000000 pixels")


def test_an_object_store_location_without_its_package_is_one_line_before_any_model(tmp_path: Path, teacher: Path,
                                                                                   monkeypatch) -> None:
    import importlib

    registry = importlib.import_module("fsspec.registry")  # s3fs as if it were not installed
    monkeypatch.setitem(registry.known_implementations, "s3", {"class": "s3fs_not_installed.S3FileSystem",
                                                               "err": "Install s3fs to access S3"})
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.setattr(build, "setup_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    monkeypatch.setattr(build, "load_clip", lambda *a, **k: pytest.fail("CLIP was loaded"))
    result = invoke(*BUILD, "--teacher-checkpoint", teacher, "--out", "s3://bucket/digits.zarr")
    refused(result, "s3://bucket/digits.zarr", "Install s3fs", "richkd-cache[s3]")
    refused(invoke(*TRAIN, "--cache", "s3://bucket/digits.zarr", "--out", tmp_path / "run"), "Install s3fs")
    refused(invoke("info", "nosuch://bucket/digits.zarr"), "Protocol not known: nosuch")
