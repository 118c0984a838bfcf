"""Stage two: step time, whole-epoch time, concurrent seeds and private memory of plain CE vs cached
RichKD vs online RichKD.

Every cached variant goes through the real mapped path: synthetic random rows of a cache's shapes and
dtypes (the teacher's fp16 logits and features per (sample, view), the views' float32 parameters, CLIP's
fp16 L2-normalised embeddings and features per sample) are written as `.npy` files, as the local copy
holds them (cache_store/local.py), opened with `np.load(mmap_mode="r")`, gathered per batch by
`CachedRows` and fused per batch by `StageTwoTargets` (eq. 2-4, 7). A step's cost and a run's memory do not
depend on the rows' values, only on their shapes. The online variant is `train --online`'s source: the
same fusion state, but the teacher runs on every batch's drawn views and CLIP on its clean images.

Step mode (the default; DESIGN.md section 5: cached <= 1.10x CE, online >= 5x cached). All three use the
same student, batch, augmentation and optimiser and the trainer's own `train_step`. Steps are interleaved
round by round so drift on a shared machine hits all three alike; medians are reported.

--epochs: the trainer's own `train_epoch` + `evaluate` on synthetic CIFAR-sized data (50,000 train and
10,000 validation images, batch 64): whole-epoch seconds for CE, cached RichKD (L+F, CRD by default) and
online RichKD, and the projected 240-epoch time (the first epoch, which compiles, + 239 steady ones). The
online epoch is timed on --online-samples samples and scaled to the epoch.

--seeds N: N processes train the cached run at once on one device, against one process alone, all mapping
one shared folder of rows; each times its steady epochs after all have compiled (a file barrier).

--memory: peak private memory (RssAnon + RssShmem over each run's process tree, polled every 20 ms) of
cached RichKD (L+F, CRD, 162 views) minus that of CE on the same data, over the bytes of the compact rows
it trains from (target <= 0.3); then --memory-runs cached runs at once on the same rows (their private
peaks plus one shared copy), and what that comes to for full CIFAR-100 and ImageNet-1k.

    python benchmarks/stage_two.py --quick                       # CPU step times, a few minutes
    python benchmarks/stage_two.py --epochs --quick              # CPU whole epochs (small synthetic sets)
    python benchmarks/stage_two.py --seeds 2 --quick             # CPU concurrent runs
    python benchmarks/stage_two.py --memory --quick              # CPU private memory, 20,000 samples
    python benchmarks/stage_two.py --memory --clip ViT-L/14 --val-samples 256 --timed-epochs 1 \
        --memory-steps 5 --memory-runs 0                         # CPU: the full CIFAR-100 shape (6.1 GB)
    python benchmarks/stage_two.py --device cuda --clip ViT-L/14 --rounds 5 --steps 20
    python benchmarks/stage_two.py --epochs --device cuda --clip ViT-L/14 --compile
    python benchmarks/stage_two.py --seeds 4 --device cuda --clip ViT-L/14 --compile
    python benchmarks/stage_two.py --memory --device cuda --clip ViT-L/14

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from pipelines.build import Teacher, clip_forward, teacher_forward
from pipelines.config import TrainConfig
from pipelines.distributed import DistContext
from pipelines.progress import Reporter
from pipelines.targets import CachedRows, Draws, RowPlan, StageTwoTargets, augment, to_device
from pipelines.train import evaluate, model_input, setup_images, setup_optimizer, train_epoch, train_step
from richkd_cache.clip import load_clip, resolve_clip
from richkd_cache.data import ArrayImageDataset
from richkd_cache.distill import create_objective
from richkd_cache.distill.batch import ClipPart, FusionState
from richkd_cache.distill.fusion import feature_moments, joint_space_from_moments
from richkd_cache.models import create_model
from richkd_cache.views import create_policy, num_views, stored_views

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
LOGITS, FEATURES, VIEWS = "teacher/logits", "teacher/features", "views/params"
CROP_FLIP = create_policy("crop-flip", 32)  # CIFAR's views: stored (162 records) or drawn fresh for CE
EMBEDS, CLIP_FEATURES = "clip/bench/image_embeds", "clip/bench/features"  # one CLIP model, named "bench"
PROMPTS, TAU, LAM, CRD_DIM, CRD_NEGATIVES = 18, 100.0, 0.7, 128, 16384


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--clip", default="ViT-B/32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=2048, help="steps: rows of the cache")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per method per round (online: a fifth)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--views", default=None, help="clean, or all: the cache holds the teacher on CIFAR's 162 views "
                   "and the cached step replays one per sample (CE keeps its random crop and flip); default: "
                   "clean for steps, all for --epochs, --seeds and --memory")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU: a few minutes on 2 cores")
    p.add_argument("--epochs", action="store_true", help="whole epochs instead of single steps")
    p.add_argument("--seeds", type=int, default=0, help="N processes training at once vs one alone")
    p.add_argument("--memory", action="store_true", help="peak private memory of cached RichKD vs CE")
    p.add_argument("--memory-runs", type=int, default=4, help="--memory: cached runs at once on one copy")
    p.add_argument("--memory-repeats", type=int, default=1, help="--memory: CE and cached alone, alternately, "
                   "this many times each (medians: a run's peak varies by ~0.1 GB)")
    p.add_argument("--memory-steps", type=int, default=0, help="--memory: steps per epoch (0: whole epochs)")
    p.add_argument("--compile", action="store_true", help="--epochs/--seeds: train with the compiled step")
    p.add_argument("--feature-loss", default=None, choices=("crd", "cosine"),
                   help="default: cosine for steps, crd for --epochs, --seeds and --memory")
    p.add_argument("--variants", default="ce,cached,online", help="--epochs: which runs, comma-separated")
    p.add_argument("--train-samples", type=int, default=50_000)
    p.add_argument("--val-samples", type=int, default=10_000)
    p.add_argument("--timed-epochs", type=int, default=3, help="steady epochs timed after the first")
    p.add_argument("--online-samples", type=int, default=2560, help="the online epoch is timed on this many")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)  # a child: the shared folder of rows
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)  # a --seeds child: DIR,COUNT
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = not (args.epochs or args.seeds or args.memory)
    args.views = args.views or ("clean" if steps else "all")
    args.feature_loss = args.feature_loss or ("cosine" if steps else "crd")
    if args.memory:
        if args.quick:
            args.train_samples, args.val_samples, args.timed_epochs = 20_000, 256, 1
            args.memory_steps = args.memory_steps or 5
        return print_result(memory_mode(args))
    if args.seeds:
        if args.quick:
            args.train_samples, args.val_samples, args.timed_epochs = 256, 128, 1
        return print_result(seeds_mode(args))
    if args.epochs:
        if args.quick:
            args.train_samples, args.val_samples, args.timed_epochs, args.online_samples = 512, 256, 2, 128
        return print_result(epoch_mode(args))
    if args.quick:  # the cache's size does not change a step's cost; computing it does
        args.rounds, args.steps, args.num_samples = 3, 4, 256
    return print_result(step_mode(args))


# ---------------------------------------------------------------- the synthetic cache, memory-mapped


@dataclass(frozen=True)
class Shapes:
    """A cache's row shapes: N samples, V teacher views, C classes, the teacher's feature width Ft, CLIP's
    embedding width D and feature width Fc (CLIP is stored once per sample, its clean view)."""

    samples: int
    views: int
    classes: int
    teacher_dim: int
    embed_dim: int
    clip_dim: int


def cache_shapes(args: argparse.Namespace, samples: int, clip=None) -> Shapes:
    """The shapes the named teacher and CLIP give; CLIP's widths from its open_clip config when it is not
    built (a cached-only run never runs it)."""
    teacher_dim = create_model(args.teacher, args.num_classes).num_features
    if clip is not None:
        embed_dim, clip_dim = clip.embed_dim, clip.feature_dim
    else:
        config = open_clip.get_model_config(resolve_clip(args.clip, "random", None).arch)
        embed_dim, clip_dim = config["embed_dim"], config["vision_cfg"]["width"]
    views = num_views("all", 32) if args.views == "all" else 1
    return Shapes(samples, views, args.num_classes, teacher_dim, embed_dim, clip_dim)


def write_rows(folder: Path, shapes: Shapes, seed: int = 0, chunk: int = 512) -> None:
    """Random rows of the cache's dtypes as `.npy` files (the local copy's format), written chunk by chunk
    so that even a large cache never sits whole in this process's memory."""
    n, v = shapes.samples, shapes.views
    rng = np.random.default_rng(seed)
    arrays = {LOGITS: ((n, v, shapes.classes), np.float16, 3.0), FEATURES: ((n, v, shapes.teacher_dim), np.float16, 1.0),
              EMBEDS: ((n, 1, shapes.embed_dim), np.float16, None), CLIP_FEATURES: ((n, 1, shapes.clip_dim), np.float16, 1.0)}
    for name, (shape, dtype, scale) in arrays.items():
        out = np.lib.format.open_memmap(folder / file_name(name), mode="w+", dtype=dtype, shape=shape)
        for start in range(0, n, chunk):
            rows = rng.standard_normal((min(chunk, n - start), *shape[1:]), dtype=np.float32)
            if scale is None:  # image embeddings are L2-normalised, as CLIP's are
                rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
            else:
                rows *= scale
            out[start : start + len(rows)] = rows
        out.flush()
        del out
    if v > 1:
        table = stored_views("all", create_policy("crop-flip", 32), 0, 0, v)  # (162, 2) packed records
        out = np.lib.format.open_memmap(folder / file_name(VIEWS), mode="w+", dtype=np.uint8, shape=(n, *table.shape))
        for start in range(0, n, chunk):
            out[start : start + chunk] = table
        out.flush()
        del out


