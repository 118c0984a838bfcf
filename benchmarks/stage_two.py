"""Stage two: step time, whole-epoch time and concurrent seeds of plain CE vs cached RichKD vs online RichKD.

Step mode (the default; DESIGN.md section 5: cached <= 1.10x CE, online >= 5x cached). All three use the
same student, batch, augmentation and optimiser, and the cached step is the trainer's own `train_step`; the
online step runs the teacher and CLIP on the augmented batch first, as training without a cache must. Steps
are interleaved round by round so drift on a shared machine hits all three alike; medians are reported.

--epochs: the trainer's own `train_epoch` + `evaluate` on synthetic CIFAR-sized data (50,000 train and
10,000 validation images, batch 64): whole-epoch seconds for CE, cached RichKD (L+F, CRD by default) and
online RichKD, and the projected 240-epoch time (the first epoch, which compiles, + 239 steady ones). The
cached targets are random tables of the cache's shapes (a step's cost does not depend on their values); the
online epoch is timed on --online-samples samples and scaled to the epoch.

--seeds N: N processes train the cached run at once on one device, against one process alone; each times
its steady epochs after all have compiled (a file barrier), and the projected N-seed wall time follows.

    python benchmarks/stage_two.py --quick                       # CPU step times, a few minutes
    python benchmarks/stage_two.py --epochs --quick              # CPU whole epochs (small synthetic sets)
    python benchmarks/stage_two.py --seeds 2 --quick             # CPU concurrent runs
    python benchmarks/stage_two.py --device cuda --clip ViT-L/14 --rounds 5 --steps 20
    python benchmarks/stage_two.py --epochs --device cuda --clip ViT-L/14 --compile
    python benchmarks/stage_two.py --seeds 4 --device cuda --clip ViT-L/14 --compile

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cache_store.schema import ClipLayout
from pipelines.build import Teacher
from pipelines.config import TrainConfig
from pipelines.distributed import DistContext
from pipelines.online import OnlineTargets
from pipelines.progress import Reporter
from pipelines.targets import Fusion, Targets, augment
from pipelines.train import evaluate, setup_images, setup_optimizer, train_epoch, train_step
from richkd_cache.clip import load_clip, resolve_clip
from richkd_cache.clip_logits import clip_logits
from richkd_cache.data import ArrayImageDataset, normalize
from richkd_cache.distill import create_objective, fit_joint_space, fuse_logits
from richkd_cache.models import create_model
from richkd_cache.views import view_params

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--clip", default="ViT-B/32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=2048, help="rows of the in-memory cache")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per method per round (online: a fifth)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--views", default=None, help="clean, or all: the cache holds the teacher on CIFAR's 162 views "
                   "and the cached step replays one per sample (CE keeps its random crop and flip); default: "
                   "clean for steps, all for --epochs and --seeds")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU: a few minutes on 2 cores")
    p.add_argument("--epochs", action="store_true", help="whole epochs instead of single steps")
    p.add_argument("--seeds", type=int, default=0, help="N processes training at once vs one alone")
    p.add_argument("--compile", action="store_true", help="--epochs/--seeds: train with the compiled step")
    p.add_argument("--feature-loss", default="crd", choices=("crd", "cosine"), help="--epochs/--seeds")
    p.add_argument("--variants", default="ce,cached,online", help="--epochs: which runs, comma-separated")
    p.add_argument("--train-samples", type=int, default=50_000)
    p.add_argument("--val-samples", type=int, default=10_000)
    p.add_argument("--timed-epochs", type=int, default=3, help="steady epochs timed after the first")
    p.add_argument("--online-samples", type=int, default=2560, help="the online epoch is timed on this many")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-dims", default=None, help=argparse.SUPPRESS)  # a --seeds child: CLIP's widths
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)  # a --seeds child: DIR,COUNT
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.views is None:
        args.views = "all" if args.epochs or args.seeds else "clean"
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
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, c = args.num_samples, args.num_classes
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, c, (n,), device=device)
    teacher = create_model(args.teacher, c).to(device).eval()
    clip = load_clip(resolve_clip(args.clip, "random", None), device=str(device))
    text = torch.nn.functional.normalize(torch.randn(18, c, clip.embed_dim, device=device), dim=-1)

    # The cache, as stage two holds it: targets for every row, computed once (eq. 2-4, 7).
    cached = precompute_targets(images, teacher, clip, text)
    generator = torch.Generator(device=device).manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw images: each step augments them the way its trainer would."""
        index = torch.randint(0, n, (args.batch_size,), generator=generator, device=device)
        return index, images[index], labels[index]

    plain = Targets(None, None)
    distilled = with_views(cached, args.views, n, device)
    runners = {
        "ce": make_cached_step("ce", args.student, c, plain, n, device, batch, generator),
        "cached": make_cached_step("richkd", args.student, c, distilled, n, device, batch, generator),
        "online": make_online_step(args.student, c, teacher, clip, text, cached, n, device, batch, generator),
    }
    times = measure(runners, args.rounds, args.steps, device)
    result = {
        "ce_step_s": statistics.median(times["ce"]),
        "cached_step_s": statistics.median(times["cached"]),
        "online_step_s": statistics.median(times["online"]),
    }
    result["cached_over_ce"] = result["cached_step_s"] / result["ce_step_s"]
    result["online_over_cached"] = result["online_step_s"] / result["cached_step_s"]
    result.update(teacher=args.teacher, student=args.student, clip=args.clip, batch_size=args.batch_size,
                  views=args.views,
                  device=str(device), machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=torch.get_num_threads())
    print(f"cached / CE step: {result['cached_over_ce']:.3f}x (target <= 1.10)")
    print(f"online / cached step: {result['online_over_cached']:.1f}x (target >= 5)")
    print(json.dumps(result))


