"""Experiment logs of a run (`train --log tensorboard,wandb,csv`), written beside metrics.parquet.

- metrics.csv: every run, one row per epoch, the same rows as metrics.parquet (run_folder.write_metrics).
- TensorBoard (OUT/tensorboard) and Weights & Biases (OUT/wandb, offline unless WANDB_MODE says otherwise):
  the loss terms (eq. 9, each already weighted) and learning rate under step/, every `log_every` steps the
  mean of those steps' terms (1: each step), and each epoch's row of metrics.parquet under epoch/, all
  against the optimiser step count.

A step's loss terms stay on the device: they are summed there and read back once every FLUSH_STEPS
steps, so logging adds no wait for the GPU per step. Writing a point costs a fraction of a millisecond
of TensorBoard's and W&B's own Python (0.1 and 0.3 ms on a shared CPU machine): hence a point every
`log_every` steps. The step count is kept in metrics.parquet
(column `step`), so a resumed run continues the same axis; TensorBoard hides whatever a killed run had
logged past its last saved epoch (purge_step), so no epoch or step appears twice.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

from pipelines.progress import Reporter
from richkd_cache.errors import ConfigError

LOGGERS = ("tensorboard", "wandb", "csv")  # csv: metrics.csv, written for every run
LOG_DIRS = ("tensorboard", "wandb")  # the folders they write in the run folder
FLUSH_STEPS = 50


def check_loggers(names: tuple[str, ...]) -> None:
    """Refuse an unknown logger, or one whose package is not installed, in one line (before the run starts)."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--log takes {', '.join(LOGGERS)} (any of them, comma-separated), not {name!r}")
        if name != "csv" and not installed(name):
            raise ConfigError(f"--log {name} needs the {name} package: pip install 'richkd-cache[{name}]'")


def installed(package: str) -> bool:
    if package in sys.modules and sys.modules[package] is None:  # blocked (as tests do)
        return False
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


class RunLog:
    """Per-step and per-epoch scalars to TensorBoard and W&B for one run; counts optimiser steps either way."""

    def __init__(self, out: Path, names: tuple[str, ...], settings: dict[str, Any], history: list[dict],
                 optimizer: torch.optim.Optimizer, every: int = 1) -> None:
        self.step = int(history[-1].get("step") or 0) if history else 0  # steps trained before a resume
        self.optimizer, self.every = optimizer, every
        self.term_names: tuple[str, ...] = ()
        self.window: torch.Tensor | None = None  # (T,) the loss terms summed over the steps since the last point
        self.window_steps = 0
        self.pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, (T,) mean loss terms on the device)
        self.tensorboard = tensorboard_writer(out / "tensorboard", self.step) if "tensorboard" in names else None
        self.wandb = wandb_run(out, settings) if "wandb" in names else None

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def log_step(self, terms: dict[str, torch.Tensor]) -> None:
        """One optimisation step: its loss terms (detached 0-d tensors) and the rate it stepped with."""
        self.step += 1
        if not self.active:
            return
        names = tuple(terms)
        if names != self.term_names:
            self.flush()
            self.term_names = names
        # summed now: a CUDA-graph step reuses its outputs' memory on the next step
        values = torch.stack([terms[n].detach().float() for n in names])
        self.window = values if self.window is None else self.window + values
        self.window_steps += 1
        if self.step % self.every == 0:
            self.end_window()
        if len(self.pending) * self.every >= FLUSH_STEPS:
            self.flush()

    def end_window(self) -> None:
        """A point at this step: the mean of the terms since the last one, and the rate it stepped with."""
        if self.window is not None:
            self.pending.append((self.step, self.optimizer.param_groups[0]["lr"], self.window / self.window_steps))
            self.window, self.window_steps = None, 0

    def flush(self) -> None:
        self.end_window()
        if not self.pending:
            return
        rows = torch.stack([v for _, _, v in self.pending]).tolist()  # one read from the device
        for (step, lr, _), row in zip(self.pending, rows):
            self.write({**{f"step/{n}": x for n, x in zip(self.term_names, row)}, "step/lr": lr}, step)
        self.pending.clear()

    def log_epoch(self, row: dict[str, Any]) -> None:
        """An epoch's row of metrics.parquet (numbers only), at the step that ended it."""
        self.flush()
        self.write({f"epoch/{k}": v for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}, self.step)
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def write(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def tensorboard_writer(folder: Path, step: int):
    """An event file in `folder`; anything a killed run logged after step `step` (its last saved epoch) is
    hidden from TensorBoard's readers, so a resumed run's steps replace it instead of doubling it."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder), purge_step=step + 1)


def wandb_run(out: Path, settings: dict[str, Any]):
    """A W&B run under OUT/wandb with the run's config.json as its config. Offline unless WANDB_MODE says
    otherwise (then `wandb sync OUT/wandb/offline-run-*` uploads it); a resumed run continues the same W&B
    run, whose id is kept in OUT/wandb/run-id."""
    import wandb

    folder = out / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run-id"
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    if not run_id.isalnum():  # a missing or edited file: a new W&B run
        run_id = secrets.token_hex(8)
        id_file.write_text(run_id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "richkd-cache"), name=str(out), id=run_id,
                      resume="allow", dir=str(out), config=settings, mode=os.environ.get("WANDB_MODE", "offline"),
                      reinit="finish_previous",
                      settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False))


class LoggingReporter(Reporter):
    """The run's reporter, whose `step` sends each step's loss terms to the run's logs."""

    def __init__(self, reporter: Reporter, log: RunLog) -> None:
        super().__init__(reporter.console, reporter.quiet)
        self.log = log

    def step(self, terms: dict[str, torch.Tensor]) -> None:
        self.log.log_step(terms)
