"""`richkd-cache quickstart`: the whole pipeline offline on the bundled digits dataset.

teacher (cross-entropy) -> build (teacher + CLIP once) -> three students from the same cache:
cross-entropy only, KD from the teacher, RichKD (teacher fused with CLIP). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pipelines.analyze import render_analysis, run_analyze
from pipelines.build import run_build
from pipelines.config import BuildConfig, TrainConfig
from pipelines.progress import Reporter
from pipelines.summary import cache_summary, render_summary
from pipelines.train import run_train
from richkd_cache.prompts import default_prompt_set

DATASET = "digits"
TEACHER = "resnet20"
STUDENT = "resnet8"
# Clean-only keeps the quickstart to minutes on a laptop CPU; `build`'s default for 32 px data is all 162 views.
QUICKSTART_VIEWS = "clean"
PROMPT_SETS = ("single", "multi", "complex")
# The same numbers on every run: a CPU kernel's multi-threaded sums add their partial results in an order set
# by torch's intra-op thread count (the machine's cores, or OMP_NUM_THREADS), so 1 thread and 2 give other
# losses from the first epoch on, and the gap compounds over a run. The quickstart fixes both:
# the CPU (cuDNN's fastest kernels are not deterministic, and the README's numbers are CPU numbers) and 2
# threads (the README's 2-core machine; on fewer cores the same sums are just slower).
QUICKSTART_DEVICE = "cpu"
QUICKSTART_THREADS = 2
STUDENT_TARGETS = (("ce", "cross-entropy only"), ("kd", "KD from the teacher"), ("richkd", "RichKD (teacher + CLIP)"))


def run_quickstart(
    out: str,
    epochs: int,
    teacher_epochs: int,
    clip: str,
    clip_checkpoint: str | None,
    reporter: Reporter,
    console: Console,
) -> list[dict]:
    with fixed_threads(QUICKSTART_THREADS):
        return quickstart_steps(Path(out), epochs, teacher_epochs, clip, clip_checkpoint, reporter, console)


@contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quickstart_steps(root: Path, epochs: int, teacher_epochs: int, clip: str, clip_checkpoint: str | None,
                     reporter: Reporter, console: Console) -> list[dict]:
    console.print(f"[bold]1/3[/bold] training a {TEACHER} teacher on the bundled {DATASET} dataset")
    teacher = run_train(short_run(TEACHER, root / "teacher", teacher_epochs, reporter.quiet), reporter)
    console.print(f"    teacher best top-1 {teacher['best_top1']:.2f}%")

    console.print(f"[bold]2/3[/bold] building the cache: teacher + CLIP {clip} run once over the training split, "
                  f"both on the clean view only (--teacher-views {QUICKSTART_VIEWS}; build's default for 32 px data, "
                  "all 162 crop+flip views, runs the teacher 162 times per image)")
    cache = run_build(build_config(root, clip, clip_checkpoint), reporter)
    render_summary(cache_summary(cache, alpha=0.7), console)

    console.print(f"[bold]3/3[/bold] training {STUDENT} students from the cache")
    results = []
    for target, label in STUDENT_TARGETS:
        cfg = short_run(STUDENT, root / f"student-{target}", epochs, reporter.quiet, cache=cache, target=target)
        results.append({"label": label, **run_train(cfg, reporter)})
    print_results(results, console)
    analysis = run_analyze(cache, default_prompt_set(list(PROMPT_SETS)), 0.7, str(root / "analysis"))
    render_analysis(analysis, console)
    explain_clip_weights(clip, clip_checkpoint, console)
    return results


def short_run(arch: str, out: Path, epochs: int, quiet: bool, cache: str | None = None, target: str | None = None) -> TrainConfig:
    """mdistiller's recipe compressed to a few epochs: lr x0.1 at 60 % and 80 % of the run."""
    milestones = tuple(sorted({max(1, int(epochs * 0.6)), max(1, int(epochs * 0.8))}))
    return TrainConfig(
        student=arch, out=str(out), cache=cache, dataset=DATASET, target=target, epochs=epochs,
        batch_size=64, lr=0.05, milestones=milestones, workers=0, quiet=quiet, overwrite=True,  # a re-run replaces its own runs
        device=QUICKSTART_DEVICE,
    )


def build_config(root: Path, clip: str, clip_checkpoint: str | None) -> BuildConfig:
    # The teacher is retrained on every quickstart run, so an older cache is replaced, not resumed.
    return BuildConfig(
        dataset=DATASET, data_root=None, split="train", teacher=None,
        teacher_checkpoint=str(root / "teacher" / "last.pth"), clip=clip,
        clip_pretrained=None if clip_checkpoint else "random", clip_checkpoint=clip_checkpoint,
        prompts=PROMPT_SETS, out=str(root / f"{DATASET}.zarr"),
        batch_size=256, workers=0, overwrite=True, teacher_views=QUICKSTART_VIEWS, device=QUICKSTART_DEVICE,
    )


def print_results(results: list[dict], console: Console) -> None:
    table = Table(title=f"{STUDENT} students on {DATASET} (val top-1 %)")
    for col in ("student trained with", "best", "last"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["label"], f"{r['best_top1']:.2f}", f"{r['last_top1']:.2f}")
    console.print(table)


def explain_clip_weights(clip: str, clip_checkpoint: str | None, console: Console) -> None:
    if clip_checkpoint:
        return
    console.print(
        f"[yellow]Note:[/yellow] CLIP ({clip}) has RANDOM weights here, because no weights can be downloaded "
        "offline: its zero-shot accuracy is chance level and it cannot improve the student. For real weights, "
        "download them once (e.g. open_clip's ViT-B-32 'openai' file) and run "
        "`richkd-cache quickstart --clip ViT-B/32 --clip-checkpoint FILE`."
    )