@torch.no_grad()
def precompute_targets(images, teacher, clip, text) -> dict:
    t_logits, t_feats, c_embeds, c_feats = [], [], [], []
    for start in range(0, len(images), 256):
        x = images[start : start + 256]
        logits, feats = teacher(normalize(x, CIFAR_MEAN, CIFAR_STD))
        embeds, cf = clip.encode_images(x)
        t_logits.append(logits), t_feats.append(feats), c_embeds.append(embeds), c_feats.append(cf)
    t_logits, t_feats, c_embeds, c_feats = map(torch.cat, (t_logits, t_feats, c_embeds, c_feats))
    space = fit_joint_space(t_feats, c_feats, 0.7)
    z_c = clip_logits(c_embeds, text, clip.tau)
    return {
        "space": space,
        "logits": fuse_logits(t_logits, z_c, 0.7),  # eq. 4
        "features": {"teacher": space.teacher_part(t_feats), "clip": space.clip_part(c_feats)},  # eq. 7
    }


def with_views(cached: dict, views: str, n: int, device) -> Targets:
    """The trainer's targets: one row per sample, or per (sample, view) with the views' parameters."""
    if views == "clean":
        return Targets(cached["logits"], cached["features"])
    params = torch.from_numpy(view_params("all", n, 32)).to(device)  # (N, 162, 5)
    v = params.shape[1]
    features = {name: part.repeat_interleave(v, 0) for name, part in cached["features"].items()}
    return Targets(cached["logits"].repeat_interleave(v, 0), features, params)


def make_cached_step(target, student_name, c, targets: Targets, n, device, batch, generator) -> Callable[[], None]:
    """The trainer's own augment + lookup + train_step: CE (no targets), or targets gathered from the cache."""
    student = create_model(student_name, c).to(device).train()
    feats = targets.features or {}
    dims = {"teacher": feats["teacher"].shape[1], "clip": feats["clip"].shape[1]} if feats else {}
    return trainer_step(target, student, dims, targets, device, batch, generator)


def bench_clip(clip) -> ClipLayout:
    """The benchmark's one CLIP model, laid out as in a cache (its arrays' names in the online rows)."""
    return ClipLayout("clip", clip.embed_dim, clip.feature_dim, "clip/clip", "clip/clip/written")


def bench_fusion(clip, text: torch.Tensor, space, num_classes: int) -> Fusion:
    return Fusion((bench_clip(clip),), {"clip": text}, {"clip": clip.tau}, space, num_classes)