def file_name(array: str) -> str:
    return array.replace("/", "__") + ".npy"


def open_rows(folder: Path) -> dict[str, np.ndarray]:
    """Every array of the folder, memory-mapped read-only (shared through the page cache by every process)."""
    return {path.stem.replace("__", "/"): np.load(path, mmap_mode="r", allow_pickle=False)
            for path in sorted(Path(folder).glob("*.npy"))}


def compact_bytes(folder: Path) -> int:
    """The compact rows' bytes: what the run maps (the files, headers included)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.npy"))


def cached_source(arrays: dict[str, np.ndarray], feature_loss: str, device: torch.device,
                  seed: int = 0) -> StageTwoTargets:
    """RichKD (L+F) from the mapped rows, as `setup_targets` builds it: the teacher's rows at the drawn view,
    CLIP's at its one view, a random normalised prompt set (M, C, D) with tau 100, and for cosine the fixed
    joint space from one streaming pass over the feature rows."""
    views = arrays[LOGITS].shape[1]
    plan = RowPlan((LOGITS, FEATURES, *((VIEWS,) if views > 1 else ())), (EMBEDS, CLIP_FEATURES), num_views=views)
    classes, embed_dim = arrays[LOGITS].shape[-1], arrays[EMBEDS].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(PROMPTS, classes, embed_dim, generator=generator), dim=-1)
    space = None
    if feature_loss == "cosine":
        space = joint_space_from_moments(feature_moments(arrays[FEATURES], "teacher"),
                                         feature_moments(arrays[CLIP_FEATURES], "clip"), LAM)
    state = FusionState("richkd", classes, (ClipPart("bench", EMBEDS, CLIP_FEATURES, text, TAU),), alpha=LAM,
                        space=space, features=True)
    return StageTwoTargets(CachedRows(plan, arrays, torch.device("cpu")), state.to(device), CROP_FLIP)


def online_source(cached: StageTwoTargets, teacher: torch.nn.Module, clip, dataset: ArrayImageDataset,
                  device: torch.device) -> StageTwoTargets:
    """`train --online`'s source (pipelines/online.py): the cached run's fusion state, only the view
    parameters gathered, the teacher run on the drawn views and CLIP on the clean images every batch."""
    wrapped = Teacher(teacher, "bench", {})

    @torch.no_grad()
    def run_models(clean: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        z_t, f_t = teacher_forward(wrapped, dataset, pixels, device)
        embeds, f_c = clip_forward(clip, clean, device)
        rows = {LOGITS: z_t, FEATURES: f_t, EMBEDS: embeds, CLIP_FEATURES: f_c}
        return {name: t.float() for name, t in rows.items()}

    plan = cached.rows.plan
    views_only = dataclasses.replace(plan, teacher=tuple(n for n in plan.teacher if n == VIEWS), clip=())
    rows = CachedRows(views_only, cached.rows.arrays, cached.rows.device)
    return dataclasses.replace(cached, rows=rows, online=run_models)


def make_objective(name: str, student: torch.nn.Module, arrays: dict[str, np.ndarray], feature_loss: str,
                   labels: torch.Tensor, seed: int) -> torch.nn.Module:
    """CE, or RichKD's KD on the fused logits + the feature loss on the teacher's and CLIP's parts."""
    if name == "ce":
        return create_objective("ce", None, None, student_dim=student.num_features)
    return create_objective("richkd", "kd", feature_loss, student_dim=student.num_features,
                            teacher_dim=arrays[FEATURES].shape[-1], clip_dim=arrays[CLIP_FEATURES].shape[-1],
                            lam=LAM, labels=labels, seed=seed)


