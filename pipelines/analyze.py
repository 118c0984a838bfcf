"""`richkd-cache analyze`: how the teacher, CLIP and their fusion compare, from the cache alone.

Everything is computed from each model's cached clean view of the cached split: no model runs. It
reproduces the paper's analyses for any cache: accuracies and the alpha sweep, the confidence
categories of Fig. 1a, the outcome changes of the supplement's Table 10, calibration, the
supplement's optimal fusion weight alpha* (Sec. 9), its value per class, and what each adaptive
fusion rule (`train --alpha auto | per-class | confidence`) does to fused top-1 and calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from cache_store import CacheReader, open_cache
from pipelines.cached import clean_view
from pipelines.config import check_range
from richkd_cache.clip_logits import clip_logits, ensemble_logits
from richkd_cache.distill import fuse_logits
from richkd_cache.distill.adaptive import ALPHA_RULES, class_alphas, error_sums, row_alphas
from richkd_cache.errors import DataError
from richkd_cache.metrics import (
    alpha_sweep,
    confidence_categories,
    error_statistics,
    expected_calibration_error,
    fusion_weight,
    outcome_changes,
    topk_accuracy,
)
from richkd_cache.prompts import default_prompt_set

SWEEP = tuple(round(0.05 * i, 2) for i in range(21))  # alpha = 0, 0.05, ..., 1
CONFIDENT = 0.5  # Fig. 1a: a prediction is confident when its top softmax probability is at least this
ECE_BINS = 15
MODELS = ("teacher", "clip", "fusion")
CATEGORIES = ("confident_correct", "confident_wrong", "uncertain_correct", "uncertain_wrong")


def run_analyze(url: str, prompts: str | None, alpha: float, out_dir: str | None,
                clip_model: str | None = None) -> dict:
    """A JSON-ready analysis of one cache at fusion weight alpha (eq. 4) with the CLIP model(s) `clip_model`
    names (as `train --clip-model`: one, A+B or ensemble); with out_dir, also the plots alpha_sweep.png,
    reliability.png and categories.png there (their paths under "plots")."""
    check_range("alpha", alpha)
    reader = open_cache(url)
    models = reader.select_clip(clip_model)
    if not (prompts or reader.prompt_sets_of(models)):
        raise DataError(f"cache {url} stores no prompt set for {' and '.join(models)}; add one with "
                        "`richkd-cache prompts add`")
    prompt_set = prompts or default_prompt_set(reader.prompt_sets_of(models))  # the default `train` uses too
    labels, logits = clean_logits(reader, prompt_set, alpha, models)
    sweep = [{"alpha": a, "top1": top1} for a, top1 in alpha_sweep(logits["teacher"], logits["clip"], labels, SWEEP)]
    errors = error_statistics(logits["teacher"], logits["clip"], labels)
    sums = error_sums(logits["teacher"], logits["clip"], labels)  # (C, 6): alpha* per class and overall
    calibration = {}
    for name, z in logits.items():
        ece, bins = expected_calibration_error(z.softmax(dim=1), labels, ECE_BINS)
        calibration[name] = {"ece": ece, "bins": bins}
    result = {
        "url": url,
        "dataset": {k: reader.manifest["dataset"].get(k) for k in ("name", "split", "num_samples", "num_classes")},
        "prompt_set": prompt_set,
        "clip_models": models,
        "alpha": alpha,
        "accuracy": {name: {"top1": topk_accuracy(z, labels, 1), "top5": topk_accuracy(z, labels, 5)}
                     for name, z in logits.items()},
        "alpha_sweep": sweep,
        "best_alpha": max(sweep, key=lambda row: row["top1"]),  # the smallest alpha among ties
        "optimal_alpha": {"alpha": fusion_weight(errors["s_t"], errors["s_c"], errors["rho"]), **errors},
        "confidence_threshold": CONFIDENT,
        "categories": {name: confidence_categories(z, labels, CONFIDENT) for name, z in logits.items()},
        "outcome_changes": outcome_changes(logits["teacher"], logits["fusion"], labels),
        "calibration": calibration,
        "class_alpha": class_alpha_rows(reader, logits, labels, sums),
        "adaptive": adaptive_rules(logits, labels, sums, calibration["fusion"]["ece"]),
        "plots": [],
    }
    if out_dir is not None:
        result["plots"] = write_plots(result, Path(out_dir))
    return result


def clean_logits(reader: CacheReader, prompt_set: str, alpha: float,
                 models: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Labels (N,) and the clean view's logits (N, C) float32 of the teacher (rebuilt from top-k when
    that is all the cache stores), CLIP (eq. 2-3; several models: their ensemble) and their fusion at
    alpha (eq. 4)."""
    labels, z_t, embeds = clean_view(reader, models)
    z_c = ensemble_logits([clip_logits(embeds[m], torch.from_numpy(reader.text_embeddings(prompt_set, m)),
                                       reader.clip_records[m]["tau"]) for m in models])
    return labels, {"teacher": z_t, "clip": z_c, "fusion": fuse_logits(z_t, z_c, alpha)}


