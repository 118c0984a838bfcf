"""Several CLIP models in one cache: built together or added later (only the new model runs, resumable
after a kill, the cache usable meanwhile), chosen or ensembled at training time; format-1 caches still
open and train exactly as before."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store import open_cache, verify_cache
from clirun import invoke

A, B = "richkd-tiny", "richkd-tiny2"  # two tiny CLIP configs of different widths (D 32 / 24, Fc 64 / 48)
BUILD = ["build", "--dataset", "digits", "--clip-pretrained", "random", "--prompts", "single,multi",
         "--teacher-views", "clean", "--block-rows", "256", "--batch-size", "256", "--device", "cpu", "--workers", "0",
         "--quiet"]  # the 1442 training digits in 6 blocks
TRAIN = ["--student", "resnet8", "--epochs", "1", "--batch-size", "128", "--device", "cpu", "--workers", "0", "--quiet"]
# Run the CLI in a process that SIGKILLs itself on its 3rd forward batch: a kill in the middle of a build.
KILLED_AT_THIRD_BATCH = """
import os, signal, sys
import pipelines.build as build
make_forward = build.make_forward
def dying(*args, **kwargs):
    forward, calls = make_forward(*args, **kwargs), []
    def run(batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(batch)
    return run
build.make_forward = dying
from pipelines.cli import app
app(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def both(tmp_path_factory, teacher: Path) -> Path:
    """The training digits with both CLIP models, built in one pass."""
    out = tmp_path_factory.mktemp("both") / "both.zarr"
    result = invoke(*BUILD, "--teacher-checkpoint", teacher, "--clip", f"{A},{B}", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def stored(url: Path) -> dict[str, np.ndarray]:
    reader = open_cache(str(url), require_complete=False)
    return {name: reader.load(name) for name in reader.arrays()}


def teacher_files(url: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of the teacher's part (labels, views, teacher arrays, their flags): mtime and bytes."""
    return {str(p.relative_to(url)): (p.stat().st_mtime_ns, p.read_bytes())
            for node in ("labels", "views", "teacher", "written") for p in (url / node).rglob("*") if p.is_file()}


def test_each_model_has_its_own_arrays_flags_prompt_sets_and_manifest_entry(both: Path) -> None:
    reader = open_cache(str(both))
    assert reader.manifest["format_version"] == 3 and list(reader.clips) == [A, B]
    for name, (d, f) in {A: (32, 64), B: (24, 48)}.items():
        record = reader.clip_records[name]
        assert (record["status"], record["embed_dim"], record["feature_dim"], record["arch"]) == ("complete", d, f, name)
        assert set(record["zero_shot_accuracy"]) == {"single", "multi"} and record["activation"] == "quickgelu"
        assert reader.load(f"clip/{name}/image_embeds").shape == (1442, 1, d)
        assert reader.text_embeddings("multi", name).shape[1:] == (10, d) and reader.written_mask(name).all()
    assert verify_cache(str(both)).ok
    recomputed = invoke("verify", both, "--recompute", "8", "--device", "cpu")  # every model runs again
    assert recomputed.exit_code == 0, recomputed.output
    info = json.loads(invoke("info", both, "--json").output)
    assert {r["clip_model"] for r in info["prompt_sets"]} == {A, B, "ensemble"}


def test_adding_a_model_runs_only_it_and_equals_building_both(both: Path, teacher: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    out = tmp_path / "added.zarr"
    assert invoke(*BUILD, "--teacher-checkpoint", teacher, "--clip", A, "--out", out).exit_code == 0
    before = teacher_files(out)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran while a CLIP model was added")

    monkeypatch.setattr("pipelines.build.run_teacher", no_teacher)
    result = invoke(*BUILD, "--teacher-checkpoint", teacher, "--clip", f"{A},{B}", "--out", out)
    assert result.exit_code == 0, result.output
    assert teacher_files(out) == before  # not one teacher chunk or flag rewritten
    joint, added = stored(both), stored(out)
    assert joint.keys() == added.keys() and all(np.array_equal(joint[k], added[k]) for k in joint)
    assert open_cache(str(out)).clip_records[B]["zero_shot_accuracy"] == open_cache(str(both)).clip_records[B]["zero_shot_accuracy"]


def test_a_killed_add_leaves_the_cache_usable_and_resumes(both: Path, teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.zarr"
    assert invoke(*BUILD, "--teacher-checkpoint", teacher, "--clip", A, "--out", out).exit_code == 0
    before = teacher_files(out)
    command = [*BUILD, "--teacher-checkpoint", str(teacher), "--clip", B, "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THIRD_BATCH, *command], capture_output=True)
    assert killed.returncode == -9
    reader = open_cache(str(out))  # killed before its 6 blocks were written
    assert reader.clip_records[B]["status"] == "building" and int(reader.written_mask(B).sum()) < 6

    info = invoke("info", out)
    assert info.exit_code == 0 and f"{B}:" in info.output and "INCOMPLETE" in info.output
    report = invoke("verify", out)
    assert report.exit_code == 1 and f"CLIP model {B} is incomplete" in report.output
    refused = invoke("train", "--cache", out, *TRAIN, "--clip-model", B, "--out", tmp_path / "b")
    assert refused.exit_code == 2 and "incomplete" in refused.output and "re-run" in refused.output
    trained = invoke("train", "--cache", out, *TRAIN, "--out", tmp_path / "a")  # the only complete model
    assert trained.exit_code == 0, trained.output

    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    joint, resumed = stored(both), stored(out)
    assert all(np.array_equal(joint[k], resumed[k]) for k in joint) and teacher_files(out) == before
    assert verify_cache(str(out)).ok


def test_trains_with_each_model_and_the_ensemble_and_never_guesses(both: Path, tmp_path: Path) -> None:
    guessed = invoke("train", "--cache", both, *TRAIN, "--out", tmp_path / "none")
    assert guessed.exit_code == 2 and f"several CLIP models ({A}, {B})" in guessed.output
    assert "--clip-model" in guessed.output and "Traceback" not in guessed.output
    summaries = {}
    for choice in (A, B, "ensemble", f"{B}+{A}"):
        run = tmp_path / choice
        result = invoke("train", "--cache", both, *TRAIN, "--clip-model", choice, "--feature-loss", "cosine", "--out", run)
        assert result.exit_code == 0, result.output
        summaries[choice] = json.loads((run / "summary.json").read_text())
        used = json.loads((run / "config.json").read_text())["clip_models"]
        assert used == {A: [A], B: [B], "ensemble": [A, B]}.get(choice, [B, A])  # the run records its CLIP
    unknown = invoke("train", "--cache", both, *TRAIN, "--clip-model", "ViT-L-14", "--out", tmp_path / "x")
    assert unknown.exit_code == 2 and f"no CLIP model 'ViT-L-14'; it has {A}, {B}" in unknown.output
    for command in (["analyze", both, "--clip-model", "ensemble", "--json"],
                    ["export", both, "--out", tmp_path / "t.npz", "--clip-model", B, "--features"]):
        assert invoke(*command).exit_code == 0


def test_prompt_sets_are_added_per_model(both: Path, tmp_path: Path) -> None:
    cache = tmp_path / "copy.zarr"
    shutil.copytree(both, cache)
    unnamed = invoke("prompts", "add", cache, "--file", "complex")
    assert unnamed.exit_code == 2 and "--clip-model" in unnamed.output
    assert invoke("prompts", "add", cache, "--file", "complex", "--clip-model", B).exit_code == 0
    reader = open_cache(str(cache))
    assert reader.prompt_sets(B) == ["complex", "multi", "single"] and "complex" not in reader.prompt_sets(A)
    assert "complex" in reader.clip_records[B]["zero_shot_accuracy"] and reader.prompt_sets() == ["multi", "single"]
    listed = invoke("prompts", "list", cache).output.splitlines()
    assert f"{B}: complex" in listed and f"{A}: multi" in listed
    refused = invoke("train", "--cache", cache, *TRAIN, "--clip-model", "ensemble", "--prompts", "complex",
                     "--out", tmp_path / "r")
    assert refused.exit_code == 2 and f"prompt set 'complex' is not in cache {cache} for CLIP model {A}" in refused.output
    assert verify_cache(str(cache)).ok


def test_the_ensemble_is_the_mean_of_each_models_probabilities(both: Path) -> None:
    """--target clip with the ensemble: log of the mean over models of softmax(tau_k e_k W_k^T) (eq. 2-3 per
    model), recomputed here from the stored arrays; f_C is both models' features, each scaled to unit
    centred energy, side by side."""
    from pipelines.config import TrainConfig
    from stagetwo import Batches

    reader = open_cache(str(both))
    cfg = TrainConfig(student="resnet8", out="-", cache=str(both), target="clip", clip_model="ensemble",
                      prompts="multi", feature_loss="mse")
    arrays = reader.load_many([f"clip/{name}/{kind}" for name in (A, B) for kind in ("image_embeds", "features")])
    logits, parts, _ = Batches(cfg)(torch.arange(reader.layout.num_samples))
    probs, feats = [], []
    for name in (A, B):
        e = arrays[f"clip/{name}/image_embeds"][:, 0].astype(np.float64)
        w = reader.text_embeddings("multi", name).astype(np.float64).mean(0)
        z = reader.clip_records[name]["tau"] * e @ w.T
        probs.append(np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        f = arrays[f"clip/{name}/features"][:, 0].astype(np.float64)
        feats.append(f / np.sqrt(((f - f.mean(0)) ** 2).sum(1).mean()))
    expected = np.log(np.mean(probs, axis=0))
    got = logits.double().log_softmax(1).numpy()
    assert np.allclose(got, expected, atol=1e-4)
    assert not np.allclose(got, np.log(probs[0]), atol=1e-2)  # really both models
    assert np.allclose(parts["clip"].numpy(), np.concatenate(feats, axis=1), atol=1e-4)


def test_clip_lists_are_checked_in_one_line(teacher: Path, tmp_path: Path) -> None:
    for args, message in ((["--clip", f"{A},{A}"], f"--clip names {A} more than once"),
                          (["--clip", f"{A},{B}", "--clip-activation", "gelu,gelu,gelu"],
                           "--clip-activation gives 3 values for 2 CLIP models")):
        result = invoke(*BUILD, "--teacher-checkpoint", teacher, *args, "--out", tmp_path / "x.zarr")
        assert result.exit_code == 2 and message in result.output and not (tmp_path / "x.zarr").exists()


