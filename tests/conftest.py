"""Shared test fixtures: everything runs on CPU, offline, on data the tests make themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests run many tiny batches; on a 2-core machine shared with other work, one intra-op thread is
# many times faster for them than torch's default (thread hand-offs dominate such small kernels).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_cpu() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory) -> None:
    """Per-user memos (image folders' file digests) go to a temporary folder, not the tester's home."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """An untrained resnet8 for the digits' 10 classes: cache plumbing needs outputs, not skill."""
    from richkd_cache.models import create_model, save_checkpoint

    path = tmp_path_factory.mktemp("teacher") / "resnet8.pth"
    save_checkpoint(str(path), create_model("resnet8", 10), arch="resnet8", num_classes=10)
    return path


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory, teacher: Path) -> Path:
    """One complete cache of the bundled digits that tests only read: an untrained resnet8 teacher, the tiny
    random CLIP, prompt sets single and multi, the clean view, and three write blocks of 512 rows."""
    return build_digits(tmp_path_factory.mktemp("digits-cache") / "digits.zarr", teacher)


@pytest.fixture(scope="session")
def digits_logits_cache(tmp_path_factory, teacher: Path) -> Path:
    """`digits_cache` built with --no-features: the same rows without any pooled features (tests only read it)."""
    return build_digits(tmp_path_factory.mktemp("digits-logits") / "digits.zarr", teacher, "--no-features")


def build_digits(out: Path, teacher: Path, *extra: str) -> Path:
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = ["build", "--dataset", "digits", "--teacher-checkpoint", str(teacher), "--clip", "richkd-tiny",
            "--clip-pretrained", "random", "--prompts", "single,multi", "--teacher-views", "clean",
            "--block-rows", "512", "--device", "cpu", "--workers", "0", "--quiet", "--out", str(out), *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out