def synthetic_cifar(n: int, num_classes: int, seed: int) -> ArrayImageDataset:
    """n random 32x32 uint8 images with random labels, CIFAR-100's statistics: the trainer's data type."""
    rng = np.random.default_rng(seed)
    return ArrayImageDataset("synthetic", "train", "-", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                             rng.integers(0, num_classes, n), [f"c{i}" for i in range(num_classes)],
                             CIFAR_MEAN, CIFAR_STD)


@contextmanager
def rows_folder(given: str | None) -> Iterator[Path]:
    """The folder of rows a parent made (a child maps it), or a temporary one this process fills."""
    if given:
        yield Path(given)
        return
    with tempfile.TemporaryDirectory(prefix="richkd-stage-two-") as folder:
        yield Path(folder)


# ---------------------------------------------------------------- step mode


def step_mode(args: argparse.Namespace) -> dict:
    """Median step time of CE, cached and online RichKD, interleaved round by round."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    dataset = synthetic_cifar(args.num_samples, args.num_classes, 0)
    images = setup_images(dataset, device)
    teacher = create_model(args.teacher, args.num_classes).to(device).eval()
    clip = load_clip(resolve_clip(args.clip, "random", None), device=str(device))
    generator = torch.Generator(device=device).manual_seed(0)
    with rows_folder(None) as folder:
        write_rows(folder, cache_shapes(args, args.num_samples, clip))
        arrays = open_rows(folder)
        cached = cached_source(arrays, args.feature_loss, device)
        sources = {"ce": None, "cached": cached, "online": online_source(cached, teacher, clip, dataset, device)}
        runners = {name: make_step(name, source, args, arrays, dataset, images, generator, device)
                   for name, source in sources.items()}
        times = measure(runners, args.rounds, args.steps, device)
    result = {f"{name}_step_s": statistics.median(t) for name, t in times.items()}
    result["cached_over_ce"] = result["cached_step_s"] / result["ce_step_s"]
    result["online_over_cached"] = result["online_step_s"] / result["cached_step_s"]
    result.update(settings(args, device), num_samples=args.num_samples)
    print(f"cached / CE step: {result['cached_over_ce']:.3f}x (target <= 1.10)")
    print(f"online / cached step: {result['online_over_cached']:.1f}x (target >= 5)")
    return result


def make_step(name: str, source: StageTwoTargets | None, args: argparse.Namespace, arrays: dict[str, np.ndarray],
              dataset: ArrayImageDataset, images: torch.Tensor, generator: torch.Generator,
              device: torch.device) -> Callable[[], None]:
    """One step of the trainer's loop body (pipelines/train.py's `train_epoch`): draw a batch and its views,
    gather its rows, augment (replaying the drawn views), fuse the targets, `train_step`. The gather runs
    in the step here (the loop overlaps it with the previous step), so the cached figure is an upper bound."""
    student = create_model(args.student, args.num_classes).to(device).train()
    labels = torch.from_numpy(dataset.labels)
    objective = make_objective(name, student, arrays, args.feature_loss, labels, args.seed).to(device)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(objective.parameters()), lr=0.05, momentum=0.9)
    n, views = len(dataset), arrays[LOGITS].shape[1]
    labels = labels.to(device)

    def step() -> None:
        index = torch.randint(0, n, (args.batch_size,))
        view = torch.randint(0, views, (args.batch_size,)) if views > 1 else None
        rows = {} if source is None else to_device(source.gather(Draws(index, view))[0], device)
        index = index.to(device)
        x, y = images[index], labels[index]
        pixels = augment(x, rows.pop(VIEWS, None), CROP_FLIP, generator)
        target_logits, target_feats = (None, {}) if source is None else source.targets(rows, x, pixels, y)
        train_step(student, objective, optimizer, model_input(pixels, dataset), y, index, target_logits,
                   target_feats, 0)

    return step


def measure(runners: dict[str, Callable[[], None]], rounds: int, steps: int, device) -> dict[str, list[float]]:
    for run in runners.values():  # warm-up: allocator, kernels, caches
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(max(1, steps // 5) if name == "online" else steps):
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- --epochs


@dataclass
class Trainer:
    """What `train_epoch` needs for one run: the student, its objective and optimiser, its target source."""

    cfg: TrainConfig
    student: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    source: StageTwoTargets | None


class EpochCut(Exception):
    """Raised by `CutReporter` to end an epoch early."""


class CutReporter(Reporter):
    """A quiet reporter whose progress callback ends each epoch after `samples` samples (--memory-steps):
    the epoch's draws, banks and batches in flight are the real ones, and a run's memory is steady after
    its first steps, so --memory need not wait for whole epochs on a slow machine."""

    def __init__(self, samples: int) -> None:
        super().__init__(quiet=True)
        self.samples = samples

    @contextmanager
    def task(self, description: str, total: int, unit: str = "img") -> Iterator[Callable[[int], None]]:
        seen = 0

        def advance(n: int) -> None:
            nonlocal seen
            seen += n
            if seen >= self.samples:
                raise EpochCut

        yield advance


def epoch_mode(args: argparse.Namespace) -> dict:
    """Whole epochs (train + evaluate) of each variant, one after another, on the same synthetic data."""
    device = torch.device(args.device)
    train_set = synthetic_cifar(args.train_samples, args.num_classes, 0)
    val_set = synthetic_cifar(args.val_samples, args.num_classes, 1)
    images, val_images = setup_images(train_set, device), setup_images(val_set, device)
    variants = args.variants.split(",")
    teacher = clip = None
    if "online" in variants:
        teacher = create_model(args.teacher, args.num_classes).to(device).eval()
        clip = load_clip(resolve_clip(args.clip, "random", None), device=str(device))
    result: dict = {"variants": {}}
    barrier = args.barrier.split(",") if args.barrier else None
    with rows_folder(args.rows) as folder:
        if not args.rows:
            write_rows(folder, cache_shapes(args, args.train_samples, clip))
        arrays = open_rows(folder)
        for name in variants:
            trainer = make_trainer(name, args, train_set, arrays, device, teacher, clip)
            if name == "online":
                result["variants"][name] = time_online(trainer, args, images, val_images, train_set, val_set, device)
                continue
            first = time_epoch(trainer, 0, images, val_images, train_set, val_set, device, args.memory_steps)
            if barrier:  # a --seeds child: the steady epochs start when every process has compiled
                wait_for_all(Path(barrier[0]), int(barrier[1]), args.seed)
            start = time.time()
            steady = [time_epoch(trainer, e, images, val_images, train_set, val_set, device, args.memory_steps)
                      for e in range(1, 1 + args.timed_epochs)]
            epoch_s = statistics.median(steady) if steady else first
            result["variants"][name] = {"first_epoch_s": first, "epoch_s": epoch_s, "steady_epochs_s": steady,
                                        "projected_240_s": first + 239 * epoch_s, "timed_from": start,
                                        "timed_to": time.time()}
        result["compact_bytes"] = compact_bytes(folder)
    v = result["variants"]
    if "ce" in v and "cached" in v:
        result["cached_over_ce"] = v["cached"]["epoch_s"] / v["ce"]["epoch_s"]
    if "cached" in v and "online" in v:
        result["online_over_cached"] = v["online"]["epoch_s"] / v["cached"]["epoch_s"]
    result.update(settings(args, device), train_samples=args.train_samples, val_samples=args.val_samples)
    for name, r in v.items():
        print(f"{name}: {r['epoch_s']:.3f} s/epoch, 240 epochs ~{r['projected_240_s'] / 60:.1f} min")
    if "cached_over_ce" in result:
        print(f"cached / CE epoch: {result['cached_over_ce']:.3f}x (target <= 1.05)")
    return result


def make_trainer(name: str, args: argparse.Namespace, train_set: ArrayImageDataset, arrays: dict[str, np.ndarray],
                 device: torch.device, teacher: torch.nn.Module | None, clip) -> Trainer:
    """ce: no targets; cached: RichKD (L+F) from the mapped rows; online: the same loss with `train
    --online`'s targets (teacher on the drawn views, CLIP on the clean images)."""
    cfg = TrainConfig(student=args.student, out="-", target="ce" if name == "ce" else "richkd",
                      feature_loss=args.feature_loss, batch_size=args.batch_size, workers=0, compile=args.compile,
                      seed=args.seed)
    torch.manual_seed(args.seed)
    student = create_model(args.student, args.num_classes).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    labels = torch.from_numpy(train_set.labels)
    objective = make_objective(name, student, arrays, args.feature_loss, labels, args.seed).to(device)
    optimizer, _ = setup_optimizer(cfg, student, objective)
    source = None
    if name != "ce":
        source = cached_source(arrays, args.feature_loss, device, args.seed)
    if name == "online":
        source = online_source(source, teacher, clip, train_set, device)
    return Trainer(cfg, student, objective, optimizer, source)