def class_alpha_rows(reader: CacheReader, logits: dict[str, torch.Tensor], labels: torch.Tensor,
                     sums: torch.Tensor) -> list[dict]:
    """alpha* of each class from its own rows (what `--alpha per-class` trains with), with the class's
    teacher and CLIP top-1."""
    alphas = class_alphas(sums)
    names = reader.manifest["dataset"].get("classes") or [str(k) for k in range(len(alphas))]
    rows = []
    for k, name in enumerate(names):
        member = labels == k
        rows.append({"class": name, "alpha": float(alphas[k]), "samples": int(member.sum()),
                     **{f"{m}_top1": topk_accuracy(logits[m][member], labels[member], 1) if member.any() else float("nan")
                        for m in ("teacher", "clip")}})
    return rows


def adaptive_rules(logits: dict[str, torch.Tensor], labels: torch.Tensor, sums: torch.Tensor,
                   fixed_ece: float) -> list[dict]:
    """Fused top-1 and ECE under each adaptive rule, beside the fixed alpha's fusion."""
    rows = [{"rule": "fixed", "mean_alpha": None, "top1": topk_accuracy(logits["fusion"], labels, 1), "ece": fixed_ece}]
    for rule in ALPHA_RULES:
        alphas = row_alphas(rule, logits["teacher"], logits["clip"], labels, sums)
        fused = fuse_logits(logits["teacher"], logits["clip"], alphas[:, None])  # eq. 4, one alpha per row
        ece, _ = expected_calibration_error(fused.softmax(dim=1), labels, ECE_BINS)
        rows.append({"rule": rule, "mean_alpha": float(alphas.mean()), "top1": topk_accuracy(fused, labels, 1), "ece": ece})
    return rows


# ---------------------------------------------------------------- plots


def write_plots(result: dict, out: Path) -> list[str]:
    """Three PNGs in out; matplotlib's object API (no pyplot), so no global backend state is touched."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw, width in (("alpha_sweep", plot_sweep, 6.4), ("reliability", plot_reliability, 12.0),
                              ("categories", plot_categories, 6.4)):
        fig = Figure(figsize=(width, 4.2), layout="constrained")
        draw(fig, result)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        paths.append(str(path))
    return paths


def plot_sweep(fig: Figure, result: dict) -> None:
    """Fused top-1 against alpha, with the chosen alpha, the best one and the supplement's alpha*."""
    ax = fig.add_subplot()
    alphas = [row["alpha"] for row in result["alpha_sweep"]]
    ax.plot(alphas, [row["top1"] for row in result["alpha_sweep"]], marker="o", label="fused top-1")
    for x, style, label in ((result["alpha"], ":", f"alpha = {result['alpha']:.2f}"),
                            (result["best_alpha"]["alpha"], "--", f"best = {result['best_alpha']['alpha']:.2f}"),
                            (result["optimal_alpha"]["alpha"], "-.", f"alpha* = {result['optimal_alpha']['alpha']:.2f}")):
        ax.axvline(x, linestyle=style, color="gray", label=label)
    ax.set(xlabel="alpha (weight of the teacher, eq. 4)", ylabel="top-1 (%)",
           title=f"fusion with CLIP ({result['prompt_set']} prompts)")
    ax.legend()


def plot_reliability(fig: Figure, result: dict) -> None:
    """One reliability diagram per model: accuracy per confidence bin against the diagonal."""
    axes = fig.subplots(1, len(MODELS), sharey=True)
    for ax, name in zip(axes, MODELS):
        calib = result["calibration"][name]
        full = [b for b in calib["bins"] if b["count"]]
        ax.bar([b["lower"] for b in full], [b["accuracy"] for b in full],
               width=[b["upper"] - b["lower"] for b in full], align="edge", edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{name}: ECE {100 * calib['ece']:.2f}%")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")


def plot_categories(fig: Figure, result: dict) -> None:
    """Fig. 1a: counts per confidence category, side by side for the three models."""
    ax = fig.add_subplot()
    width = 0.8 / len(MODELS)
    positions = np.arange(len(CATEGORIES))
    for i, name in enumerate(MODELS):
        counts = [result["categories"][name][c] for c in CATEGORIES]
        ax.bar(positions + (i - (len(MODELS) - 1) / 2) * width, counts, width, label=name)
    ax.set_xticks(positions, [c.replace("_", "\n") for c in CATEGORIES])
    ax.set(ylabel="samples", title=f"confidence (top probability >= {result['confidence_threshold']}) and correctness")
    ax.legend()


