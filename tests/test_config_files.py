"""`train --config FILE`: a user's own settings file (TOML or YAML) of the recipes' keys, flags overriding it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clirun import invoke

FAST = ["--device", "cpu", "--workers", "0", "--quiet"]


def settings_file(tmp_path: Path, suffix: str, cache: Path) -> Path:
    """A file naming a shipped recipe (KD + CRD) and overriding some of it: student, data, alpha, no feature loss."""
    path = tmp_path / f"mine{suffix}"
    if suffix == ".toml":
        path.write_text(f'recipe = "cifar100-resnet32x4-resnet8x4"\nstudent = "resnet8"\ndataset = "digits"\n'
                        f'cache = "{cache}"\nepochs = 1\nbatch_size = 128\nfraction = 0.25\nalpha = 0.5\n'
                        f'feature_loss = "none"\nmilestones = [1]\n')
    else:
        path.write_text(f"recipe: cifar100-resnet32x4-resnet8x4\nstudent: resnet8\ndataset: digits\n"
                        f"cache: {cache}\nepochs: 1\nbatch_size: 128\nfraction: 0.25\nalpha: 0.5\n"
                        f"feature_loss: none\nmilestones: [1]\n")
    return path


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_config_file_trains_what_it_says_and_a_flag_overrides_it(digits_cache: Path, tmp_path: Path,
                                                                   suffix: str) -> None:
    run = tmp_path / "run"
    result = invoke("train", "--config", settings_file(tmp_path, suffix, digits_cache), "--alpha", "0.6",
                    *FAST, "--out", run)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["student"], config["dataset"], config["fraction"]) == ("resnet8", "digits", 0.25)
    assert config["milestones"] == [1]
    assert config["alpha"] == 0.6  # the flag, over the file's 0.5
    assert config["feature_loss"] is None  # the file, over the recipe's crd
    assert (config["method"], config["temperature"], config["beta"]) == ("kd", 3.0, 3.0)  # the recipe's


@pytest.mark.parametrize("name, text, message", [
    ("typo.toml", 'studnet = "resnet8"\n', "unknown setting(s) studnet"),
    ("types.toml", 'student = "resnet8"\nlr = "fast"\n', "lr must be a number, got 'fast'"),
    ("milestones.yaml", "student: resnet8\nmilestones: [10, x]\n", "milestones must be a list of integers"),
    ("broken.toml", 'student = "resnet8\n', "is not valid TOML"),
    ("code.yaml", "student: !!python/object/apply:os.system ['echo hacked']\n", "is not valid YAML at line 1"),
    ("list.yaml", "- student\n", "must hold a table of settings"),
    ("run.toml", 'student = "resnet8"\nresume = true\n', "unknown setting(s) resume"),
    ("settings.json", "{}", "TOML (.toml) or YAML"),
    ("recipe.toml", 'recipe = "no-such-recipe"\n', "unknown recipe 'no-such-recipe'"),
    ("seeds.toml", 'student = "resnet8"\nseeds = [1, 1]\n', "distinct seeds"),
])
def test_a_bad_config_file_is_one_line_and_trains_nothing(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = invoke("train", "--config", path, "--dataset", "digits", "--target", "ce", *FAST, "--out", tmp_path / "r")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_missing_config_file_or_out_is_one_line(tmp_path: Path) -> None:
    result = invoke("train", "--config", tmp_path / "none.toml", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "c.toml").write_text('student = "resnet8"\n')
    result = invoke("train", "--config", tmp_path / "c.toml", "--dataset", "digits")
    assert result.exit_code == 2 and "--out is required" in result.output


RESOLVED = ("student", "dataset", "target", "method", "lr", "prompts", "clip_model", "clip_tau", "temperature", "beta",
            "alpha", "lam", "gamma", "milestones", "weight_decay", "device", "cache_device")


def test_config_json_names_every_resolved_default(digits_cache: Path, tmp_path: Path) -> None:
    """No flag names the dataset, lr, prompt set, CLIP model, tau or devices: config.json records the values
    the run trained with, and a resume that spells them out is the same run."""
    run = tmp_path / "run"
    plain = ["--cache", digits_cache, "--student", "resnet8", "--epochs", "1", "--fraction", "0.25", *FAST]
    result = invoke("train", *plain, "--out", run)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert [k for k in RESOLVED if config[k] is None] == []
    assert (config["dataset"], config["lr"], config["clip_model"]) == ("digits", 0.05, "richkd-tiny")
    assert config["prompts"] in ("single", "multi")  # the set the targets were built with, of those stored
    assert (config["device"], config["cache_device"], config["target"]) == ("cpu", "cpu", "richkd")
    spelled = ["--dataset", "digits", "--lr", "0.05", "--prompts", config["prompts"], "--clip-tau", config["clip_tau"],
               "--clip-model", "richkd-tiny", "--target", "richkd"]
    result = invoke("train", *plain, *spelled, "--resume", "--out", run)
    assert result.exit_code == 0, result.output


def test_compare_shows_the_settings_that_differ(digits_cache: Path, tmp_path: Path) -> None:
    plain = ["--cache", digits_cache, "--student", "resnet8", "--epochs", "1", "--fraction", "0.25", *FAST]
    assert invoke("train", *plain, "--out", tmp_path / "a").exit_code == 0
    assert invoke("train", *plain, "--alpha", "0.5", "--method", "dkd", "--out", tmp_path / "b").exit_code == 0
    result = invoke("compare", tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 0, result.output
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in result.output.splitlines() if line.startswith("│")}
    assert cells["alpha"] == ["0.7", "0.5"] and cells["method"] == ["kd", "dkd"]
    assert cells["method_params.beta"] == ["-", "8"]  # DKD's NCKD weight; KD has none
    assert "lr" not in cells and "seed" not in cells  # the same in both runs


def test_a_path_in_a_config_file_expands_home_as_a_shell_would(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("student: resnet8\ncache: ~/none.zarr\n")
    result = invoke("train", "--config", tmp_path / "c.yaml", *FAST, "--out", tmp_path / "r")
    assert result.exit_code == 2 and str(tmp_path / "none.zarr") in result.output, result.output