def time_epoch(trainer: Trainer, epoch: int, images, val_images, train_set, val_set, device: torch.device,
               steps: int = 0, pool: torch.Tensor | None = None, with_eval: bool = True) -> float:
    """Seconds of one epoch of the trainer's loop (train_epoch, then evaluate), device work included;
    `steps` > 0 ends the epoch after that many batches (--memory)."""
    generator = torch.Generator(device=device).manual_seed(trainer.cfg.seed * 100_003 + epoch)
    reporter = CutReporter(steps * trainer.cfg.batch_size) if steps else Reporter(quiet=True)
    sync(device)
    t0 = time.perf_counter()
    try:
        train_epoch(trainer.student, trainer.objective, trainer.optimizer, images, train_set, trainer.source,
                    trainer.cfg, epoch, generator, reporter, DistContext(), pool)
    except EpochCut:
        pass
    if with_eval:
        evaluate(trainer.student, val_images, val_set, trainer.cfg.batch_size)
    sync(device)
    return time.perf_counter() - t0


def time_online(trainer: Trainer, args, images, val_images, train_set, val_set, device: torch.device) -> dict:
    """The online epoch: a warm-up batch, then --online-samples samples timed and scaled to the whole set."""
    k = min(args.online_samples, len(train_set))
    time_epoch(trainer, 0, images, val_images, train_set, val_set, device, pool=torch.arange(args.batch_size),
               with_eval=False)
    part = time_epoch(trainer, 1, images, val_images, train_set, val_set, device, pool=torch.arange(k),
                      with_eval=False)
    sync(device)
    t0 = time.perf_counter()
    evaluate(trainer.student, val_images, val_set, trainer.cfg.batch_size)
    sync(device)
    epoch_s = part * len(train_set) / k + time.perf_counter() - t0
    return {"epoch_s": epoch_s, "timed_samples": k, "projected_240_s": 240 * epoch_s}