def make_online_step(student_name, c, teacher, clip, text, cached, n, device, batch, generator) -> Callable[[], None]:
    """Without a cache: `train --online`'s target source runs the teacher on every augmented batch and CLIP
    on its clean images, then the same loss and step."""
    student = create_model(student_name, c).to(device).train()
    feats = cached["features"]
    cfg = TrainConfig(student=student_name, out="-", cache="-", feature_loss="cosine")
    online = OnlineTargets(
        logits=None, features=None, cfg=cfg, fusion=bench_fusion(clip, text.cpu(), cached["space"], c),
        teacher=Teacher(teacher, "teacher", {}), clips=[(bench_clip(clip), clip)],
        dataset=SimpleNamespace(mean=CIFAR_MEAN, std=CIFAR_STD),
    )
    dims = {"teacher": feats["teacher"].shape[1], "clip": feats["clip"].shape[1]}
    return trainer_step("richkd", student, dims, online, device, batch, generator)


def trainer_step(target, student, dims, targets: Targets, device, batch, generator) -> Callable[[], None]:
    """One step of the trainer's loop (pipelines/train.py: augment, lookup, normalise, train_step)."""
    distilled = target != "ce"
    objective = create_objective(
        target, "kd" if distilled else None, "cosine" if distilled else None, student_dim=student.num_features,
        teacher_dim=dims.get("teacher"), clip_dim=dims.get("clip"),
    ).to(device)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(objective.parameters()), lr=0.05, momentum=0.9)

    def step() -> None:
        index, x, y = batch()
        pixels, rows = augment(x, index, targets, generator)
        target_logits, target_feats = targets.lookup(rows, device, clean=x, pixels=pixels)
        train_step(student, objective, optimizer, normalize(pixels, CIFAR_MEAN, CIFAR_STD), y, index,
                   target_logits, target_feats, 0)

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


# ---------------------------------------------------------------- --epochs and --seeds


@dataclass
class Trainer:
    """What `train_epoch` needs for one run: the student, its objective and optimiser, its target source."""

    cfg: TrainConfig
    student: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    windows: Callable


def epoch_mode(args: argparse.Namespace) -> dict:
    """Whole epochs (train + evaluate) of each variant, one after another, on the same synthetic data."""
    device = torch.device(args.device)
    train_set, val_set = synthetic_cifar(args.train_samples, args.num_classes, 0), synthetic_cifar(
        args.val_samples, args.num_classes, 1)
    images, val_images = setup_images(train_set, device), setup_images(val_set, device)
    variants = args.variants.split(",")
    teacher = create_model(args.teacher, args.num_classes).to(device).eval()
    clip = load_clip(resolve_clip(args.clip, "random", None), device=str(device)) if "online" in variants else None
    dims = {"teacher": teacher.num_features, "clip": clip.feature_dim if clip else clip_feature_dim(args)}
    result: dict = {"variants": {}}
    barrier = args.barrier.split(",") if args.barrier else None
    for name in variants:
        trainer = make_trainer(name, args, train_set, dims, device, teacher, clip)
        if name == "online":
            result["variants"][name] = time_online(trainer, args, images, val_images, train_set, val_set, device)
            continue
        first = time_epoch(trainer, 0, images, val_images, train_set, val_set, device)
        if barrier:  # a --seeds child: the steady epochs start when every process has compiled
            wait_for_all(Path(barrier[0]), int(barrier[1]), args.seed)
        start = time.time()
        steady = [time_epoch(trainer, e, images, val_images, train_set, val_set, device)
                  for e in range(1, 1 + args.timed_epochs)]
        epoch_s = statistics.median(steady)
        result["variants"][name] = {"first_epoch_s": first, "epoch_s": epoch_s, "steady_epochs_s": steady,
                                    "projected_240_s": first + 239 * epoch_s, "timed_from": start,
                                    "timed_to": time.time()}
    v = result["variants"]
    if "ce" in v and "cached" in v:
        result["cached_over_ce"] = v["cached"]["epoch_s"] / v["ce"]["epoch_s"]
    if "cached" in v and "online" in v:
        result["online_over_cached"] = v["online"]["epoch_s"] / v["cached"]["epoch_s"]
    result.update(settings(args, device), train_samples=args.train_samples, val_samples=args.val_samples,
                  target_bytes=target_bytes(args, dims))
    for name, r in v.items():
        print(f"{name}: {r['epoch_s']:.3f} s/epoch, 240 epochs ~{r['projected_240_s'] / 60:.1f} min")
    if "cached_over_ce" in result:
        print(f"cached / CE epoch: {result['cached_over_ce']:.3f}x (target <= 1.05)")
    return result


