"""Stage two: resume after a crash, refusals, seeds, recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cache_store import open_cache
from pipelines.config import TrainConfig, list_recipes, load_recipe, logit_params
from richkd_cache.models import load_checkpoint
from clirun import invoke

FAST = ["--student", "resnet8", "--device", "cpu", "--workers", "0", "--quiet"]


@pytest.fixture
def cache(digits_cache: Path) -> Path:
    return digits_cache


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in pq.read_table(run / "metrics.parquet").to_pylist()]


def test_resume_continues_exactly_where_a_straight_run_would_be(cache: Path, tmp_path: Path) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "2", "--out", straight).exit_code == 0
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", crashed).exit_code == 0
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "2", "--resume", "--out", crashed)
    assert result.exit_code == 0, result.output
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-5)
    assert json.loads((crashed / "summary.json").read_text())["epochs"] == 2


def test_crd_resume_is_bit_identical_to_a_straight_run(cache: Path, tmp_path: Path) -> None:
    """CRD's negative draws come from its own generator, saved in resume.pth: 3 epochs straight equal
    1 epoch, a resume, and 2 more, to the bit (on a --fraction subset, whose rows alone form the bank)."""
    crd = ["--feature-loss", "crd", "--fraction", "0.4"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert invoke("train", "--cache", cache, *FAST, *crd, "--epochs", "3", "--out", straight).exit_code == 0
    assert invoke("train", "--cache", cache, *FAST, *crd, "--epochs", "1", "--out", crashed).exit_code == 0
    result = invoke("train", "--cache", cache, *FAST, *crd, "--epochs", "3", "--resume", "--out", crashed)
    assert result.exit_code == 0, result.output
    (a, _), (b, _) = (load_checkpoint(str(run / "last.pth")) for run in (straight, crashed))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert losses(crashed) == losses(straight)


def test_resume_from_another_run_is_refused(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", run).exit_code == 0
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "2", "--alpha", "0.5", "--resume", "--out", run)
    assert result.exit_code == 2 and "other settings" in result.output


def test_resume_compares_the_settings_used_not_the_flags_given(cache: Path, tmp_path: Path) -> None:
    """A run that took KD's reference temperature resumes with that temperature spelled out."""
    run = tmp_path / "run"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", run).exit_code == 0
    used = json.loads((run / "config.json").read_text())["temperature"]
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "2", "--temperature", used, "--resume", "--out", run)
    assert result.exit_code == 0, result.output
    assert len(losses(run)) == 2


def test_a_cosine_run_resumed_with_another_length_is_refused(cache: Path, tmp_path: Path) -> None:
    """Every epoch's lr under a cosine schedule depends on --epochs, so a longer run is another run (a step
    schedule's milestones do not move, so there a run may be extended)."""
    run = tmp_path / "run"
    cosine = ["--schedule", "cosine"]
    assert invoke("train", "--cache", cache, *FAST, *cosine, "--epochs", "1", "--out", run).exit_code == 0
    result = invoke("train", "--cache", cache, *FAST, *cosine, "--epochs", "3", "--resume", "--out", run)
    assert result.exit_code == 2 and "other settings" in result.output


def test_several_seeds_report_mean_and_std(cache: Path, tmp_path: Path) -> None:
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--seeds", "0,1", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert "+-" in result.output and (tmp_path / "s" / "seed1" / "last.pth").exists()


def test_subset_training_and_compare(cache: Path, tmp_path: Path) -> None:
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--fraction", "0.25", "--seeds", "0,1",
                    "--out", tmp_path / "few")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "few" / "seed0" / "metrics.parquet").to_pylist()
    assert rows[0]["epoch"] == 1
    result = invoke("compare", tmp_path / "few", tmp_path / "few" / "seed0")
    assert result.exit_code == 0 and "+-" in result.output
    assert invoke("compare", tmp_path / "nothing").exit_code == 2


