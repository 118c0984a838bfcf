"""Shared test fixtures: everything runs on CPU, offline, on data the tests make themselves."""

from __future__ import annotations

import pytest
import torch

# Tests run many tiny batches; on a 2-core machine shared with other work, one intra-op thread is
# many times faster for them than torch's default (thread hand-offs dominate such small kernels).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_cpu() -> None:
    torch.manual_seed(0)
