"""The model zoo: one interface, checkpoint compatibility with mdistiller, one-line errors."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from richkd_cache.errors import ModelError
from richkd_cache.models import (create_model, list_models, load_checkpoint, resolve_checkpoint, save_checkpoint,
                                 uses_small_lr)

CIFAR_MODELS = list_models(include_torchvision=False, include_timm=False)
# Key names and shapes of mdistiller's CIFAR-100 models (its models/cifar code, num_classes=100):
# the count, the first and last entries, and a sha256 over every "key:[shape]" line in order.
LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "mdistiller_cifar100_layouts.json").read_text())
# A readable sample of the same layouts: key count and some keys with shapes, as mdistiller's
# models/cifar/*.py build them for 100 classes (strides, groups and widths show in the shapes).
GOLDEN = {
    "resnet8x4": (62, {"conv1.weight": [32, 3, 3, 3], "layer1.0.downsample.0.weight": [64, 32, 1, 1],
                       "layer3.0.conv1.weight": [256, 128, 3, 3], "fc.weight": [100, 256]}),
    "resnet32x4": (206, {"conv1.weight": [32, 3, 3, 3], "layer1.0.downsample.1.running_var": [64],
                         "layer3.4.conv2.weight": [256, 256, 3, 3], "fc.weight": [100, 256]}),
    "wrn_40_2": (227, {"conv1.weight": [16, 3, 3, 3], "block1.layer.0.convShortcut.weight": [32, 16, 1, 1],
                       "block3.layer.5.conv2.weight": [128, 128, 3, 3], "bn1.num_batches_tracked": [],
                       "fc.weight": [100, 128]}),
    "vgg13": (72, {"block0.0.weight": [64, 3, 3, 3], "block0.0.bias": [64], "block0.3.weight": [64, 64, 3, 3],
                   "block4.3.weight": [512, 512, 3, 3], "classifier.weight": [100, 512]}),
    "ShuffleV1": (296, {"conv1.weight": [24, 3, 1, 1], "layer1.0.conv1.weight": [54, 24, 1, 1],
                        "layer1.0.conv3.weight": [216, 18, 1, 1], "layer1.1.conv1.weight": [60, 80, 1, 1],
                        "layer3.3.conv3.weight": [960, 80, 1, 1], "linear.weight": [100, 960]}),
    "ShuffleV2": (338, {"layer1.0.conv1.weight": [24, 1, 3, 3], "layer1.0.conv3.weight": [58, 24, 1, 1],
                        "layer1.1.conv1.weight": [58, 58, 1, 1], "layer3.3.conv3.weight": [232, 232, 1, 1],
                        "conv2.weight": [1024, 464, 1, 1], "linear.weight": [100, 1024]}),
    "MobileNetV2": (320, {"conv1.0.weight": [16, 3, 3, 3], "blocks.0.0.conv.0.weight": [16, 16, 1, 1],
                          "blocks.1.0.conv.3.weight": [48, 1, 3, 3], "blocks.6.0.conv.6.weight": [160, 480, 1, 1],
                          "conv2.0.weight": [1280, 160, 1, 1], "classifier.0.weight": [100, 1280]}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches of 2 gain nothing from intra-op threads; on a busy machine spinning threads cost 50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_zoo_has_every_mdistiller_name() -> None:
    assert set(LAYOUTS) <= set(CIFAR_MODELS)
    assert "mobile_half" not in CIFAR_MODELS  # an alias, not a second network
    assert create_model("mobile_half", 10).num_features == create_model("MobileNetV2", 10).num_features


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_model_runs_and_round_trips_through_an_mdistiller_file(name: str, tmp_path: Path) -> None:
    model = create_model(name, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
    assert logits.shape == (2, 7) and feats.shape == (2, model.num_features)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": model.state_dict(), "epoch": 240, "best_acc": torch.tensor(70.0)}, path)
    loaded, meta = load_checkpoint(str(path), arch=name)  # class count read from the final layer
    assert loaded.num_classes == 7 and not loaded.training
    with torch.no_grad():
        again, again_feats = loaded(x)
    assert torch.equal(again, logits) and torch.equal(again_feats, feats)
    assert meta["best_acc"] == 70.0 and meta["epoch"] == 240


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_key_names_and_shapes_are_mdistillers(name: str) -> None:
    count, sample = GOLDEN[name]
    state = create_model(name, 100).state_dict()
    assert len(state) == count
    assert {k: list(state[k].shape) for k in sample if k in state} == sample


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout_equals_mdistillers(name: str) -> None:
    state = create_model(name, 100).state_dict()
    lines = "\n".join(f"{k}:{list(v.shape)}" for k, v in state.items())
    keys = list(state)
    expected = LAYOUTS[name]
    assert len(state) == expected["num_keys"]
    assert f"{keys[0]}:{list(state[keys[0]].shape)}" == expected["first"]
    assert f"{keys[-1]}:{list(state[keys[-1]].shape)}" == expected["last"]
    assert hashlib.sha256(lines.encode()).hexdigest() == expected["sha256"]


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v2"])
def test_torchvision_models_keep_torchvision_keys(name: str) -> None:
    model = create_model(name, 10).eval()
    reference = torchvision.models.get_model(name[3:], weights=None, num_classes=10)
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model(x)
        assert torch.allclose(logits, reference.eval()(x), atol=1e-5)
    assert feats.shape == (1, model.num_features)
    assert isinstance(model, type(reference))


def test_torchvision_checkpoint_loads_strictly(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision's own format: a bare state dict
    loaded, meta = load_checkpoint(str(path), arch="tv:resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x)[0], reference(x), atol=1e-5)
    assert meta["num_classes"] == 10


def test_torchvision_legacy_weights_file_loads_strictly_and_weights_only(tmp_path: Path) -> None:
    """torchvision's published files (resnet34-b627a593.pth) are bare state dicts in torch's legacy
    (pre-zip) serialisation: they load strictly through the weights_only unpickler."""
    reference = torchvision.models.resnet18(num_classes=7).eval()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded, meta = load_checkpoint(str(path), arch="tv:resnet18")
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], reference(x))
    assert meta["num_classes"] == 7
    torch.save({"model": reference.state_dict(), "builder": torchvision.models.resnet18}, path,
               _use_new_zipfile_serialization=False)  # a pickled function: never unpickled
    with pytest.raises(ModelError, match=r"holds Python objects besides weights \(torchvision.models.resnet.resnet18\), "
                                         "that is code, which would run if it were unpickled; it will not be loaded"):
        load_checkpoint(str(path), arch="tv:resnet18")


def test_torchvision_weights_tag_resolves_through_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    downloads: list[tuple[str, str, str]] = []

    def offline(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        downloads.append((url, dst, hash_prefix))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ModelError) as refused:
        resolve_checkpoint("torchvision:IMAGENET1K_V1", "tv:resnet18")
    message = str(refused.value)
    assert "\n" not in message and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"put it at {expected}" in message and "Temporary failure" in message
    assert downloads == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", str(expected), "f37072fd")]
    # the file put there by hand (here random weights) is used as it is, with no download
    expected.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18().state_dict(), expected, _use_new_zipfile_serialization=False)
    assert resolve_checkpoint("torchvision:IMAGENET1K_V1", "tv:resnet18") == str(expected)
    assert resolve_checkpoint("torchvision:DEFAULT", "tv:resnet18") == str(expected)  # DEFAULT is V1 here
    assert load_checkpoint(str(expected), arch="tv:resnet18")[1]["num_classes"] == 1000
    assert len(downloads) == 1
    assert resolve_checkpoint(str(tmp_path / "any.pth"), "resnet8") == str(tmp_path / "any.pth")  # files as given
    with pytest.raises(ModelError, match="no weights 'IMAGENET1K_V9' for resnet18; it has torchvision:IMAGENET1K_V1"):
        resolve_checkpoint("torchvision:IMAGENET1K_V9", "tv:resnet18")
    with pytest.raises(ModelError, match="--teacher tv:<name>"):
        resolve_checkpoint("torchvision:IMAGENET1K_V1", None)


def test_torchvision_aux_heads_and_copies_keep_the_interface() -> None:
    model = create_model("tv:googlenet", 5, init_weights=True).train()  # aux logits while training
    x = torch.randn(2, 3, 64, 64)
    logits, feats = model(x)
    assert logits.shape == (2, 5) and feats.shape == (2, 1024)
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        twin_logits, twin_feats = twin(x)
    assert twin_feats.shape == (2, 1024) and twin_logits.shape == (2, 5)


def test_options_reach_torchvision_only() -> None:
    model = create_model("tv:resnet18", 10, zero_init_residual=True)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    with pytest.raises(ModelError, match="takes no options"):
        create_model("resnet8", 10, width=2)
    with pytest.raises(ModelError, match="does not take these options"):
        create_model("tv:resnet18", 10, no_such_option=1)


def test_torchvision_names_fail_helpfully() -> None:
    with pytest.raises(ModelError, match="did you mean tv:resnet18"):
        create_model("tv:resnet181", 10)
    with pytest.raises(ModelError, match="no linear layer"):
        create_model("tv:squeezenet1_1", 10)
    assert {n[3:] for n in list_models() if n.startswith("tv:")} <= set(torchvision.models.list_models())


def test_mobilenet_and_shufflenet_students_use_the_small_lr() -> None:
    assert all(uses_small_lr(n) for n in ("MobileNetV2", "mobile_half", "ShuffleV1", "ShuffleV2"))
    assert not any(uses_small_lr(n) for n in ("resnet8x4", "wrn_16_2", "vgg8", "tv:mobilenet_v2"))


def test_pre_1_6_serialization_loads(tmp_path: Path) -> None:
    teacher = create_model("resnet8x4", 100).eval()
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / "resnet8x4_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    state = {"model": teacher.state_dict(), "epoch": 240, "best_acc": torch.tensor(73.5),
             "optimizer": optimizer.state_dict()}
    torch.save(state, path, _use_new_zipfile_serialization=False)  # the format of older teacher releases
    loaded, meta = load_checkpoint(str(path), arch="resnet8x4", num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], teacher(x)[0])
    assert meta == {"arch": "resnet8x4", "num_classes": 100, "epoch": 240, "best_acc": 73.5}


def test_our_checkpoints_carry_metadata_and_stay_mdistiller_readable(tmp_path: Path) -> None:
    model = create_model("wrn_16_1", 10)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), model, arch="wrn_16_1", num_classes=10, epoch=3, best_acc=50.0,
                    extra={"config": "abc", "arch": "resnet8"})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert set(model.state_dict()) == set(raw["model"])  # mdistiller reads only this key
    loaded, meta = load_checkpoint(str(path))  # arch from our metadata; `extra` cannot change it
    assert meta["arch"] == "wrn_16_1" and meta["config"] == "abc" and loaded.num_classes == 10
    assert (meta["epoch"], meta["best_acc"], meta["format"]) == (3, 50.0, 1)


def test_a_checkpoint_refuses_another_architecture_by_name(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), create_model("MobileNetV2", 10), arch="mobile_half", num_classes=10)
    assert load_checkpoint(str(path), arch="MobileNetV2")[1]["arch"] == "MobileNetV2"  # alias, same network
    with pytest.raises(ModelError, match="holds a MobileNetV2, not a ShuffleV2"):
        load_checkpoint(str(path), arch="ShuffleV2")


def test_plain_data_beside_the_weights_loads_and_code_objects_are_refused(tmp_path: Path) -> None:
    model = create_model("resnet8", 10)
    path = tmp_path / "timm_style.pth"
    args = argparse.Namespace(model="resnet8", lr=0.05)
    torch.save({"state_dict": model.state_dict(), "args": args, "metric": np.float64(61.5)}, path)
    assert load_checkpoint(str(path), arch="resnet8")[0].num_classes == 10
    risky = tmp_path / "risky.pth"
    torch.save({"model": model.state_dict(), "out_dir": Path("/runs/a")}, risky)
    with pytest.raises(ModelError, match=r"holds Python objects besides weights \(pathlib\.\w*Path\)") as err:
        load_checkpoint(str(risky), arch="resnet8")
    assert "\n" not in str(err.value)


def test_dataparallel_prefix_is_stripped(tmp_path: Path) -> None:
    model = create_model("resnet8", 10)
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, _ = load_checkpoint(str(path), arch="resnet8")
    assert loaded.num_classes == 10


def test_wrong_architecture_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r8.pth"
    torch.save({"model": create_model("resnet8", 100).state_dict()}, path)
    with pytest.raises(ModelError, match="does not fit resnet8x4") as err:
        load_checkpoint(str(path), arch="resnet8x4")
    assert "\n" not in str(err.value)


def test_wrong_class_count_names_both_counts(tmp_path: Path) -> None:
    path = tmp_path / "r8.pth"
    torch.save({"model": create_model("resnet8", 100).state_dict()}, path)
    with pytest.raises(ModelError, match="100 classes but the dataset has 10"):
        load_checkpoint(str(path), arch="resnet8", num_classes=10)


def test_bare_mdistiller_file_needs_an_architecture(tmp_path: Path) -> None:
    path = tmp_path / "r8.pth"
    torch.save({"model": create_model("resnet8", 100).state_dict()}, path)
    with pytest.raises(ModelError, match="--teacher"):
        load_checkpoint(str(path))


def test_missing_or_garbage_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pth"), arch="resnet8")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelError, match="is not a PyTorch checkpoint"):
        load_checkpoint(str(junk), arch="resnet8")
    good = tmp_path / "good.pth"
    save_checkpoint(str(good), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:20_000])  # a copy that died half way
    with pytest.raises(ModelError, match="perhaps truncated") as err:
        load_checkpoint(str(cut))
    assert "\n" not in str(err.value)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ModelError, match="resnet8x4") as err:
        create_model("resnet8x5", 10)
    assert "valid:" in str(err.value)


TIMM_STUDENTS = [n for n in list_models() if n.startswith("timm:")]


@pytest.mark.parametrize("name", TIMM_STUDENTS)
def test_timm_students_take_cifar_images_train_and_round_trip(name: str, tmp_path: Path) -> None:
    model = create_model(name, 100)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 97])
    logits, feats = model(x)  # resized inside to the 224x224 LG trains at
    assert logits.shape == (2, 100) and feats.shape == (2, model.num_features)
    assert model.input_size == (224, 224)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(logits, y).backward()
    optimizer.step()
    assert all(p.grad is not None for p in model.get_classifier().parameters())  # the head is in the graph
    path = tmp_path / "best.pth"
    save_checkpoint(str(path), model, arch=name, num_classes=100, epoch=1, best_acc=1.0)
    loaded, meta = load_checkpoint(str(path))
    assert meta["arch"] == name and type(loaded) is type(model)
    with torch.no_grad():
        again, again_feats = loaded(x)
        expected, expected_feats = model.eval()(x)
    assert torch.equal(again, expected) and torch.equal(again_feats, expected_feats)
    assert torch.allclose(again, loaded.get_classifier()(again_feats))  # features are the head's input


def test_timm_students_keep_timm_keys_and_take_lg_drop_path() -> None:
    import timm

    model = create_model("timm:deit_tiny_patch16_224", 100)
    reference = timm.create_model("deit_tiny_patch16_224", num_classes=100)
    assert list(model.state_dict()) == list(reference.state_dict())  # timm checkpoints load strictly
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # LG's DROP_PATH_RATE
    assert reference.blocks[-1].drop_path1.__class__.__name__ == "Identity"


def test_unknown_timm_name_lists_the_valid_ones() -> None:
    with pytest.raises(ModelError) as err:
        create_model("timm:deit_tiny_patch16", 100)
    message = str(err.value)
    assert "did you mean timm:deit_tiny_patch16_224" in message and "timm:pit_ti_224" in message
    assert "T2T-ViT-7" in message and "PVT-Ti" in message and "\n" not in message
    with pytest.raises(ModelError, match="one linear classifier"):
        create_model("timm:deit_tiny_distilled_patch16_224", 10)  # two heads: no single pooled feature


def test_table_11_students_missing_from_timm_are_missing() -> None:
    import timm

    assert timm.list_models("*t2t*") == []  # T2T-ViT-7
    assert timm.list_models("pvt_*") == [n for n in timm.list_models("pvt_*") if n.startswith("pvt_v2")]  # no PVT v1