# ---------------------------------------------------------------- child processes (--seeds, --memory)


def child_command(args: argparse.Namespace, variant: str, folder: Path, threads: int | None) -> list[str]:
    """This script in --epochs mode for one variant, mapping the parent's folder of rows."""
    forwarded = ["--epochs", "--variants", variant, "--rows", folder, "--device", args.device,
                 "--student", args.student, "--teacher", args.teacher, "--clip", args.clip,
                 "--batch-size", args.batch_size, "--num-classes", args.num_classes, "--views", args.views,
                 "--feature-loss", args.feature_loss, "--train-samples", args.train_samples,
                 "--val-samples", args.val_samples, "--timed-epochs", args.timed_epochs,
                 "--memory-steps", args.memory_steps,
                 *(["--compile"] if args.compile else []), *(["--threads", threads] if threads else [])]
    return [sys.executable, __file__, *map(str, forwarded)]


def child_result(output: str, what: str) -> dict:
    lines = output.strip().splitlines()
    if not lines:
        raise SystemExit(f"stage_two: a {what} run printed nothing")
    return json.loads(lines[-1])


def child_threads(args: argparse.Namespace, count: int) -> int | None:
    """CPU threads of each of `count` processes: the cores shared out (None on a GPU: torch's default)."""
    return args.threads or (max(1, (os.cpu_count() or 1) // count) if args.device == "cpu" else None)


def wait_for_all(folder: Path, count: int, me: int, timeout_s: float = 900.0) -> None:
    """A file barrier between --seeds processes: each writes ready-<seed> and waits for the others'."""
    (folder / f"ready-{me}").touch()
    deadline = time.time() + timeout_s
    while len(list(folder.glob("ready-*"))) < count:
        if time.time() > deadline:
            raise SystemExit(f"stage_two: only {len(list(folder.glob('ready-*')))} of {count} runs became ready")
        time.sleep(0.05)


def seeds_mode(args: argparse.Namespace) -> dict:
    """The cached run alone, then N of them at once (one process per seed, sharing the device and one
    mapped folder of rows, as runs share a cache's local copy)."""
    with rows_folder(None) as folder:
        write_rows(folder, cache_shapes(args, args.train_samples))
        alone = run_seeds(args, folder, 1)[0]
        together = run_seeds(args, folder, args.seeds)
    n = args.seeds
    together_epoch = statistics.median(r["epoch_s"] for r in together)
    overlap = min(r["timed_to"] for r in together) - max(r["timed_from"] for r in together)
    result = {
        "seeds": n,
        "alone_epoch_s": alone["epoch_s"],
        "together_epoch_s": together_epoch,
        "together_epochs_s": [r["epoch_s"] for r in together],
        "timed_overlap_s": overlap,  # > 0: every process's steady epochs ran while all the others did
        "speedup_over_sequential": n * alone["epoch_s"] / together_epoch,
        "projected_240_sequential_s": n * alone["projected_240_s"],
        "projected_240_together_s": max(r["first_epoch_s"] for r in together) + 239 * together_epoch,
        **settings(args, torch.device(args.device)),
        "train_samples": args.train_samples, "val_samples": args.val_samples,
        "threads_alone": child_threads(args, 1), "threads_each_together": child_threads(args, n),
    }
    print(f"{n} runs at once: {together_epoch:.3f} s/epoch each vs {alone['epoch_s']:.3f} alone "
          f"({result['speedup_over_sequential']:.2f}x the throughput of one after another); "
          f"{n} x 240 epochs ~{result['projected_240_together_s'] / 60:.1f} min")
    return result


def run_seeds(args: argparse.Namespace, folder: Path, count: int) -> list[dict]:
    """`count` cached runs started together, each with its seed and the barrier; their JSON results."""
    threads = child_threads(args, count)
    with tempfile.TemporaryDirectory(prefix="richkd-seeds-") as barrier:
        children = [subprocess.Popen([*child_command(args, "cached", folder, threads), "--seed", str(seed),
                                      "--barrier", f"{barrier},{count}"], stdout=subprocess.PIPE, text=True)
                    for seed in range(count)]
        outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise SystemExit(f"stage_two: a --seeds run failed (exit codes {[c.returncode for c in children]})")
    return [child_result(out, "--seeds")["variants"]["cached"] for out in outputs]


# ---------------------------------------------------------------- --memory


def proc_kb(pid: int, keys: tuple[str, ...]) -> int:
    """The sum of `keys` (kB fields of /proc/<pid>/status) in bytes; 0 for a process that has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return 1024 * sum(int(line.split()[1]) for line in text.splitlines() if line.split(":")[0] in keys)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc/<pid>/task/<tid>/children)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return tree


PRIVATE, SHARED = ("RssAnon", "RssShmem"), ("RssFile",)


def watch(children: list[subprocess.Popen], interval_s: float = 0.02) -> dict:
    """Poll each child's process tree until all have exited: each one's peak private bytes (RssAnon +
    RssShmem), the peak of their sum at one instant, and each one's peak file-backed resident bytes (the
    mapped rows, shared through the page cache)."""
    peaks, files, together = [0] * len(children), [0] * len(children), 0
    while any(child.poll() is None for child in children):
        now = []
        for i, child in enumerate(children):
            tree = process_tree(child.pid)
            private = sum(proc_kb(p, PRIVATE) for p in tree)
            peaks[i] = max(peaks[i], private)
            files[i] = max(files[i], sum(proc_kb(p, SHARED) for p in tree))
            now.append(private)
        together = max(together, sum(now))
        time.sleep(interval_s)
    return {"peaks": peaks, "together": together, "file_peaks": files}


def run_watched(args: argparse.Namespace, folder: Path, variants: list[str]) -> dict:
    """One child per variant, started together and watched; each child's output goes to a file (a pipe
    would fill while the parent polls)."""
    threads = child_threads(args, len(variants))
    with tempfile.TemporaryDirectory(prefix="richkd-memory-") as logs, ExitStack() as files:
        outs = [files.enter_context(open(Path(logs) / f"{i}.out", "w+")) for i in range(len(variants))]
        children = [subprocess.Popen([*child_command(args, v, folder, threads), "--seed", str(i)], stdout=out)
                    for i, (v, out) in enumerate(zip(variants, outs))]
        watched = watch(children)
        texts = []
        for out in outs:
            out.seek(0)
            texts.append(out.read())
    if any(child.returncode for child in children):
        raise SystemExit(f"stage_two: a --memory run failed (exit codes {[c.returncode for c in children]})")
    epochs = [child_result(text, "--memory")["variants"][v]["epoch_s"] for text, v in zip(texts, variants)]
    return {**watched, "epoch_s": epochs, "threads": threads}


def memory_mode(args: argparse.Namespace) -> dict:
    """CE alone and cached RichKD alone (--memory-repeats times, alternately; medians), then --memory-runs
    cached runs at once, all on one folder of rows made before the children start (they share it through
    the page cache, as runs share the local copy)."""
    args.views = "all"
    with rows_folder(None) as folder:
        shapes = cache_shapes(args, args.train_samples)
        t0 = time.perf_counter()
        write_rows(folder, shapes)
        write_s = time.perf_counter() - t0
        compact = compact_bytes(folder)
        alone = [(run_watched(args, folder, ["ce"]), run_watched(args, folder, ["cached"]))
                 for _ in range(max(1, args.memory_repeats))]
        together = run_watched(args, folder, ["cached"] * args.memory_runs) if args.memory_runs else None
    ce_peaks, cached_peaks = [ce["peaks"][0] for ce, _ in alone], [cached["peaks"][0] for _, cached in alone]
    ce_peak, cached_peak = int(statistics.median(ce_peaks)), int(statistics.median(cached_peaks))
    ce, cached = alone[-1]
    overhead = cached_peak - ce_peak
    result = {
        "ce_peak": ce_peak, "cached_peak": cached_peak, "compact_bytes": compact, "overhead": overhead,
        "ratio": overhead / compact, "ce_peaks": ce_peaks, "cached_peaks": cached_peaks,
        "cached_file_peak": cached["file_peaks"][0], "threads_alone": cached["threads"],
        "epoch_s": {"ce": ce["epoch_s"][0], "cached": cached["epoch_s"][0]}, "write_s": write_s,
        "shapes": dataclasses.asdict(shapes), "memory_steps": args.memory_steps,
    }
    if together:
        result["runs"] = {"count": args.memory_runs, "private_peaks": together["peaks"],
                          "private_sum": sum(together["peaks"]), "private_together": together["together"],
                          "total": sum(together["peaks"]) + compact, "file_peaks": together["file_peaks"],
                          "threads_each": together["threads"]}
    result["model"] = overhead_model(args, shapes, overhead)
    result["projection"] = {name: project(result["model"], spec) for name, spec in PROJECTIONS.items()}
    result.update(settings(args, torch.device(args.device)), train_samples=args.train_samples,
                  val_samples=args.val_samples)
    report_memory(result)
    return result


def crd_negatives(samples: int, classes: int) -> int:
    """CRD's K: 16,384, capped by the smallest other-class pool (samples less one class's, balanced)."""
    return min(CRD_NEGATIVES, samples - -(-samples // classes))


def scaling_terms(samples: int, classes: int, teacher_dim: int, row_bytes: int, batch: int, crd: bool,
                  text_bytes: int) -> dict[str, int]:
    """The parts of a cached run's private memory over CE's that depend on the cache, by what sets them:
    the epoch's draws (a permutation, a view per sample and drawing's temporary, int64: N x 8 B x 3),
    three batches in flight (gathered, on the device, fused to float32 targets), CRD's two memory banks
    (N x 128 x 4 B each) and one step's gathered bank rows (B x (K + 1) x 128 x 4 B per side, saved for
    the backward pass: on a CPU run they are host memory), and the prompt set's text embeddings."""
    terms = {"draws": 3 * 8 * samples,
             "batches_in_flight": 3 * batch * (row_bytes + 4 * (classes + teacher_dim)),
             "text": text_bytes}
    if crd:
        terms["crd_banks"] = 2 * samples * CRD_DIM * 4
        terms["crd_step"] = 2 * batch * (crd_negatives(samples, classes) + 1) * CRD_DIM * 4
    return terms