def test_recipes_load_and_flags_override_them(cache: Path, tmp_path: Path) -> None:
    assert "cifar100-resnet32x4-resnet8x4" in list_recipes()
    for name in list_recipes():  # every shipped recipe names only real settings, and only its method's
        logit_params(TrainConfig(out="unused", **load_recipe(name)))
    out = tmp_path / "recipe"
    result = invoke("train", "--recipe", "cifar100-resnet32x4-resnet8x4", "--cache", cache, "--dataset", "digits",
                    *FAST, "--epochs", "1", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["student"] == "resnet8" and config["feature_loss"] == "crd" and config["beta"] == 3.0
    assert config["method_params"] == {"ce_weight": 1.0, "weight": 3.0, "temperature": 3.0}


def test_the_released_code_recipe_differs_from_the_papers_only_in_clips_logits() -> None:
    """tau 1 (raw cosines) and the re-normalised mean of the code's 12 templates (docs/fusion.md)."""
    paper, code = (load_recipe(f"cifar100-resnet32x4-resnet8x4{v}") for v in ("", "-released-code"))
    assert {k: v for k, v in code.items() if k not in paper} == {"prompts": "richkd-code", "clip_tau": 1.0,
                                                                  "clip_renormalize": True}
    assert all(code[k] == v for k, v in paper.items())
    cfg = TrainConfig(out="unused", **code)
    assert logit_params(cfg) == {"ce_weight": 1.0, "weight": 3.0, "temperature": 3.0}


def test_table4_recipes_carry_the_pairs_reference_weights() -> None:
    # DKD's NCKD weight per pair: mdistiller configs/cifar100/dkd/res32x4_res8x4.yaml (default 8.0),
    # wrn40_2_wrn_40_1.yaml (6.0); NormKD and RLD configs override nothing for these pairs
    assert load_recipe("cifar100-r32x4-r8x4-dkd")["method_params"]["beta"] == 8.0
    assert load_recipe("cifar100-wrn402-wrn401-dkd")["method_params"]["beta"] == 6.0
    for pair in ("r32x4-r8x4", "wrn402-wrn401"):
        assert load_recipe(f"cifar100-{pair}-normkd")["method_params"] == {"ce_weight": 0.1, "weight": 0.9, "t_norm": 2.0}
        rld = load_recipe(f"cifar100-{pair}-rld")["method_params"]
        assert (rld["ce_weight"], rld["alpha"], rld["beta"], rld["temperature"]) == (1.0, 1.0, 8.0, 4.0)


@pytest.mark.parametrize("args, message", [
    (["--method", "dkd", "--beta", "3"], "--beta (the weight of the logit loss, eq. 9; recipe key beta) is not used by dkd"),
    (["--method", "normkd", "--temperature", "4"], "--temperature (the distillation temperature; recipe key temperature) is not used by normkd; its parameters: ce_weight=0.1, weight=0.9, t_norm=2"),
    (["--method", "kd", "--method-param", "alpha=1"], "kd has no parameter alpha"),
    (["--method", "kd", "--beta", "2", "--method-param", "weight=2"], "set twice"),
    (["--method", "dkd", "--method-param", "beta"], "--method-param wants NAME=VALUE"),
    (["--target", "ce", "--temperature", "3"], "--temperature (read only with a target that distills"),
    (["--method", "none", "--method-param", "beta=6"], "no logit loss is trained"),
    # a KD recipe's temperature and beta are dropped when --method changes its method: only warmup is wrong
    (["--recipe", "cifar100-resnet32x4-resnet8x4", "--method", "dkd", "--method-param", "warmup=0"], "warmup must be > 0"),
    # and with --target ce (no logit loss): the run gets as far as the recipe's dataset
    (["--recipe", "cifar100-resnet32x4-resnet8x4", "--target", "ce"], "CIFAR-100 not found"),
])
def test_a_setting_the_method_does_not_use_is_one_line_error(cache: Path, tmp_path: Path, args, message) -> None:
    result = invoke("train", "--cache", cache, *args, *FAST, "--epochs", "1", "--out", tmp_path / "x")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_distillation_without_a_cache_is_refused(tmp_path: Path) -> None:
    result = invoke("train", "--dataset", "digits", "--target", "richkd", *FAST, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "--cache" in result.output


@pytest.mark.parametrize("target", ["kd", "clip"])
def test_every_target_trains_and_records_the_weights_it_used(cache: Path, tmp_path: Path, target: str) -> None:
    result = invoke("train", "--cache", cache, "--target", target, "--method", "dkd", "--feature-loss", "mse",
                    "--method-param", "beta=6", *FAST, "--epochs", "1", "--out", tmp_path / target)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / target / "config.json").read_text())
    assert config["method_params"] == {"ce_weight": 1.0, "alpha": 1.0, "beta": 6.0, "temperature": 4.0, "warmup": 20.0}
    assert config["temperature"] == 4.0 and config["beta"] is None  # DKD's T; no overall weight (not KD's 3)


def test_a_second_run_reuses_the_local_copy(cache: Path, tmp_path: Path, monkeypatch) -> None:
    """The first run copies each array it reads out of the Zarr chunks once, into the local copy; a second
    run (another seed) reads no chunk of them, creates no file, and maps the very same files."""
    from cache_store.local import LocalCopy
    from cache_store.reader import CacheReader

    monkeypatch.setenv("RICHKD_CACHE_LOCAL", str(tmp_path / "local"))
    reads: list[str] = []
    mapped: list[str] = []
    original_rows, original_open = CacheReader.load_rows, LocalCopy.open
    monkeypatch.setattr(CacheReader, "load_rows", lambda self, n, a, b: reads.append(n) or original_rows(self, n, a, b))
    monkeypatch.setattr(LocalCopy, "open", lambda self, n: (lambda m: mapped.append(str(m.filename)) or m)(original_open(self, n)))

    def run(seed: int) -> tuple[set[str], dict[str, tuple[int, int]]]:
        reads.clear(), mapped.clear()
        result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--seeds", str(seed),
                        "--out", tmp_path / f"run{seed}")
        assert result.exit_code == 0, result.output
        files = {str(f): (f.stat().st_ino, f.stat().st_mtime_ns) for f in (tmp_path / "local").rglob("*.npy")}
        return set(reads), files

    first_reads, first_files = run(0)
    assert {"teacher/logits", "clip/richkd-tiny/image_embeds", "teacher/features"} <= first_reads
    assert set(mapped) == set(first_files) and len(first_files) >= 4  # logits, features, CLIP's embeddings, features
    second_reads, second_files = run(1)
    assert second_reads == set() and second_files == first_files  # nothing read from Zarr, nothing written
    assert set(mapped) == set(first_files)


