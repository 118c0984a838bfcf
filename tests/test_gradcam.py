"""Grad-CAM (Fig. 7): maps land where a model's evidence is, on convolutional and token students; the grid PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from richkd_cache.gradcam import CELL, GAP, HEADER, grad_cam, jet
from richkd_cache.models import create_model, list_models, save_checkpoint

GRID = 4  # the constructed models see a 32x32 image as 4x4 cells of 8x8 pixels


def cell_masks() -> torch.Tensor:
    """(16, 32, 32): mask k covers cell k, row by row (cell 3 is the top-right one)."""
    masks = torch.zeros(GRID * GRID, 32, 32)
    for k in range(GRID * GRID):
        r, c = divmod(k, GRID)
        masks[k, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 1.0
    return masks


class Cells(nn.Module):
    """(B, 3, 32, 32) -> (B, 16, 32, 32): channel k is the grey image inside cell k, zero elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("masks", cell_masks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True) * self.masks


def reader(hot: dict[int, int]) -> nn.Linear:
    """A head over 16 per-cell features whose class c reads only cell hot[c]."""
    head = nn.Linear(GRID * GRID, 2)
    with torch.no_grad():
        head.weight.zero_(), head.bias.zero_()
        for c, k in hot.items():
            head.weight[c, k] = 1.0
    return head


class CellModel(nn.Module):
    """A convolutional student whose class c depends only on cell hot[c] of the image. The stem is an
    earlier spatial map: Grad-CAM on it (not the last stage) would not localise."""

    def __init__(self, hot: dict[int, int]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.cells = Cells()
        self.fc = reader(hot)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.cells(self.stem(x)).mean(dim=(2, 3))  # (B, 16)
        return self.fc(feats), feats


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn = nn.Identity(), nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(tokens))


class TokenModel(nn.Module):
    """A ViT-like student: a class token plus 16 patch tokens (row by row); token n carries its patch's mean
    grey level in dimension n only; class c reads only dimension hot[c], i.e. only patch hot[c]."""

    num_prefix_tokens = 1

    def __init__(self, hot: dict[int, int]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block())
        self.head = reader(hot)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = torch.nn.functional.avg_pool2d(x.mean(1), 8).flatten(1)  # (B, 16), row-major
        tokens = torch.diag_embed(patches)  # (B, 16, 16)
        tokens = torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)  # class token first
        pooled = self.blocks(tokens)[:, 1:].sum(1)  # (B, 16)
        return self.head(pooled), pooled


def cell_of(cam: torch.Tensor) -> int:
    r, c = divmod(int(cam.argmax()), 32)
    return (r // 8) * GRID + c // 8


@pytest.mark.parametrize("model_cls", [CellModel, TokenModel])
def test_the_map_is_largest_in_the_only_region_the_logit_reads(model_cls: type) -> None:
    model = model_cls({0: 12, 1: 3})  # class 0: bottom-left cell; class 1: top-right cell
    x = torch.rand(2, 3, 32, 32) + 0.1  # every cell active: only the gradient tells them apart
    cams = grad_cam(model, x, torch.tensor([1, 0]))
    assert cams.shape == (2, 32, 32) and cams.amax() == pytest.approx(1.0) and cams.amin() >= 0.0
    assert cell_of(cams[0]) == 3 and cell_of(cams[1]) == 12
    top_right, bottom_left = cell_masks()[3].bool(), cell_masks()[12].bool()
    assert cams[0][top_right].mean() > 10 * cams[0][~top_right].mean()
    assert cams[1][bottom_left].mean() > 10 * cams[1][~bottom_left].mean()


@pytest.mark.parametrize("name", ["timm:deit_tiny_patch16_224", "timm:pit_ti_224", "resnet8x4", "wrn_16_2",
                                  "vgg8", "MobileNetV2", "ShuffleV2"])
def test_every_kind_of_student_gets_a_map(name: str) -> None:
    model = create_model(name, 10)
    cams = grad_cam(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert cams.shape == (2, 32, 32) and torch.isfinite(cams).all()
    assert ((cams.flatten(1).amax(1) == 1.0) | (cams.flatten(1).amax(1) == 0.0)).all()
    assert all(p.grad is None for p in model.parameters())  # drawing maps trains nothing
    assert name in list_models()


def test_jet_runs_blue_to_red() -> None:
    assert np.allclose(jet(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])


def test_evaluate_draws_students_side_by_side(tmp_path: Path) -> None:
    paths = []
    for run, seed in (("ce", 0), ("richkd", 1)):
        torch.manual_seed(seed)
        paths.append(tmp_path / run / "best.pth")
        paths[-1].parent.mkdir()
        save_checkpoint(str(paths[-1]), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    plots = tmp_path / "plots"
    result = CliRunner().invoke(app, ["evaluate", *map(str, paths), "--dataset", "digits", "--no-attacks",
                                      "--device", "cpu", "--gradcam", "3", "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    assert "columns ce, richkd" in result.output
    picture = np.asarray(Image.open(plots / "gradcam.png").convert("RGB"))
    assert picture.shape == (HEADER + 3 * CELL + 2 * GAP, 3 * CELL + 2 * GAP, 3)  # rows: images; columns: image + 2
    left = [(i + 1) * (CELL + GAP) for i in range(2)]
    ce, richkd = (picture[HEADER:, x : x + CELL] for x in left)
    assert not np.array_equal(ce, richkd)  # two different students, two different maps
    first = picture[HEADER : HEADER + CELL, :CELL]
    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 1 and (first[..., 0] == first[..., 1]).all()  # a grey digit


def test_gradcam_refusals_are_one_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "student.pth"
    save_checkpoint(str(ckpt), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    base = ["evaluate", str(ckpt), "--dataset", "digits", "--no-attacks", "--device", "cpu"]
    for extra, message in ((["--gradcam", "2"], "--plots DIR"),
                           ([str(ckpt)], "only by --gradcam"),
                           (["--gradcam", "100000", "--plots", str(tmp_path)], "--gradcam takes 1 to"),
                           ([str(tmp_path / "nope.pth"), "--gradcam", "2", "--plots", str(tmp_path)], "not found")):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output
