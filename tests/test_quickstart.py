"""The quickstart's numbers are the same on every run: its training does not depend on the thread count."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from pipelines.progress import Reporter
from pipelines.quickstart import QUICKSTART_THREADS, STUDENT, fixed_threads, short_run
from pipelines.train import run_train


def one_epoch(out: Path, ambient: int, pinned: bool) -> list[float]:
    """The quickstart's student run (a tenth of the digits, one epoch) in an environment of `ambient` threads
    (the machine's cores, or OMP_NUM_THREADS), inside the quickstart's fixed count or not; its losses."""
    cfg = dataclasses.replace(short_run(STUDENT, out, 1, quiet=True), fraction=0.1)
    with fixed_threads(ambient), fixed_threads(QUICKSTART_THREADS) if pinned else nullcontext():
        run_train(cfg, Reporter(Console(), quiet=True))
        assert torch.get_num_threads() == (QUICKSTART_THREADS if pinned else ambient)
    return [row["loss"] for row in pq.read_table(out / "metrics.parquet").to_pylist()]


@pytest.mark.slow  # four one-epoch runs: ~20 s on an idle 2-core CPU
def test_the_quickstart_trains_to_the_same_bits_whatever_the_machines_thread_count(tmp_path: Path) -> None:
    # the cause: one thread and two add a kernel's partial sums in another order
    assert one_epoch(tmp_path / "1", 1, pinned=False) != one_epoch(tmp_path / "2", 2, pinned=False)
    # the fix: the quickstart fixes the count, so a 1-thread and a 3-thread environment train alike
    assert one_epoch(tmp_path / "p1", 1, pinned=True) == one_epoch(tmp_path / "p3", 3, pinned=True)