def overhead_model(args: argparse.Namespace, shapes: Shapes, overhead: int) -> dict:
    """The measured overhead split into the terms that scale (above) and a fixed rest (the objective's
    heads and optimiser state, the fusion's temporaries, allocator slack), which a projection keeps."""
    row = 2 * (shapes.classes + shapes.teacher_dim + shapes.embed_dim + shapes.clip_dim) + 4 * 5
    terms = scaling_terms(shapes.samples, shapes.classes, shapes.teacher_dim, row, args.batch_size,
                          args.feature_loss == "crd", 4 * PROMPTS * shapes.classes * shapes.embed_dim)
    return {"terms": terms, "fixed": overhead - sum(terms.values()), "batch_size": args.batch_size}


# Full-size caches: (samples, views, per (sample, view) bytes, per sample bytes, classes, teacher width,
# CLIP embedding width, whether the run trains a CRD feature loss)
PROJECTIONS = {
    # resnet32x4 + ViT-L/14 on CIFAR-100's 162 views: 100 fp16 logits + 256 fp16 features + a 2-byte view
    # record per view; 768-d fp16 embeddings + 1024-d fp16 features per sample; RichKD L+F with CRD
    "cifar100": {"samples": 50_000, "views": 162, "view_bytes": 2 * 100 + 2 * 256 + 2,
                 "sample_bytes": 2 * 768 + 2 * 1024, "classes": 100, "teacher_dim": 256, "embed_dim": 768,
                 "crd": True},
    # ImageNet-1k, 100 views (one per epoch): top-10 fp16 values + int16 indices + an 8-byte view record per
    # view; 768-d fp16 embeddings per sample; logits only (no features stored, so no feature loss)
    "imagenet1k": {"samples": 1_281_167, "views": 100, "view_bytes": 2 * 10 + 2 * 10 + 8,
                   "sample_bytes": 2 * 768, "classes": 1000, "teacher_dim": 0, "embed_dim": 768, "crd": False},
}


