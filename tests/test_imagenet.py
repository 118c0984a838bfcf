"""The ImageNet workflow on an ImageNet-layout folder of small JPEGs: a torchvision teacher from its own
weights file, K random-resized crops of each whole image with top-10 logits (48 bytes a sample-view), and a
stage two that decodes each image once per draw and replays the stored view on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import zarr
from PIL import Image

from cache_store import CacheReader
from pipelines.evaluate import resolve_dataset
from richkd_cache.data import normalize
from richkd_cache.data.imagefolder import ImageFolderDataset
from clirun import invoke

CLASSES = tuple(f"n0{1440764 + 7 * i}" for i in range(11))  # synset-style folder names: top-10 of 11 classes
TRAIN_PER_CLASS, VAL_PER_CLASS = 2, 1
VIEWS, TOPK = 2, 10
# the clean view (and every stored view) is 32 px: the resnets run at CIFAR cost
SIZE = ("--image-size", "32", "--resize", "36")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """root/{train,val}/<synset>/<name>.JPEG, 80x64 noise images; teacher.pth is a torchvision resnet18's
    bare state_dict (torchvision's own file format) for these classes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for synset in CLASSES:
            folder = root / "data" / split / synset
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{synset}_{i}.JPEG", quality=85)
    torch.save(torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict(), root / "teacher.pth")
    return root


@pytest.fixture(scope="module")
def imagenet_cache(imagenet: Path) -> Path:
    out = imagenet / "cache.zarr"
    result = invoke("build", "--dataset", "imagefolder", "--data-root", imagenet / "data", *SIZE,
                    "--teacher", "tv:resnet18", "--teacher-checkpoint", imagenet / "teacher.pth",
                    "--teacher-views", VIEWS, "--topk", TOPK, "--clip", "richkd-tiny", "--clip-pretrained", "random",
                    "--prompts", "single", "--block-rows", "6", "--no-features", "--device", "cpu", "--workers", "1",
                    "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_image_folder_builds_trains_and_verifies(imagenet: Path, imagenet_cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    n = TRAIN_PER_CLASS * len(CLASSES)
    group = zarr.open_group(str(imagenet_cache), mode="r")
    assert group["teacher/topk_indices"].shape == (n, VIEWS, TOPK)
    assert group["clip/richkd-tiny/image_embeds"].shape[:2] == (n, 1)  # CLIP on the centre view only
    manifest = group.attrs["richkd_cache"]
    assert manifest["dataset"]["options"] == {"image_size": 32, "resize": 36}
    assert manifest["views"]["teacher"]["policy"] == str(VIEWS)
    # stage two takes the image size from the cache; JPEGs decoded in a worker process
    out = imagenet / "run"
    result = invoke("train", "--cache", imagenet_cache, "--student", "tv:resnet18", "--epochs", "2",
                    "--batch-size", "4", "--workers", "1", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["epoch"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    result = invoke("verify", imagenet_cache, "--recompute", "4", "--device", "cpu")
    assert result.exit_code == 0 and result.output.strip().endswith("ok"), result.output
    # evaluate reopens the run's images at the size it trained on, decoding them in workers
    name, root, options = resolve_dataset(str(out / "last.pth"), {"cache": str(imagenet_cache)}, None, None)
    assert (name, root, options) == ("imagefolder", str(imagenet / "data"), {"image_size": 32, "resize": 36})
    workers: list[int] = []

    class Loader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs) -> None:
            workers.append(kwargs.get("num_workers", 0))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    result = invoke("evaluate", out / "last.pth", "--no-attacks", "--workers", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["num_samples"] == VAL_PER_CLASS * len(CLASSES) and workers == [1]
    assert report["clean"]["top1"] == pytest.approx(metrics[-1]["val_top1"])  # the same images as training's


def test_stage_two_decodes_each_image_once_per_draw(imagenet: Path, imagenet_cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No image is decoded twice, nor the split decoded into memory: one decode per training draw and
    one per validation image each epoch (workers 0, so the decodes are counted in this process). The run
    is the ImageNet recipe's RichKD (L), shortened."""
    decoded: list[tuple[str, int]] = []
    original = ImageFolderDataset.whole

    def counted(self: ImageFolderDataset, i: int) -> dict:
        decoded.append((self.split, i))
        return original(self, i)

    monkeypatch.setattr(ImageFolderDataset, "whole", counted)
    read: list[str] = []

    def recorded(method):
        def reader(self: CacheReader, name: str, *args):
            read.append(name)
            return method(self, name, *args)
        return reader

    for name in ("load", "load_rows"):
        monkeypatch.setattr(CacheReader, name, recorded(getattr(CacheReader, name)))
    monkeypatch.setenv("RICHKD_CACHE_LOCAL", str(tmp_path / "local"))  # a first run: it makes the local copy
    result = invoke("train", "--recipe", "imagenet-resnet34-resnet18", "--cache", imagenet_cache, "--epochs", "1",
                    "--batch-size", "6", "--workers", "0", "--device", "cpu", "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())  # the recipe's mdistiller ImageNet KD
    assert (config["student"], config["feature_loss"], config["weight_decay"]) == ("tv:resnet18", None, 1e-4)
    assert config["method_params"] == {"ce_weight": 0.5, "weight": 0.5, "temperature": 1.0}
    # RichKD (L) has no feature loss: the pooled features (most of a view's bytes) are never read nor copied
    assert {"teacher/topk_values", "clip/richkd-tiny/image_embeds"} <= set(read)
    assert not {"teacher/features", "clip/richkd-tiny/features"} & set(read)
    copied = {f.name for f in (tmp_path / "local").rglob("*.npy")}
    assert copied == {"teacher__topk_values.npy", "teacher__topk_indices.npy", "views__params.npy",
                      "clip__richkd-tiny__image_embeds.npy"}
    train = sorted(i for split, i in decoded if split == "train")
    val = sorted(i for split, i in decoded if split == "val")
    assert train == list(range(TRAIN_PER_CLASS * len(CLASSES))) and val == list(range(VAL_PER_CLASS * len(CLASSES)))


def test_a_cache_refuses_other_image_options(imagenet_cache: Path, tmp_path: Path) -> None:
    result = invoke("train", "--cache", imagenet_cache, "--student", "tv:resnet18", "--image-size", "28",
                    "--epochs", "1", "--device", "cpu", "--workers", "0", "--quiet", "--out", tmp_path / "run")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "image options" in lines[0] and "'image_size': 32" in lines[0] and "'image_size': 28" in lines[0]
    assert not (tmp_path / "run" / "last.pth").exists()


def test_torchvision_weights_tag_builds_and_verifies_on_another_machine(imagenet: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--teacher-checkpoint torchvision:IMAGENET1K_V1` takes torchvision's file from torch.hub's cache (here a
    3-class stand-in put there by hand); the manifest keeps the tag, so `verify` finds the file again in another
    machine's hub cache."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download expected"))
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "resnet18-f37072fd.pth").write_bytes((imagenet / "teacher.pth").read_bytes())
    out = tmp_path / "c.zarr"
    result = invoke("build", "--dataset", "imagefolder", "--data-root", imagenet / "data", *SIZE,
                    "--teacher", "tv:resnet18", "--teacher-checkpoint", "torchvision:IMAGENET1K_V1",
                    "--teacher-views", "clean", "--clip", "richkd-tiny", "--clip-pretrained", "random",
                    "--prompts", "single", "--device", "cpu", "--workers", "0", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    teacher = zarr.open_group(str(out), mode="r").attrs["richkd_cache"]["teacher"]
    assert teacher["weights"] == "torchvision:IMAGENET1K_V1"
    assert teacher["checkpoint"] == str(hub / "checkpoints" / "resnet18-f37072fd.pth")
    other = hub.rename(tmp_path / "other-hub")  # the recorded path is gone; the tag resolves in this hub cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(other))
    result = invoke("verify", out, "--recompute", "3", "--device", "cpu")
    assert result.exit_code == 0 and result.output.strip().endswith("ok"), result.output


def test_torchvision_weights_offline_is_one_line_naming_the_file(imagenet: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs) -> None:
        raise OSError("<urlopen error [Errno 101] Network is unreachable>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = invoke("build", "--dataset", "imagefolder", "--data-root", imagenet / "data", *SIZE,
                    "--teacher", "tv:resnet34", "--teacher-checkpoint", "torchvision:IMAGENET1K_V1",
                    "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single,multi",
                    "--device", "cpu", "--quiet", "--out", tmp_path / "c.zarr")  # (prompt sets are checked before the teacher)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in lines[0]
    assert str(tmp_path / "hub" / "checkpoints" / "resnet34-b627a593.pth") in lines[0]
    assert not (tmp_path / "c.zarr").exists()


def test_info_reports_bytes_per_sample_view_and_the_imagenet_size(imagenet_cache: Path) -> None:
    """A top-10 logits-only cache of random-resized crops: 48 bytes per sample-view (TinyViT stores 44)."""
    result = invoke("info", imagenet_cache, "--json")
    assert result.exit_code == 0, result.output
    storage = json.loads(result.output)["storage"]
    # per view: top-10 values fp16 + indices int16, the packed view (8 B); per sample, over the 2 views: the
    # label (int32), richkd-tiny's 32-d embedding (fp16) and the teacher's top-10 on the clean view
    assert storage["view_arrays_bytes"] == TOPK * (2 + 2) + 8 == 48
    per_view = 48 + (4 + 32 * 2 + TOPK * (2 + 2)) / VIEWS
    assert storage["bytes_per_sample_view"] == pytest.approx(per_view)
    assert storage["parts"]["views/params"] == 8 and storage["parts"]["teacher/topk_indices"] == 20
    assert storage["imagenet_1k"]["bytes"] == pytest.approx(1_281_167 * VIEWS * per_view)
    assert [r["bytes_per_sample_view"] for r in storage["references"]] == [44, 65]
    assert storage["references"][0]["imagenet_1k_bytes"] == 1_281_167 * VIEWS * 44
    table = invoke("info", imagenet_cache).output
    assert "ImageNet-1k (1,281,167 images x 2 view(s))" in table and "TinyViT" in table
    assert "its per-view arrays (teacher, view record)" in table and "48.0" in table


def test_a_stored_view_is_torchvisions_crop_of_the_whole_image_and_gives_the_cached_top_k(
        imagenet: Path, imagenet_cache: Path) -> None:
    """Each stored record replays, on the whole decoded JPEG, as torchvision's resized_crop at the stored box
    (and flip); the teacher re-run on those pixels gives the cached top-10."""
    from torchvision.transforms.v2 import functional as TF

    from richkd_cache.data.replay import DrawnViews
    from richkd_cache.models import load_checkpoint
    from richkd_cache.views import create_policy

    group = zarr.open_group(str(imagenet_cache), mode="r")
    records, values = group["views/params"][:], group["teacher/topk_values"][:]  # (N, V, 8), (N, V, 10)
    indices = group["teacher/topk_indices"][:]
    assert records.dtype == np.uint8 and indices.dtype == np.int16
    dataset = ImageFolderDataset(str(imagenet / "data"), "train", image_size=32, resize=36)
    policy = create_policy("random-resized-crop", 32)
    teacher, _ = load_checkpoint(str(imagenet / "teacher.pth"), arch="tv:resnet18", num_classes=len(CLASSES))
    teacher.eval()
    samples = np.array([0, 5, 13, 21])
    for v in range(VIEWS):
        replayed = DrawnViews(dataset, policy, samples, records[samples, v])
        pixels = torch.stack([replayed[j]["image"] for j in range(len(samples))])
        for j, i in enumerate(samples):
            f = {n: int(x[0]) for n, x in policy.record.unpack(records[i : i + 1, v]).items()}
            whole = dataset.whole(int(i))
            assert f["top"] + f["height"] <= whole.shape[1] and f["left"] + f["width"] <= whole.shape[2]
            expected = TF.resized_crop(whole, f["top"], f["left"], f["height"], f["width"], [32, 32],
                                       interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            assert torch.equal(pixels[j], TF.horizontal_flip(expected) if f["flip"] else expected)
        with torch.no_grad():
            logits, _ = teacher(normalize(pixels, dataset.mean, dataset.std))
        top = torch.log_softmax(logits, 1).topk(TOPK, dim=1)
        assert np.array_equal(top.indices.numpy(), indices[samples, v])
        np.testing.assert_allclose(top.values.numpy(), values[samples, v].astype(np.float32), atol=2e-2)


def test_random_views_are_trained_one_per_epoch_in_turn(imagenet_cache: Path) -> None:
    """K stored random views: epoch e trains every image on its view e mod K (a fresh view each epoch for
    K >= epochs, as TinyViT), in a full shuffle of the images."""
    from cache_store import open_cache
    from pipelines.config import TrainConfig
    from pipelines.targets import CachedRows, row_plan

    cache = open_cache(str(imagenet_cache))
    plan = row_plan(TrainConfig(student="tv:resnet18", out="unused", cache=str(imagenet_cache), target="kd",
                                feature_loss=None), cache, [])
    assert plan.cycle and plan.num_views == VIEWS and "views/params" in plan.teacher
    rows = CachedRows(plan, {name: np.zeros(1) for name in plan.arrays}, torch.device("cpu"))
    n = TRAIN_PER_CLASS * len(CLASSES)
    orders = []
    for epoch in range(4):
        draws = rows.draw(torch.arange(n), torch.Generator().manual_seed(epoch), epoch)
        assert sorted(draws.index.tolist()) == list(range(n)) and set(draws.view.tolist()) == {epoch % VIEWS}
        orders.append(draws.index.tolist())
    assert orders[0] != orders[1]


def test_online_on_image_files_with_whole_image_views_is_one_line(imagenet_cache: Path, tmp_path: Path) -> None:
    """The online reference runs CLIP on the clean image, which the loader's workers do not decode beside a
    whole-image view: refused before the run folder is written."""
    result = invoke("train", "--cache", imagenet_cache, "--student", "tv:resnet18", "--online", "--epochs", "1",
                    "--device", "cpu", "--workers", "0", "--quiet", "--out", tmp_path / "run")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "need the clean image" in lines[0], result.output
    assert not (tmp_path / "run").exists()
