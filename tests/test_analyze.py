"""analyze on a cache built through the CLI, and evaluate (clean, FGSM, PGD) on a student trained through it.

One student is trained once (resnet8, 3 epochs on digits): it is the model the attacks are run against
and the teacher of the cache the analysis reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from rich.console import Console

from cache_store import CacheError
from pipelines.analyze import SWEEP, run_analyze, render_analysis
from pipelines.evaluate import fgsm, model_forward, pgd, render_evaluation, run_evaluate
from richkd_cache.data import create_dataset
from richkd_cache.errors import ConfigError
from richkd_cache.models import create_model, load_checkpoint, save_checkpoint
from clirun import invoke

CPU = ["--device", "cpu", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A run folder of a small trained model: last.pth, config.json, summary.json."""
    out = tmp_path_factory.mktemp("student")
    result = invoke("train", "--dataset", "digits", "--student", "resnet8", "--epochs", "3", "--lr", "0.05",
                    "--milestones", "2", *CPU, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, student: Path) -> Path:
    out = tmp_path_factory.mktemp("cache") / "digits.zarr"
    result = invoke("build", "--dataset", "digits", "--teacher-checkpoint", student / "last.pth",
                    "--clip", "richkd-tiny", "--clip-pretrained", "random", "--prompts", "single,multi",
                    "--teacher-views", "clean", "--batch-size", "256", *CPU, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def analysis(cache: Path, tmp_path_factory) -> dict:
    return run_analyze(str(cache), "multi", 0.7, str(tmp_path_factory.mktemp("plots")))


def top1_from_zarr(cache: Path, alpha: float) -> tuple[float, float, float]:
    """Teacher, CLIP and fused top-1 (%) the way docs/cache-format.md reads a cache: zarr and numpy only."""
    group = zarr.open_group(str(cache), mode="r")
    labels = group["labels"][:]
    z_t = group["teacher/logits"][:, 0].astype(np.float32)
    ((name, clip),) = group.attrs["richkd_cache"]["clip_models"].items()  # the one CLIP model
    z_c = clip["tau"] * group[f"clip/{name}/image_embeds"][:, 0].astype(np.float32) \
        @ group[f"clip/{name}/text/multi"][:].mean(axis=0).T
    fused = alpha * z_t + (1 - alpha) * z_c
    return tuple(100.0 * float((z.argmax(1) == labels).mean()) for z in (z_t, z_c, fused))


def test_analysis_accuracies_match_a_plain_numpy_reading(analysis: dict, cache: Path) -> None:
    teacher, clip, fused = top1_from_zarr(cache, 0.7)
    acc = analysis["accuracy"]
    assert (acc["teacher"]["top1"], acc["clip"]["top1"], acc["fusion"]["top1"]) == pytest.approx((teacher, clip, fused), abs=0.2)
    assert acc["teacher"]["top1"] > 25.0  # a trained teacher, well above chance
    assert all(acc[m]["top5"] >= acc[m]["top1"] for m in acc)
    json.dumps(analysis, allow_nan=False)  # JSON-ready, no NaN


def test_alpha_sweep_ends_at_clip_and_the_teacher(analysis: dict) -> None:
    sweep = analysis["alpha_sweep"]
    assert [row["alpha"] for row in sweep] == list(SWEEP) and len(sweep) == 21
    assert sweep[0]["top1"] == pytest.approx(analysis["accuracy"]["clip"]["top1"])
    assert sweep[-1]["top1"] == pytest.approx(analysis["accuracy"]["teacher"]["top1"])
    assert analysis["best_alpha"]["top1"] == max(row["top1"] for row in sweep)
    assert 0.0 <= analysis["optimal_alpha"]["alpha"] <= 1.0 and -1.0 <= analysis["optimal_alpha"]["rho"] <= 1.0


def test_categories_outcomes_and_calibration_add_up(analysis: dict) -> None:
    n = analysis["dataset"]["num_samples"]
    for model in ("teacher", "clip", "fusion"):
        assert sum(analysis["categories"][model].values()) == n
        assert sum(row["count"] for row in analysis["calibration"][model]["bins"]) == n
        assert 0.0 <= analysis["calibration"][model]["ece"] <= 1.0
    changes = analysis["outcome_changes"]
    teacher_right = round(analysis["accuracy"]["teacher"]["top1"] * n / 100)
    fusion_right = round(analysis["accuracy"]["fusion"]["top1"] * n / 100)
    assert changes["correct_to_wrong"]["base"] == teacher_right
    assert changes["wrong_to_correct"]["base"] == n - teacher_right
    # fusion's right answers: the teacher's, plus the ones it fixes, minus the ones it breaks
    assert fusion_right == teacher_right + changes["wrong_to_correct"]["count"] - changes["correct_to_wrong"]["count"]


def test_adaptive_rules_and_per_class_alpha_are_reported(analysis: dict, cache: Path) -> None:
    rules = {row["rule"]: row for row in analysis["adaptive"]}
    assert list(rules) == ["fixed", "auto", "per-class", "confidence"]
    assert rules["fixed"]["top1"] == pytest.approx(analysis["accuracy"]["fusion"]["top1"])
    assert rules["auto"]["mean_alpha"] == pytest.approx(analysis["optimal_alpha"]["alpha"], abs=1e-6)
    group = zarr.open_group(str(cache), mode="r")
    counts = np.bincount(group["labels"][:], minlength=len(analysis["class_alpha"]))
    assert [row["samples"] for row in analysis["class_alpha"]] == counts.tolist()
    assert all(0.0 <= row["alpha"] <= 1.0 for row in analysis["class_alpha"])
    assert all(0.0 <= row["ece"] <= 1.0 for row in analysis["adaptive"])


def test_plots_are_written_and_tables_rendered(analysis: dict) -> None:
    assert [Path(p).name for p in analysis["plots"]] == ["alpha_sweep.png", "reliability.png", "categories.png"]
    for path in analysis["plots"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=140)
    render_analysis(analysis, console)
    text = console.export_text()
    assert "alpha*" in text and "Table 10" in text and "confident correct" in text
    assert "adaptive fusion rules" in text and "per-class" in text


def test_analysis_without_plots_and_with_the_default_prompt_set(cache: Path) -> None:
    result = run_analyze(str(cache), None, 1.0, None)
    assert result["plots"] == [] and result["prompt_set"] == "multi"  # the first stored set, as in train
    assert result["accuracy"]["fusion"] == result["accuracy"]["teacher"]  # alpha 1: the teacher alone


def test_unknown_prompt_set_and_alpha_outside_0_1_are_refused(cache: Path) -> None:
    with pytest.raises(CacheError, match="complex"):
        run_analyze(str(cache), "complex", 0.7, None)
    with pytest.raises(ConfigError, match="alpha"):
        run_analyze(str(cache), None, 1.5, None)


def test_evaluate_reads_the_dataset_from_the_run_and_attacks_lower_accuracy(student: Path) -> None:
    result = run_evaluate(str(student / "last.pth"), None, None, epsilons=(0.03,))
    summary = json.loads((student / "summary.json").read_text())
    assert result["dataset"] == "digits" and result["split"] == "val"
    assert result["clean"]["top1"] == pytest.approx(summary["last_top1"], abs=1e-6)  # what train measured
    attacked = {row["attack"]: row for row in result["attacks"]}
    assert set(attacked) == {"fgsm", "pgd"} and attacked["pgd"]["epsilon"] == 0.03
    assert attacked["fgsm"]["top1"] < result["clean"]["top1"] - 5.0
    assert attacked["pgd"]["top1"] < result["clean"]["top1"] - 5.0
    console = Console(record=True, width=140)
    render_evaluation(result, console)
    assert "PGD" in console.export_text()


def test_attacks_stay_within_epsilon_and_in_pixel_range(student: Path) -> None:
    model, _ = load_checkpoint(str(student / "last.pth"))
    data = create_dataset("digits", None, "val")
    pixels = torch.from_numpy(data.images[:64]).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.from_numpy(data.labels[:64])
    forward = model_forward(model, data)
    eps = 0.01
    for adversarial in (fgsm(forward, pixels, labels, eps), pgd(forward, pixels, labels, eps)):
        delta = adversarial - pixels
        assert delta.abs().max().item() <= eps + 1e-6
        assert delta.abs().max().item() == pytest.approx(eps, rel=1e-3)  # it does move to the ball's edge
        assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # weights untouched


def test_evaluate_without_a_known_dataset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.pth"
    save_checkpoint(str(path), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    with pytest.raises(ConfigError, match="--dataset"):
        run_evaluate(str(path), None, None, attacks=False)
    assert run_evaluate(str(path), "digits", None, attacks=False)["attacks"] == []


def test_evaluate_refuses_epsilons_outside_pixel_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        run_evaluate(str(tmp_path / "unused.pth"), "digits", None, epsilons=(0.0, 8.0))
