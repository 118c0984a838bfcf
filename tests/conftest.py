"""Shared test fixtures: everything runs on CPU, offline, on data the tests make themselves."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_cpu() -> None:
    torch.manual_seed(0)