# ---------------------------------------------------------------- console


def render_analysis(result: dict, console: Console) -> None:
    ds = result["dataset"]
    console.print(f"[bold]{result['url']}[/bold]  {ds['name']} / {ds['split']}: {ds['num_samples']} samples, "
                  f"{ds['num_classes']} classes; CLIP {' + '.join(result['clip_models'])}; prompt set {result['prompt_set']}, "
                  f"alpha {result['alpha']}")
    console.print(accuracy_table(result))
    best, optimal = result["best_alpha"], result["optimal_alpha"]
    console.print(f"best alpha {best['alpha']:.2f} (fused top-1 {best['top1']:.2f}%);  alpha* {optimal['alpha']:.3f} "
                  f"(s_t {optimal['s_t']:.4f}, s_c {optimal['s_c']:.4f}, rho {optimal['rho']:.3f})")
    if optimal["alpha"] >= 0.9 and ds["split"] == "train":
        console.print(f"alpha* is {optimal['alpha']:.2f}, nearly the teacher alone: on its training split the teacher "
                      "is rarely wrong (it was fitted to these images), so its errors look small beside CLIP's; "
                      "alpha* over held-out images (a cache of the val split) says more")
    console.print(sweep_table(result))
    console.print(adaptive_table(result))
    console.print(class_alpha_table(result))
    console.print(categories_table(result))
    console.print(outcomes_table(result))
    for path in result["plots"]:
        console.print(f"plot: {path}")


def accuracy_table(result: dict) -> Table:
    table = Table(title="on the cached split (clean view)")
    for col in ("model", "top-1 %", "top-5 %", "ECE %"):
        table.add_column(col, justify="right")
    for name in MODELS:
        acc = result["accuracy"][name]
        table.add_row(name, f"{acc['top1']:.2f}", f"{acc['top5']:.2f}", f"{100 * result['calibration'][name]['ece']:.2f}")
    return table


def sweep_table(result: dict) -> Table:
    table = Table(title="fused top-1 % by alpha (eq. 4)")
    for row in result["alpha_sweep"][::2]:  # every 0.1: fits a terminal's width
        table.add_column(f"{row['alpha']:.1f}", justify="right")
    table.add_row(*(f"{row['top1']:.1f}" for row in result["alpha_sweep"][::2]))
    return table


def adaptive_table(result: dict) -> Table:
    table = Table(title="adaptive fusion rules (train --alpha RULE)")
    for col in ("rule", "mean alpha", "fused top-1 %", "ECE %"):
        table.add_column(col, justify="right")
    for row in result["adaptive"]:
        mean = f"{result['alpha']:.3f}" if row["mean_alpha"] is None else f"{row['mean_alpha']:.3f}"
        table.add_row(row["rule"], mean, f"{row['top1']:.2f}", f"{100 * row['ece']:.2f}")
    return table


def class_alpha_table(result: dict, shown: int = 5) -> Table:
    """The classes where the teacher is trusted least and most (all of them are in the JSON output)."""
    rows = sorted(result["class_alpha"], key=lambda r: r["alpha"])
    picked = rows if len(rows) <= 2 * shown else rows[:shown] + rows[-shown:]
    table = Table(title=f"alpha* per class ({'all' if picked is rows else f'lowest and highest {shown}'})")
    for col in ("class", "alpha*", "samples", "teacher top-1 %", "CLIP top-1 %"):
        table.add_column(col, justify="right")
    for r in picked:
        table.add_row(r["class"], f"{r['alpha']:.3f}", str(r["samples"]), f"{r['teacher_top1']:.1f}", f"{r['clip_top1']:.1f}")
    return table


def categories_table(result: dict) -> Table:
    table = Table(title=f"confidence categories (Fig. 1a; confident: top probability >= {result['confidence_threshold']})")
    table.add_column("model")
    for c in CATEGORIES:
        table.add_column(c.replace("_", " "), justify="right")
    for name in MODELS:
        table.add_row(name, *(str(result["categories"][name][c]) for c in CATEGORIES))
    return table


def outcomes_table(result: dict) -> Table:
    table = Table(title="teacher -> fusion outcome changes (supplement, Table 10)")
    for col in ("condition", "base", "count", "%"):
        table.add_column(col, justify="right")
    for name, row in result["outcome_changes"].items():
        table.add_row(name.replace("_", " "), str(row["base"]), str(row["count"]), f"{row['percent']:.1f}")
    return table
