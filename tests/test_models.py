"""The model zoo: one interface, checkpoint compatibility with mdistiller, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from richkd_cache.errors import ModelError
from richkd_cache.models import create_model, list_models, load_checkpoint, save_checkpoint

CIFAR_MODELS = list_models(include_torchvision=False)
# Key names and shapes of mdistiller's CIFAR-100 models (its models/cifar code, num_classes=100):
# the count, the first and last entries, and a sha256 over every "key:[shape]" line in order.
LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "mdistiller_cifar100_layouts.json").read_text())


def test_the_zoo_has_every_mdistiller_name() -> None:
    assert set(LAYOUTS) <= set(CIFAR_MODELS)
    assert "mobile_half" not in CIFAR_MODELS  # an alias, not a second network
    assert create_model("mobile_half", 10).num_features == create_model("MobileNetV2", 10).num_features


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_model_runs_reports_features_and_round_trips(name: str) -> None:
    model = create_model(name, 100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x)
    assert logits.shape == (2, 100) and feats.shape == (2, model.num_features)
    clone = create_model(name, 100).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(clone(x)[0], logits)


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
    import torchvision

    model = create_model(name, 10).eval()
    reference = torchvision.models.get_model(name[3:], weights=None, num_classes=10)
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model(x)
        assert torch.allclose(logits, reference.eval()(x), atol=1e-5)
    assert feats.shape == (1, model.num_features)


def test_mdistiller_checkpoint_loads_strictly_and_gives_the_same_outputs(tmp_path: Path) -> None:
    teacher = create_model("resnet8x4", 100).eval()
    path = tmp_path / "resnet8x4_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": teacher.state_dict(), "epoch": 240, "best_acc": 73.1}, path)
    loaded, meta = load_checkpoint(str(path), arch="resnet8x4", num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], teacher(x)[0])
    assert meta["arch"] == "resnet8x4" and meta["epoch"] == 240


def test_our_checkpoints_carry_metadata_and_stay_mdistiller_readable(tmp_path: Path) -> None:
    model = create_model("wrn_16_1", 10)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), model, arch="wrn_16_1", num_classes=10, epoch=3, best_acc=50.0)
    raw = torch.load(path, weights_only=True)
    assert set(model.state_dict()) == set(raw["model"])  # mdistiller reads only this key
    loaded, meta = load_checkpoint(str(path))  # arch from our metadata
    assert meta["arch"] == "wrn_16_1" and loaded.num_classes == 10


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
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(str(junk), arch="resnet8")


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ModelError, match="resnet8x4") as err:
        create_model("resnet8x5", 10)
    assert "valid:" in str(err.value)