def project(model: dict, spec: dict) -> dict:
    """A full-size cache's compact bytes, and the run's private memory over CE: the measured fixed rest
    plus the scaling terms at that size."""
    compact = spec["samples"] * (spec["views"] * spec["view_bytes"] + spec["sample_bytes"])
    terms = scaling_terms(spec["samples"], spec["classes"], spec["teacher_dim"],
                          spec["view_bytes"] + spec["sample_bytes"], model["batch_size"], spec["crd"],
                          4 * PROMPTS * spec["classes"] * spec["embed_dim"])
    overhead = max(model["fixed"], 0) + sum(terms.values())
    return {"compact_bytes": compact, "terms": terms, "overhead": overhead, "ratio": overhead / compact}


def report_memory(result: dict) -> None:
    gb = 1e9
    print(f"CE peak {result['ce_peak'] / gb:.3f} GB, cached peak {result['cached_peak'] / gb:.3f} GB, compact rows "
          f"{result['compact_bytes'] / gb:.3f} GB: (cached - CE) / compact = {result['ratio']:.3f} (target <= 0.3)")
    if "runs" in result:
        r = result["runs"]
        print(f"{r['count']} cached runs at once: private peaks {r['private_sum'] / gb:.3f} GB + one copy "
              f"{result['compact_bytes'] / gb:.3f} GB = {r['total'] / gb:.3f} GB")
    for name, p in result["projection"].items():
        print(f"{name}: compact {p['compact_bytes'] / gb:.2f} GB, private over CE ~{p['overhead'] / gb:.3f} GB "
              f"({p['ratio']:.3f} of the rows)")


# ---------------------------------------------------------------- output


def settings(args: argparse.Namespace, device: torch.device) -> dict:
    return {"student": args.student, "teacher": args.teacher, "clip": args.clip, "batch_size": args.batch_size,
            "views": args.views, "feature_loss": args.feature_loss, "compile": args.compile, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def print_result(result: dict) -> None:
    print(json.dumps(result))


if __name__ == "__main__":
    main()
