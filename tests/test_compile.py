"""The compiled stage-two step (`train --compile`): the same losses as the eager step, step by step, with one
static batch shape (the epoch's last, partial batch runs eagerly) and every sample seen once per epoch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import pipelines.train
from pipelines.cli import app
from pipelines.config import TrainConfig
from pipelines.distributed import DistContext
from pipelines.progress import Reporter
from richkd_cache.views import create_policy
from pipelines.targets import CachedRows, RowPlan, StageTwoTargets
from richkd_cache.distill.batch import ClipPart, FusionState
from richkd_cache.data._base import ArrayImageDataset
from richkd_cache.distill import create_objective

# inductor compiles CPU kernels with a C compiler; without one the compiled step cannot exist here
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="torch.compile's CPU backend (inductor) needs a C compiler (gcc/cc)")

N, BATCH, CLASSES = 40, 16, 10  # two full batches and a partial one of 8 per epoch
EAGER_STEP = pipelines.train.train_step


class TinyStudent(nn.Module):
    """A student with the zoo's interface ((logits, pooled features), num_features) and a BatchNorm, small
    enough that inductor compiles its step in seconds."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)  # (B, 16)
        return self.fc(feats), feats


def random_source() -> StageTwoTargets:
    """Random fp16 rows of one view per sample (the teacher's logits and features, a CLIP model's embeddings
    and features) fused as RichKD (L+F) with raw feature parts."""
    rows = {"teacher/logits": torch.randn(N, 1, CLASSES), "teacher/features": torch.randn(N, 1, 8),
            "clip/m/image_embeds": nn.functional.normalize(torch.randn(N, 1, 6), dim=-1),
            "clip/m/features": torch.randn(N, 1, 4)}
    arrays = {name: t.numpy().astype(np.float16) for name, t in rows.items()}
    plan = RowPlan(("teacher/logits", "teacher/features"), ("clip/m/image_embeds", "clip/m/features"))
    clip = ClipPart("m", "clip/m/image_embeds", "clip/m/features", torch.randn(2, CLASSES, 6), 10.0)
    state = FusionState("richkd", CLASSES, (clip,), alpha=0.7, features=True)
    return StageTwoTargets(CachedRows(plan, arrays, torch.device("cpu")), state, create_policy("crop-flip", 32))


def run_epochs(compiled: bool, epochs: int, monkeypatch) -> list[dict]:
    """Train a fresh tiny RichKD (L+F) run (KD + cosine towards fixed random targets); every step recorded as
    {"compiled", "index", terms...}."""
    rng = np.random.default_rng(0)
    dataset = ArrayImageDataset("tiny", "train", "-", rng.integers(0, 256, (N, 8, 8, 3), dtype=np.uint8),
                                rng.integers(0, CLASSES, N), [f"c{i}" for i in range(CLASSES)],
                                (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(0)
    source = random_source()
    student = TinyStudent()
    objective = create_objective("richkd", "kd", "cosine", student_dim=16, teacher_dim=8, clip_dim=4)
    cfg = TrainConfig(student="tiny", out="-", batch_size=BATCH, workers=0, compile=compiled)
    optimizer, _ = pipelines.train.setup_optimizer(cfg, student, objective)
    images = pipelines.train.setup_images(dataset, torch.device("cpu"))

    steps: list[dict] = []

    def recording(step, was_compiled: bool):
        def record(*args):
            terms, logits = step(*args)
            steps.append({"compiled": was_compiled, "index": args[5].tolist(),
                          **{name: float(v) for name, v in terms.items()}})
            return terms, logits
        return record

    real_compiled = pipelines.train.compiled_step("cpu")  # built (once per process) around the real step
    monkeypatch.setattr(pipelines.train, "train_step", recording(EAGER_STEP, False))
    monkeypatch.setattr(pipelines.train, "compiled_step", lambda kind: recording(real_compiled, True))
    generator = torch.Generator()
    for epoch in range(epochs):
        generator.manual_seed(epoch)
        if epoch == 2:  # by now the step is compiled and the epoch counter is no longer a constant in it
            torch._dynamo.config.error_on_recompile = True
        try:
            pipelines.train.train_epoch(student, objective, optimizer, images, dataset, source, cfg, epoch,
                                        generator, Reporter(quiet=True), DistContext())
        finally:
            torch._dynamo.config.error_on_recompile = False
    monkeypatch.undo()
    return steps


@pytest.mark.slow  # inductor's first compilation: ~30 s of CPU, longer on a loaded machine
def test_compiled_steps_give_the_eager_losses_with_one_static_shape(monkeypatch) -> None:
    epochs = 3
    eager = run_epochs(False, epochs, monkeypatch)
    compiled = run_epochs(True, epochs, monkeypatch)
    assert len(eager) == len(compiled) == 3 * epochs
    for e, c in zip(eager, compiled):
        assert e["index"] == c["index"]  # the same draws, batch for batch
        assert e.keys() == c.keys() and {"ce", "logit", "feat", "loss"} <= e.keys()
        for name in ("ce", "logit", "feat", "loss"):
            assert c[name] == pytest.approx(e[name], rel=1e-4, abs=1e-5), (name, e, c)
    assert not any(e["compiled"] for e in eager)
    for epoch in range(epochs):
        steps = compiled[3 * epoch : 3 * epoch + 3]
        # full batches through the compiled step, the partial one eagerly: one static shape, no recompile
        assert [(s["compiled"], len(s["index"])) for s in steps] == [(True, BATCH), (True, BATCH), (False, 8)]
        assert sorted(i for s in steps for i in s["index"]) == list(range(N))  # every sample once


def test_compile_flag_reaches_the_run_and_is_off_by_default(monkeypatch, tmp_path) -> None:
    seen: list[TrainConfig] = []
    monkeypatch.setattr(pipelines.train, "run_train", lambda cfg, reporter: seen.append(cfg) or {
        "best_top1": 0.0, "last_top1": 0.0})
    for flags in ([], ["--compile"]):
        result = CliRunner().invoke(app, ["train", "--student", "resnet8", "--dataset", "digits", "--quiet",
                                          "--out", str(tmp_path), *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert [cfg.compile for cfg in seen] == [False, True]


def test_optimizer_updates_all_parameters_in_one_multi_tensor_step_on_cpu() -> None:
    cfg = TrainConfig(student="tiny", out="-")
    objective = create_objective("richkd", "kd", "cosine", student_dim=16, teacher_dim=8, clip_dim=4)
    optimizer, _ = pipelines.train.setup_optimizer(cfg, TinyStudent(), objective)
    assert optimizer.defaults["foreach"] is True and optimizer.defaults["fused"] is False
