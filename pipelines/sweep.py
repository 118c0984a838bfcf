"""`richkd-cache sweep`: a grid of stage-two runs from one cache, resumable run by run.

With the teacher and CLIP cached, every setting that acts after their forward passes (alpha, the prompt
set, T, lambda, the loss weights, the method) costs one plain training run to try. A sweep is the grid
of those settings times the seeds; each point trains into OUT/<setting=value,...>/seed<S>, a finished run
is never trained again, and an interrupted one continues from its resume.pth. It ends with the table of
`compare` (mean +- std over seeds) and a plot of top-1 against each swept value.

`jobs` > 1 trains that many runs at once, each in its own process (its own CUDA context, its own copy of
the cached targets): on a GPU that one small student leaves mostly idle, several runs share it. Each run
is the same whatever the number of jobs (its seed, its folder), so a sweep may be resumed with another.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.config import TrainConfig, check_range, check_types, logit_params, short
from pipelines.optim import OPTIMIZERS, SCHEDULES
from pipelines.progress import Reporter
from pipelines.run_folder import write_json
from pipelines.summary import mean_std
from pipelines.train import run_train
from richkd_cache.distill import FEATURE_LOSSES, TARGETS
from richkd_cache.distill.adaptive import parse_alpha
from richkd_cache.errors import ConfigError
from richkd_cache.files import atomic_path
from richkd_cache.models import create_model

# Settings a sweep cannot vary: where it runs, what it reads (one cache, one dataset), run control, the seed
# (swept by --seeds); every other train setting can be swept.
FIXED = ("out", "cache", "dataset", "data_root", "device", "cache_device", "stream_window", "workers", "online",
         "compile", "teacher_checkpoint", "clip_checkpoint", "resume", "overwrite", "quiet", "extra", "seed",
         "method_params", "log", "log_every")
SWEEPABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in FIXED)
MILESTONE_SETS = "/"
# Settings a sweep folder may be resumed with other values of: they change no run's numbers.
NOT_IN_SPEC = ("out", "quiet", "resume", "log", "log_every")  # --milestones 150,180,210/20,25: two sets of milestones


@dataclass(frozen=True)
class Sweep:
    base: TrainConfig  # every fixed setting; base.out is the sweep's folder
    axes: dict[str, tuple[Any, ...]]  # swept setting -> its values, in the order given
    seeds: tuple[int, ...]

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the swept values, the first axis varying slowest."""
        names = list(self.axes)
        return [dict(zip(names, values)) for values in itertools.product(*self.axes.values())]

    def spec(self) -> dict:
        fixed = {k: v for k, v in dataclasses.asdict(self.base).items() if k not in NOT_IN_SPEC}
        return {"axes": {k: list(v) for k, v in self.axes.items()}, "seeds": list(self.seeds), "fixed": fixed}

    def config(self, point: dict[str, Any], seed: int) -> TrainConfig:
        """The run of one grid point and seed, in OUT/<point>/seed<S>. A point training no logit loss (target
        ce) drops the method's settings, as `train --target ce` does."""
        cfg = replace(self.base, **point, seed=seed, out=str(Path(self.base.out) / run_name(point) / f"seed{seed}"))
        if cfg.resolved_target == "ce":
            cfg = replace(cfg, temperature=None, beta=None, method_params={})
        return cfg


def check_sweepable(name: str, flag: str) -> None:
    if name not in SWEEPABLE:
        raise ConfigError(f"cannot sweep {flag}; sweepable: {', '.join(SWEEPABLE)}")


def parse_axis(name: str, text: str) -> tuple[Any, ...]:
    """A comma list of one TrainConfig field's values, converted to that field's type ("none" for off);
    milestones take sets separated by '/' (each a comma list; none: no decay)."""
    flag = f"--{name.replace('_', '-')}"
    check_sweepable(name, flag)
    items = text.split(MILESTONE_SETS) if name == "milestones" else text.split(",")
    values = tuple(parse_value(name, item.strip(), flag, text) for item in items)
    check_values(name, values, flag)
    return values


