"""`richkd-cache sweep`: a grid from one cache, resumable run by run, ending with a table and a plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipelines.sweep
from clirun import invoke


@pytest.fixture
def cache(digits_cache: Path) -> Path:
    return digits_cache


def sweep_command(cache: Path, out: Path) -> list:
    return ["sweep", "--cache", cache, "--student", "resnet8", "--alpha", "0.5,0.7", "--prompts", "single,multi",
            "--seeds", "0,1", "--epochs", "2", "--fraction", "0.25", "--batch-size", "128", "--device", "cpu", "--workers", "0",
            "--quiet", "--out", out]


def test_a_killed_sweep_resumes_run_by_run_and_ends_with_table_and_plot(cache: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    out = tmp_path / "sweep"
    real_run_train = pipelines.sweep.run_train
    calls: list[str] = []

    def killed_in_third_run(cfg, reporter):
        calls.append(cfg.out)
        if len(calls) == 3:  # one epoch of the third run is saved, then the process dies
            real_run_train(replace(cfg, epochs=1), reporter)
            raise KeyboardInterrupt
        return real_run_train(cfg, reporter)

    monkeypatch.setattr(pipelines.sweep, "run_train", killed_in_third_run)
    result = invoke(*sweep_command(cache, out))
    assert result.exit_code == 2 and "interrupted" in result.output
    third = Path(calls[2])
    first_epoch = pq.read_table(third / "metrics.parquet").to_pylist()
    assert len(first_epoch) == 1 and not (out / "sweep.png").exists()

    calls.clear()
    monkeypatch.setattr(pipelines.sweep, "run_train", lambda cfg, rep: calls.append(cfg.out) or real_run_train(cfg, rep))
    result = invoke(*sweep_command(cache, out))
    assert result.exit_code == 0, result.output
    assert len(calls) == 6 and calls[0] == str(third)  # the two finished runs are not trained again
    resumed = pq.read_table(third / "metrics.parquet").to_pylist()
    assert len(resumed) == 2 and resumed[0] == first_epoch[0]  # continued, not restarted

    results = json.loads((out / "sweep.json").read_text())["results"]
    assert [(r["alpha"], r["prompts"]) for r in results] == [(0.5, "single"), (0.5, "multi"), (0.7, "single"),
                                                             (0.7, "multi")]
    assert all(len(r["best_top1"]) == 2 and "+-" in r["best"] for r in results)
    assert "+-" in result.output and "alpha" in result.output
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "alpha=0.7,prompts=multi" / "seed1" / "config.json").read_text())
    assert (config["alpha"], config["prompts"], config["seed"]) == (0.7, "multi", 1)


def test_a_sweep_folder_with_another_grid_is_refused(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.spec.json").write_text(json.dumps({"axes": {"alpha": [0.1]}, "seeds": [0], "fixed": {}}))
    result = invoke(*sweep_command(cache, out))
    assert result.exit_code == 2 and "other settings" in result.output


@pytest.mark.parametrize("flag, value, message", [("--alpha", "0.5,x", "a number in [0, 1]"), ("--alpha", "0.5,0.5", "twice"),
                                                  ("--seeds", "a", "integers")])
def test_bad_sweep_values_are_one_line(cache: Path, tmp_path: Path, flag: str, value: str, message: str) -> None:
    command = sweep_command(cache, tmp_path / "s")
    command[command.index(flag) + 1] = value
    result = invoke(*command)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_a_grid_point_whose_method_does_not_use_a_setting_fails_before_any_run(cache: Path, tmp_path: Path) -> None:
    command = sweep_command(cache, tmp_path / "s")
    command[command.index("--alpha"):command.index("--alpha") + 2] = ["--method", "kd,dkd", "--beta", "2"]
    result = invoke(*command)
    assert result.exit_code == 2 and "dkd" in result.output
    assert not (tmp_path / "s").exists()  # nothing trained, nothing written


def test_runs_trained_at_once_match_runs_trained_one_by_one(cache: Path, tmp_path: Path) -> None:
    def grid(out: Path, *extra: str) -> list:
        command = sweep_command(cache, out)
        command[command.index("--prompts"):command.index("--prompts") + 2] = []
        command[command.index("--seeds") + 1] = "0"
        command[command.index("--epochs") + 1] = "1"
        return [*command, *extra]

    assert invoke(*grid(tmp_path / "one")).exit_code == 0
    result = invoke(*grid(tmp_path / "two", "--jobs", "2"))
    assert result.exit_code == 0, result.output
    for run in ("alpha=0.5", "alpha=0.7"):
        one, two = (pq.read_table(tmp_path / s / run / "seed0" / "metrics.parquet").to_pylist()[0] for s in ("one", "two"))
        for key in ("train_ce", "train_logit", "train_feat", "val_top1"):  # the same run; only thread counts differ
            assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert (tmp_path / "two" / "sweep.png").exists()


def test_an_unknown_student_fails_before_any_run(cache: Path, tmp_path: Path) -> None:
    command = sweep_command(cache, tmp_path / "s")
    command[command.index("--student") + 1] = "no-such-student"
    result = invoke(*command, "--jobs", "2")
    assert result.exit_code == 2 and "no-such-student" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()  # refused before the sweep folder is written


def test_a_run_failing_among_several_at_once_is_one_line(cache: Path, tmp_path: Path) -> None:
    command = sweep_command(cache, tmp_path / "s")
    command[command.index("--prompts") + 1] = "single,no-such-set"
    for flag, value in (("--seeds", "0"), ("--alpha", "0.5"), ("--epochs", "1")):
        command[command.index(flag) + 1] = value
    result = invoke(*command, "--jobs", "2")
    assert result.exit_code == 2 and "no-such-set" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s" / "sweep.json").exists()


def test_a_config_file_sweeps_target_and_flags_sweep_milestones(cache: Path, tmp_path: Path) -> None:
    """A [sweep] table varies the target (ce drops the recipe's KD settings), --milestones sets of epochs
    separated by '/', and --vary any other setting (one value: fixed)."""
    config = tmp_path / "sweep.toml"
    config.write_text('recipe = "cifar100-resnet32x4-resnet8x4"\nstudent = "resnet8"\nfeature_loss = "none"\n'
                      'epochs = 2\nfraction = 0.25\nbatch_size = 128\ndevice = "cpu"\nworkers = 0\n\n'
                      '[sweep]\ntarget = ["ce", "richkd"]\n')
    out = tmp_path / "s"
    result = invoke("sweep", "--config", config, "--cache", cache, "--dataset", "digits", "--milestones", "1/2",
                    "--vary", "lr_decay=0.5", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    runs = {r["run"]: r for r in json.loads((out / "sweep.json").read_text())["results"]}
    assert sorted(runs) == ["target=ce,milestones=1", "target=ce,milestones=2", "target=richkd,milestones=1",
                            "target=richkd,milestones=2"]
    for name, lrs in (("target=richkd,milestones=1", [0.05, 0.025]), ("target=ce,milestones=2", [0.05, 0.05])):
        rows = pq.read_table(out / name / "seed0" / "metrics.parquet").to_pylist()
        assert [r["lr"] for r in rows] == pytest.approx(lrs)
    ce = json.loads((out / "target=ce,milestones=1" / "seed0" / "config.json").read_text())
    assert (ce["target"], ce["method"], ce["temperature"], ce["milestones"]) == ("ce", None, None, [1])
    assert "train_logit" in pq.read_table(out / "target=richkd,milestones=2" / "seed0" / "metrics.parquet").column_names
    assert "milestones" in result.output and "target" in result.output


@pytest.mark.parametrize("text, message", [
    ('[sweep]\ncache = ["a.zarr", "b.zarr"]\n', "cannot sweep cache"),
    ('[sweep]\nalpha = 0.5\n', "[sweep] alpha must be a list of values"),
    ('[sweep]\nmilestones = [[1], "x"]\n', "milestones must be a list of integers"),
    ('[sweep]\ntarget = ["kd", "teacher"]\n', "unknown target 'teacher'"),
])
def test_a_bad_sweep_file_is_one_line_before_any_run(cache: Path, tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text('student = "resnet8"\n' + text)
    result = invoke("sweep", "--config", config, "--cache", cache, "--quiet", "--out", tmp_path / "s")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s").exists()