def synthetic_cifar(n: int, num_classes: int, seed: int) -> ArrayImageDataset:
    """n random 32x32 uint8 images with random labels, CIFAR-100's statistics: the trainer's data type."""
    rng = np.random.default_rng(seed)
    return ArrayImageDataset("synthetic", "train", "-", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                             rng.integers(0, num_classes, n), [f"c{i}" for i in range(num_classes)],
                             CIFAR_MEAN, CIFAR_STD)


def clip_feature_dim(args: argparse.Namespace) -> int:
    """CLIP's pooled feature width (a --seeds child is told it, so it need not build CLIP)."""
    if args.clip_dims:
        return int(args.clip_dims)
    return load_clip(resolve_clip(args.clip, "random", None), device="cpu").feature_dim


def make_trainer(name: str, args: argparse.Namespace, train_set: ArrayImageDataset, dims: dict[str, int],
                 device: torch.device, teacher: torch.nn.Module, clip) -> Trainer:
    """ce: no targets; cached: RichKD (L+F) targets gathered from tables of the cache's shapes; online:
    the same loss with `train --online`'s targets (teacher on the drawn views, CLIP on the clean images)."""
    distilled = name != "ce"
    cfg = TrainConfig(student=args.student, out="-", target="richkd" if distilled else "ce",
                      feature_loss=args.feature_loss, batch_size=args.batch_size, workers=0, compile=args.compile,
                      seed=args.seed)
    torch.manual_seed(args.seed)
    student = create_model(args.student, args.num_classes).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    labels = torch.from_numpy(train_set.labels)
    objective = create_objective(cfg.resolved_target, "kd" if distilled else None,
                                 args.feature_loss if distilled else None, student_dim=student.num_features,
                                 teacher_dim=dims["teacher"], clip_dim=dims["clip"], labels=labels,
                                 seed=args.seed).to(device)
    optimizer, _ = setup_optimizer(cfg, student, objective)
    n = len(train_set)
    views = torch.from_numpy(view_params("all", n, 32)).to(device) if args.views == "all" else None
    if name == "ce":
        targets = Targets(None, None)
    elif name == "cached":  # the teacher's rows per (sample, view), CLIP's per sample (its clean view)
        v = 1 if views is None else views.shape[1]
        targets = Targets(3.0 * torch.randn(n * v, args.num_classes, device=device),
                          {"teacher": torch.randn(n * v, dims["teacher"], device=device),
                           "clip": torch.randn(n, dims["clip"], device=device)}, views, clip_stride=v)
    else:
        text = torch.nn.functional.normalize(torch.randn(18, args.num_classes, clip.embed_dim), dim=-1)
        space = None
        if args.feature_loss == "cosine":  # the fixed joint space: fitted once, here on random rows
            space = fit_joint_space(torch.randn(4096, dims["teacher"]), torch.randn(4096, dims["clip"]), cfg.lam)
        targets = OnlineTargets(logits=None, features=None, views=views, cfg=cfg,
                                fusion=bench_fusion(clip, text, space, args.num_classes),
                                teacher=Teacher(teacher, "teacher", {}), clips=[(bench_clip(clip), clip)],
                                dataset=train_set)

    def windows(generator: torch.Generator, pool: torch.Tensor):
        yield pool[torch.randperm(len(pool), generator=generator, device=generator.device).cpu()], targets, None

    return Trainer(cfg, student, objective, optimizer, windows)