def parse_value(name: str, item: str, flag: str, text: str) -> Any:
    """One value of setting `name` from its text, by the field's type."""
    kind = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}[name]
    if not item:
        raise ConfigError(f"{flag} {text!r} has an empty value")
    if name == "alpha":
        return parse_alpha(item)
    if name == "milestones":
        if item == "none":
            return ()
        try:
            return tuple(int(v) for v in item.split(","))
        except ValueError:
            raise ConfigError(f"{flag} takes comma-separated epochs, sets of them separated by "
                              f"'{MILESTONE_SETS}' (e.g. 150,180,210/20,25), not {item!r}") from None
    if kind.startswith(("float", "int")):
        try:
            return int(item) if kind.startswith("int") else float(item)
        except ValueError:
            what = "integers" if kind.startswith("int") else "numbers"
            raise ConfigError(f"{flag} takes {what}, not {item!r}") from None
    if kind == "bool":
        if item not in ("true", "false"):
            raise ConfigError(f"{flag} takes true or false, not {item!r}")
        return item == "true"
    return None if item == "none" else item


def check_values(name: str, values: tuple[Any, ...], flag: str) -> None:
    if not values:
        raise ConfigError(f"{flag} lists no value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} lists a value twice: {', '.join(map(show_value, values))}")


def file_axes(table: Any, where: str) -> dict[str, tuple[Any, ...]]:
    """A --config file's [sweep] table: setting -> the list of its values (milestones: a list of lists)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: sweep must be a table of SETTING = [values]")
    axes = {}
    for name, values in table.items():
        check_sweepable(name, f"{name} ({where}, [sweep])")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: [sweep] {name} must be a list of values, got {short(values)}")
        values = tuple(tuple(v) if isinstance(v, list) else None if v == "none" else v for v in values)
        for value in values:
            check_types({name: value}, f"{where}, [sweep]")
        check_values(name, values, f"[sweep] {name}")
        axes[name] = values
    return axes


def show_value(value: Any) -> str:
    """A swept value as a folder name and a table cell: milestones 20-25, none for a loss switched off."""
    if isinstance(value, tuple):
        return "-".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def run_name(point: dict[str, Any]) -> str:
    """The folder of one grid point, e.g. `alpha=0.6,prompts=multi` or `milestones=20-25`."""
    return ",".join(f"{k}={show_value(v)}" for k, v in point.items()) or "base"


def run_sweep(sweep: Sweep, reporter: Reporter, jobs: int = 1) -> dict:
    """Train every (point, seed) not finished yet, `jobs` at a time, then tabulate and plot. Returns the results."""
    check_range("jobs", jobs)
    root = Path(sweep.base.out)
    runs = [(point, sweep.config(point, seed)) for point in sweep.points() for seed in sweep.seeds]
    for _, cfg in runs[:: len(sweep.seeds)]:  # a setting one point cannot train with fails now, not runs later
        check_point(cfg)
    check_spec(root, sweep)
    # resume=True: a run interrupted by a kill continues from its resume.pth (same settings or refused)
    todo = [(f"{i}/{len(runs)}: {run_name(point)} seed {cfg.seed}", replace(cfg, resume=True))
            for i, (point, cfg) in enumerate(runs, 1)]
    todo = [(label, cfg) for label, cfg in todo if not finished(Path(cfg.out), cfg.epochs)]
    if jobs == 1 or len(todo) <= 1:
        for label, cfg in todo:
            reporter.info(f"sweep run {label}")
            run_train(cfg, reporter)
    else:
        train_at_once(todo, jobs, reporter)
    results = collect(root, sweep)
    write_json(root / "sweep.json", {**sweep.spec(), "results": results})
    plot = root / "sweep.png" if sweep.axes else None  # seeds alone: a table, nothing to plot against
    if plot:
        plot_sweep(results, sweep, plot)
    return {"out": str(root), "results": results, "plot": str(plot) if plot else None}


def check_point(cfg: TrainConfig) -> None:
    """What a grid point names, checked without data: its target, method and the method's settings, its
    feature loss, optimiser, schedule and student (a throwaway build names an unknown one)."""
    if cfg.resolved_target not in TARGETS:
        raise ConfigError(f"unknown target {cfg.resolved_target!r}; valid: {', '.join(TARGETS)}")
    logit_params(cfg)
    if cfg.feature_loss is not None and cfg.feature_loss not in FEATURE_LOSSES:
        raise ConfigError(f"unknown feature loss {cfg.feature_loss!r}; valid: {', '.join(FEATURE_LOSSES)}")
    for kind, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if getattr(cfg, kind) not in valid:
            raise ConfigError(f"unknown {kind} {getattr(cfg, kind)!r}; valid: {', '.join(valid)}")
    create_model(cfg.student, num_classes=2)


def train_at_once(todo: list[tuple[str, TrainConfig]], jobs: int, reporter: Reporter) -> None:
    """Train the runs in `jobs` processes. The first failure stops the sweep: runs not started are
    dropped, runs under way finish, and the failure is raised here with its own message. A kill stops
    every process; each unfinished run resumes from its resume.pth."""
    threads = max(1, (os.cpu_count() or 1) // jobs)  # CPU runs split the cores instead of oversubscribing them
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds CUDA or torch threads
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
        futures: dict[Future, str] = {pool.submit(train_quietly, cfg, threads): label for label, cfg in todo}
        reporter.info(f"sweep: {len(todo)} runs, {min(jobs, len(todo))} at a time")
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                reporter.info(f"sweep run {futures[future]} done")


def train_quietly(cfg: TrainConfig, threads: int) -> None:
    """One run in a worker process (its progress bars off: several would interleave)."""
    import torch

    torch.set_num_threads(threads)
    run_train(cfg, Reporter(quiet=True))


def check_spec(root: Path, sweep: Sweep) -> None:
    """A sweep folder belongs to one grid: re-running the same command resumes it, another is refused."""
    saved = root / "sweep.spec.json"
    spec = json.loads(json.dumps(sweep.spec(), default=str))
    if saved.exists():
        if json.loads(saved.read_text()) != spec:
            raise ConfigError(f"{root} holds a sweep with other settings; re-run that sweep's command or use another --out")
        return
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty and holds no sweep; choose another --out")
    write_json(saved, spec)


def finished(folder: Path, epochs: int) -> bool:
    path = folder / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("epochs") == epochs


def collect(root: Path, sweep: Sweep) -> list[dict]:
    """One row per grid point: its values, best and last top-1 per seed and as mean +- std."""
    rows = []
    for point in sweep.points():
        summaries = [json.loads((root / run_name(point) / f"seed{s}" / "summary.json").read_text())
                     for s in sweep.seeds]
        best = [s["best_top1"] for s in summaries]
        last = [s["last_top1"] for s in summaries]
        rows.append({**point, "run": run_name(point), "best_top1": best, "last_top1": last,
                     "best": mean_std(best), "last": mean_std(last)})
    return rows


def plot_sweep(results: list[dict], sweep: Sweep, path: Path) -> None:
    """One panel per swept setting: best top-1 (mean, with the seeds' std as error bars) against its values,
    one line per combination of the other settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(sweep.axes)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = list(sweep.axes[name])
        others = [n for n in names if n != name]
        for key in sorted({tuple(r[n] for n in others) for r in results}, key=str):
            rows = [next(r for r in results if r[name] == v and tuple(r[n] for n in others) == key) for v in values]
            means = [float(np.mean(r["best_top1"])) for r in rows]
            stds = [float(np.std(r["best_top1"], ddof=1)) if len(r["best_top1"]) > 1 else 0.0 for r in rows]
            label = ", ".join(f"{n}={k}" for n, k in zip(others, key)) or None
            ax.errorbar(range(len(values)), means, yerr=stds, marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(values)), [show_value(v) for v in values])
        ax.set_xlabel(name)
        ax.set_ylabel("best val top-1 (%)")
        if others:
            ax.legend(fontsize=7)
    fig.suptitle(f"{sweep.base.student}: top-1 over {len(sweep.seeds)} seed(s)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
