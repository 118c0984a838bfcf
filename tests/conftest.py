"""Shared test fixtures: everything runs on CPU, offline, on data the tests make themselves."""

from __future__ import annotations

import os

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