def time_epoch(trainer: Trainer, epoch: int, images, val_images, train_set, val_set, device: torch.device,
               pool: torch.Tensor | None = None, with_eval: bool = True) -> float:
    """Seconds of one epoch of the trainer's loop (train_epoch, then evaluate), device work included."""
    generator = torch.Generator(device=device).manual_seed(trainer.cfg.seed * 100_003 + epoch)
    sync(device)
    t0 = time.perf_counter()
    train_epoch(trainer.student, trainer.objective, trainer.optimizer, images, train_set, trainer.windows,
                trainer.cfg, epoch, generator, Reporter(quiet=True), DistContext(), pool)
    if with_eval:
        evaluate(trainer.student, val_images, val_set, trainer.cfg.batch_size)
    sync(device)
    return time.perf_counter() - t0


def time_online(trainer: Trainer, args, images, val_images, train_set, val_set, device: torch.device) -> dict:
    """The online epoch: a warm-up batch, then --online-samples samples timed and scaled to the whole set."""
    k = min(args.online_samples, len(train_set))
    time_epoch(trainer, 0, images, val_images, train_set, val_set, device, torch.arange(args.batch_size), False)
    part = time_epoch(trainer, 1, images, val_images, train_set, val_set, device, torch.arange(k), False)
    sync(device)
    t0 = time.perf_counter()
    evaluate(trainer.student, val_images, val_set, trainer.cfg.batch_size)
    sync(device)
    epoch_s = part * len(train_set) / k + time.perf_counter() - t0
    return {"epoch_s": epoch_s, "timed_samples": k, "projected_240_s": 240 * epoch_s}


def target_bytes(args: argparse.Namespace, dims: dict[str, int]) -> int:
    """The cached target tables' size on the device: float32 teacher rows per (sample, view), CLIP's per sample."""
    n, v = args.train_samples, 162 if args.views == "all" else 1
    return 4 * (n * v * (args.num_classes + dims["teacher"]) + n * dims["clip"])


def wait_for_all(folder: Path, count: int, me: int, timeout_s: float = 900.0) -> None:
    """A file barrier between --seeds processes: each writes ready-<seed> and waits for the others'."""
    (folder / f"ready-{me}").touch()
    deadline = time.time() + timeout_s
    while len(list(folder.glob("ready-*"))) < count:
        if time.time() > deadline:
            raise SystemExit(f"stage_two: only {len(list(folder.glob('ready-*')))} of {count} runs became ready")
        time.sleep(0.05)


def seeds_mode(args: argparse.Namespace) -> dict:
    """The cached run alone, then N of them at once (one process per seed, sharing the device)."""
    clip_dim = clip_feature_dim(args)
    alone = run_children(args, 1, clip_dim)[0]
    together = run_children(args, args.seeds, clip_dim)
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


def run_children(args: argparse.Namespace, count: int, clip_dim: int) -> list[dict]:
    """`count` processes of `--epochs --variants cached`, started together; their JSON results."""
    threads = child_threads(args, count)
    forwarded = ["--epochs", "--variants", "cached", "--device", args.device, "--student", args.student,
                 "--teacher", args.teacher, "--clip", args.clip, "--batch-size", args.batch_size,
                 "--num-classes", args.num_classes, "--views", args.views, "--feature-loss", args.feature_loss,
                 "--train-samples", args.train_samples, "--val-samples", args.val_samples,
                 "--timed-epochs", args.timed_epochs, "--clip-dims", clip_dim,
                 *(["--compile"] if args.compile else []), *(["--threads", threads] if threads else [])]
    with tempfile.TemporaryDirectory(prefix="richkd-seeds-") as folder:
        children = [subprocess.Popen([sys.executable, __file__, *map(str, forwarded), "--seed", str(seed),
                                      "--barrier", f"{folder},{count}"], stdout=subprocess.PIPE, text=True)
                    for seed in range(count)]
        outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise SystemExit(f"stage_two: a --seeds run failed (exit codes {[c.returncode for c in children]})")
    return [json.loads(out.strip().splitlines()[-1])["variants"]["cached"] for out in outputs]


def child_threads(args: argparse.Namespace, count: int) -> int | None:
    """CPU threads of each of `count` processes: the cores shared out (None on a GPU: torch's default)."""
    return args.threads or (max(1, (os.cpu_count() or 1) // count) if args.device == "cpu" else None)


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
