"""Corruptions, accuracy by the teacher's category (Table 9), and the Fig. 4/5 plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.studies import accuracy_by_teacher_category, class_correlation, corruption_accuracy
from richkd_cache.data import create_dataset
from richkd_cache.models import create_model, save_checkpoint


def test_accuracy_by_teacher_category_by_hand() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    # teacher: confident correct, confident wrong, uncertain correct, uncertain wrong, confident correct
    teacher = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0.1, 0.3, 0.2], [0.3, 0.1, 0.2], [0, 0, 9.0]])
    student = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
    rows = {r["teacher"]: r for r in accuracy_by_teacher_category(student, teacher, labels)}
    assert rows["confident correct"]["images"] == 2 and rows["confident correct"]["student_top1"] == 50.0
    assert rows["confident wrong"]["student_top1"] == 100.0
    assert rows["uncertain correct"]["student_top1"] == 0.0
    assert rows["uncertain wrong"]["student_top1"] == 100.0


def test_class_correlation_is_a_correlation_matrix() -> None:
    m = class_correlation(torch.randn(200, 6))
    assert m.shape == (6, 6) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)


class PixelOracle(torch.nn.Module):
    """Reads the label a test wrote into pixel (0, 0) of the red channel (value 20 * label)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel = torch.round((x[:, 0, 0, 0] * self.std + self.mean) * 255 / 20).long().clamp(0, 9)
        return torch.nn.functional.one_hot(pixel, 10).float(), x.flatten(1)[:, :4]


def test_corruptions_are_scored_per_severity(tmp_path: Path) -> None:
    data = create_dataset("digits", None, "val")
    n = 8
    labels = np.arange(n) % 10
    np.save(tmp_path / "labels.npy", np.tile(labels, 5))
    rng = np.random.default_rng(0)
    for name in ("fog", "snow"):
        images = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        images[:n, 0, 0, 0] = labels * 20  # severity 1 keeps the label readable; the others do not
        images[n:, 0, 0, 0] = 250
        np.save(tmp_path / f"{name}.npy", images)
    rows = corruption_accuracy(PixelOracle(data.mean[0], data.std[0]), str(tmp_path), data, torch.device("cpu"))
    assert [(r["corruption"], r["severity"]) for r in rows] == [(c, s) for c in ("fog", "snow") for s in range(1, 6)]
    assert rows[0]["top1"] == 100.0 and rows[5]["top1"] == 100.0
    assert all(r["top1"] == 0.0 for r in rows if r["severity"] > 1)  # pixel 250 reads as class 9; labels are 0..7


def test_evaluate_with_teacher_and_plots(tmp_path: Path) -> None:
    ckpt = tmp_path / "student.pth"
    save_checkpoint(str(ckpt), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    result = CliRunner().invoke(app, ["evaluate", str(ckpt), "--dataset", "digits", "--no-attacks", "--device", "cpu",
                                      "--teacher", str(ckpt), "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert "Table 9" in result.output
    assert (tmp_path / "plots" / "correlation.png").exists() and (tmp_path / "plots" / "tsne.png").exists()
