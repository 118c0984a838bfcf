"""Optimisers and schedules by name: LG's AdamW + warmed-up cosine for ViT students, mdistiller's SGD steps."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.optim import make_optimizer, make_schedule
from pipelines.train import evaluate
from richkd_cache.errors import ConfigError
from richkd_cache.models import create_model


def lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()  # no gradients: only keeps torch's order check quiet
        scheduler.step()
    return out


def test_cosine_with_warmup_is_timms_scheduler_as_lg_steps_it() -> None:
    # LG (pycls/core/optimizer.py): CosineLRScheduler(t_initial=MAX_EPOCH, lr_min=MIN_LR, warmup_t=WARMUP_EPOCHS,
    # warmup_lr_init=WARMUP_FACTOR * BASE_LR), stepped once per epoch
    ours = make_schedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4), "cosine", 300, (), 0.1,
                         20, 5e-6)
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    reference = CosineLRScheduler(reference_opt, t_initial=300, lr_min=5e-6, warmup_t=20, warmup_lr_init=5e-7)
    expected = []
    for epoch in range(300):
        reference.step(epoch)
        expected.append(reference_opt.param_groups[0]["lr"])
    assert lrs(ours, 300) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_step_schedule_is_mdistillers() -> None:
    optimizer = make_optimizer("sgd", [torch.nn.Linear(2, 2)], 0.05, 0.9, 5e-4)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["weight_decay"] == 5e-4
    got = lrs(make_schedule(optimizer, "step", 240, (150, 180, 210), 0.1, 0, 0.0), 240)
    assert got[149] == pytest.approx(0.05) and got[150] == pytest.approx(0.005) and got[239] == pytest.approx(5e-5)


def test_adamw_skips_decay_on_biases_norms_tokens_and_positions() -> None:
    model = create_model("timm:deit_tiny_patch16_224", 10)
    optimizer = make_optimizer("adamw", [model], 5e-4, 0.9, 0.05)
    decayed, free = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and free["weight_decay"] == 0.0
    free_names = {names[id(p)] for p in free["params"]}
    assert {"cls_token", "pos_embed", "head.bias", "norm.weight", "blocks.0.attn.qkv.bias"} <= free_names
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decayed["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))


def test_unknown_names_and_bad_warmups_are_one_line() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'; valid: sgd, adamw"):
        make_optimizer("adam", [torch.nn.Linear(1, 1)], 0.1, 0.9, 0.0)
    with pytest.raises(ConfigError, match="unknown schedule 'poly'"):
        make_schedule(torch.optim.SGD(params, lr=0.1), "poly", 10, (), 0.1, 0, 0.0)
    with pytest.raises(ConfigError, match="warmup_epochs must be in"):
        make_schedule(torch.optim.SGD(params, lr=0.1), "cosine", 10, (), 0.1, 10, 0.0)
    with pytest.raises(ConfigError, match="goes with schedule"):
        make_schedule(torch.optim.SGD(params, lr=0.1), "step", 10, (5,), 0.1, 2, 0.0)


def test_a_resumed_adamw_cosine_run_equals_a_straight_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def train(out: Path, *extra: str) -> CliRunner:
        args = ["train", "--dataset", "digits", "--student", "resnet8", "--fraction", "0.1", "--batch-size", "32",
                "--device", "cpu", "--workers", "0", "--quiet", "--optimizer", "adamw", "--lr", "1e-3",
                "--weight-decay", "0.05", "--schedule", "cosine", "--warmup-epochs", "1", "--min-lr", "1e-5",
                "--epochs", "3", "--out", str(out), *extra]
        return CliRunner().invoke(app, args)

    assert train(tmp_path / "straight").exit_code == 0
    evaluations = []

    def dies_in_the_third_epoch(*args):
        evaluations.append(1)
        if len(evaluations) == 3:
            raise KeyboardInterrupt  # after two epochs were saved
        return evaluate(*args)

    monkeypatch.setattr("pipelines.train.evaluate", dies_in_the_third_epoch)
    assert train(tmp_path / "crashed").exit_code != 0
    monkeypatch.undo()
    result = train(tmp_path / "crashed", "--resume")
    assert result.exit_code == 0, result.output
    straight, resumed = (pq.read_table(tmp_path / run / "metrics.parquet").to_pylist() for run in ("straight", "crashed"))
    cosine = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * e / 3)) for e in (1, 2)]
    assert [r["lr"] for r in resumed] == pytest.approx([1e-6, *cosine])  # warm-up from lr x 0.001, then the cosine
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