# ---------------------------------------------------------------- the run folder


class _Marker:
    """Unpickling this object would create a file: a crafted resume.pth must never get that far."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_resume_file_runs_no_code(cache: Path, tmp_path: Path) -> None:
    import torch

    run, marker = tmp_path / "run", tmp_path / "marker"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", run).exit_code == 0
    torch.save({"identity": "x", "payload": _Marker(str(marker))}, run / "resume.pth")
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "2", "--resume", "--out", run)
    assert result.exit_code == 2 and "resume.pth holds Python objects besides weights (" in result.output
    assert "it will not be loaded" in result.output and "weights_only" not in result.output  # never torch's advice
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_an_empty_or_truncated_resume_file_is_one_line(cache: Path, tmp_path: Path, content: bytes) -> None:
    run = tmp_path / "run"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", run).exit_code == 0
    (run / "resume.pth").write_bytes(content)
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "2", "--resume", "--out", run)
    assert result.exit_code == 2 and "damaged" in result.output and "Traceback" not in result.output


def test_an_existing_run_is_kept_unless_resumed_or_overwritten(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", run).exit_code == 0
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--alpha", "0.5", "--out", run)
    assert result.exit_code == 2 and "--resume" in result.output and "--overwrite" in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # not one byte written
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--alpha", "0.5", "--overwrite", "--out", run)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["alpha"] == 0.5
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_a_refused_setting_writes_nothing(cache: Path, tmp_path: Path) -> None:
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--fraction", "0", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert not (tmp_path / "r").exists()


def test_metrics_log_the_rate_each_epoch_trained_with(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "3", "--lr", "0.1", "--milestones", "1,2",
                    "--out", run)
    assert result.exit_code == 0, result.output
    lrs = [row["lr"] for row in pq.read_table(run / "metrics.parquet").to_pylist()]
    assert lrs == pytest.approx([0.1, 0.01, 0.001])


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_resume_file(cache: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    import errno

    import torch

    run = tmp_path / "run"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", run).exit_code == 0
    saved = (run / "resume.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "resume.pth" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "2", "--resume", "--out", run)
    assert result.exit_code == 2 and "No space left" in result.output and "resume.pth" in result.output
    assert (run / "resume.pth").read_bytes() == saved
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("rule", ["auto", "per-class", "confidence"])
def test_adaptive_alpha_rules_train_and_are_recorded(cache: Path, tmp_path: Path, rule: str) -> None:
    run = tmp_path / rule
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--alpha", rule, "--out", run)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["alpha"] == rule


@pytest.mark.parametrize("alpha", ["1.5", "sometimes"])
def test_an_alpha_outside_0_1_or_no_rule_is_one_line(cache: Path, tmp_path: Path, alpha: str) -> None:
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--alpha", alpha, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "alpha" in result.output and not (tmp_path / "r").exists()


def test_a_default_run_trains_on_multi_by_name_and_says_so(digits_cache: Path, tmp_path: Path) -> None:
    """The paper's method is multi-prompting (sec. 3.1): a cache holding single, multi and complex (complex
    first in sort order) trains, analyses and reports on multi when no set is named."""
    cache = tmp_path / "digits.zarr"
    shutil.copytree(digits_cache, cache)
    assert invoke("prompts", "add", cache, "--file", "complex").exit_code == 0
    assert open_cache(str(cache)).prompt_sets() == ["complex", "multi", "single"]
    run = tmp_path / "run"
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--out", run)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["prompts"] == "multi"
    assert json.loads(invoke("analyze", cache, "--json").output)["prompt_set"] == "multi"
    info = json.loads(invoke("info", cache, "--json").output)
    assert [r["prompt_set"] for r in info["prompt_sets"] if r["default"]] == ["multi"]
    named = tmp_path / "named"
    assert invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--prompts", "complex", "--out", named).exit_code == 0
    assert json.loads((named / "config.json").read_text())["prompts"] == "complex"


def test_precision_is_recorded_and_a_bad_one_is_one_line(cache: Path, tmp_path: Path) -> None:
    """fp32 by default (as mdistiller trains); bf16 autocast on request, which a CPU run records and ignores."""
    assert TrainConfig(student="resnet8", out="unused").precision == "fp32"
    run = tmp_path / "bf16"
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--precision", "bf16", "--out", run)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    result = invoke("train", "--cache", cache, *FAST, "--epochs", "1", "--precision", "fp16", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "--precision takes fp32 or bf16, not 'fp16'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
