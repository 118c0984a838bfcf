"""Sharp edges a new user meets, through the CLI: the packed zip's mode, evaluate's class check and its
titles, timm students at the data's size."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import invoke


@pytest.fixture(scope="module")
def student(tmp_path_factory, digits_cache: Path) -> Path:
    """A resnet8 run trained from the digits cache for one epoch on a tenth of the data: its checkpoint
    records the cache, whose manifest holds the classes."""
    out = tmp_path_factory.mktemp("student")
    result = invoke("train", "--cache", digits_cache, "--student", "resnet8", "--epochs", "1", "--fraction", "0.1",
                    "--device", "cpu", "--workers", "0", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    return out / "last.pth"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_pack_writes_the_zip_like_any_new_file(tmp_path: Path, digits_cache: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        result = invoke("pack", digits_cache, tmp_path / "digits.zip")
        (tmp_path / "plain").write_text("")  # how any file comes out under this umask
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    mode = stat.S_IMODE((tmp_path / "digits.zip").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask  # 0644 under 022
    assert not list(tmp_path.glob("*.partial"))


def test_evaluate_refuses_data_with_other_classes(tmp_path: Path, student: Path) -> None:
    """Ten image folders are as many classes as the digits, but other ones: a meaningless accuracy."""
    for c in range(10):
        (tmp_path / "data" / "val" / f"shape{c}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 25 * c, np.uint8)).save(tmp_path / "data" / "val" / f"shape{c}" / "a.png")
    result = invoke("evaluate", student, "--dataset", "imagefolder", "--data-root", tmp_path / "data",
                    "--no-attacks", "--device", "cpu", "--workers", "0")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "was trained on the classes of its cache" in lines[0] and "'shape0' here" in lines[0]


def test_evaluate_titles_its_table_by_what_it_ran(student: Path) -> None:
    clean = invoke("evaluate", student, "--no-attacks", "--device", "cpu", "--workers", "0")
    assert clean.exit_code == 0, clean.output
    assert "top-1 / top-5 (%)" in clean.output
    assert "attack" not in clean.output.lower() and "PGD" not in clean.output and "epsilon" not in clean.output
    attacked = invoke("evaluate", student, "--epsilons", "0.01", "--device", "cpu", "--workers", "0")
    assert attacked.exit_code == 0, attacked.output
    assert "attacks in [0, 1] pixel space, PGD 10 steps of eps/4" in " ".join(attacked.output.split())
    assert "FGSM" in attacked.output and "epsilon" in attacked.output


def test_a_timm_student_is_built_for_the_datas_size_unless_told(tmp_path: Path) -> None:
    """DeiT-Ti on the 32 px digits: a 2x2 patch grid, not 224 px inputs (14x14) resized inside; the size
    goes into the checkpoint, so evaluate rebuilds the same network. --student-image-size (the key LG's
    recipes set to 224) builds it for another size."""
    from richkd_cache.models import load_checkpoint
    from pipelines.config import load_recipe

    train = ["train", "--dataset", "digits", "--student", "timm:deit_tiny_patch16_224", "--epochs", "1",
             "--fraction", "0.05", "--batch-size", "32", "--device", "cpu", "--workers", "0", "--quiet"]
    assert invoke(*train, "--out", tmp_path / "own").exit_code == 0
    model, meta = load_checkpoint(str(tmp_path / "own" / "last.pth"))
    assert meta["model_options"] == {"image_size": 32} and model.patch_embed.grid_size == (2, 2)
    result = invoke("evaluate", tmp_path / "own" / "last.pth", "--no-attacks", "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output

    assert invoke(*train, "--student-image-size", "64", "--out", tmp_path / "told").exit_code == 0
    model, meta = load_checkpoint(str(tmp_path / "told" / "last.pth"))
    assert meta["model_options"] == {"image_size": 64} and model.patch_embed.grid_size == (4, 4)
    assert load_recipe("cifar100-resnet56-deit-ti")["student_image_size"] == 224


def test_a_timm_student_without_timm_installed_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` fails as it does where it is not installed
    result = invoke("train", "--dataset", "digits", "--student", "timm:deit_tiny_patch16_224", "--epochs", "1",
                    "--device", "cpu", "--workers", "0", "--quiet", "--out", tmp_path / "run")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "timm:deit_tiny_patch16_224 needs the timm package" in lines[0] and "pip install" in lines[0]
