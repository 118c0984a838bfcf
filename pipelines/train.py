"""Stage two: images + cache -> student checkpoint and per-epoch metrics.

No teacher and no CLIP model is ever built here. The cached arrays are read whole once, turned into
the distillation targets once (eq. 2-4 and 7 do not depend on the student), and gathered by sample
index per batch, so a step costs what a plain cross-entropy step costs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cache_store import CacheReader, open_cache
from pipelines.config import TrainConfig, resolve_device
from pipelines.distributed import DistContext, barrier, init_distributed, rank_device, shutdown
from pipelines.cached import flat, teacher_logits
from pipelines.progress import Reporter
from richkd_cache.clip_logits import clip_logits
from richkd_cache.data import ImageDataset, create_dataset, dataset_fingerprint, normalize, random_crop_flip
from richkd_cache.distill import (
    DistillObjective,
    FeatureMap,
    build_targets,
    create_objective,
    fit_feature_map,
)
from richkd_cache.errors import ConfigError, DataError
from richkd_cache.files import atomic_path
from richkd_cache.models import create_model, save_checkpoint, uses_small_lr
from richkd_cache.subsets import subset_indices
from richkd_cache.views import apply_views

# Settings that do not change what a run computes; everything else must match to resume.
_NOT_IDENTITY = ("resume", "quiet", "epochs", "workers", "device", "cache_device", "out")


@dataclass
class Targets:
    """Distillation targets for every cached (sample, view) row n * V + v, on the cache device."""

    logits: torch.Tensor | None  # (N * V, C) float32
    features: torch.Tensor | None  # (N * V, Ft) float32
    views: torch.Tensor | None = None  # (N, V, 5) view parameters when V > 1; None: the clean view only


@dataclass
class RunState:
    epoch: int
    best_top1: float
    history: list[dict]


def run_train(cfg: TrainConfig, reporter: Reporter) -> dict:
    """Train one student; returns the summary also written to OUT/summary.json.

    Under torchrun every rank holds the cached targets, trains on its share of each epoch's permutation
    with DistributedDataParallel, and rank 0 evaluates, writes checkpoints and metrics.
    """
    ctx = init_distributed(cfg.device)
    try:
        return train_ranks(cfg, reporter if ctx.is_main else Reporter(reporter.console, quiet=True), ctx)
    finally:
        shutdown(ctx)


def train_ranks(cfg: TrainConfig, reporter: Reporter, ctx: DistContext) -> dict:
    torch.manual_seed(cfg.seed)
    device = resolve_device(rank_device(cfg.device, ctx))
    out = Path(cfg.out)
    if cfg.resolved_target != "ce" and not cfg.cache:
        raise ConfigError(f"target {cfg.resolved_target} distills from a cache: pass --cache (or --target ce)")
    cache = open_cache(cfg.cache) if cfg.cache else None
    train_set, val_set = setup_data(cfg, cache)
    cache_device = resolve_device(cfg.cache_device) if cfg.cache_device else device
    streaming = bool(cfg.stream_window) and cache is not None and cfg.resolved_target != "ce"
    windows = streamed_cache(cfg, cache, cache_device) if streaming else whole_cache(cfg, cache, cache_device)
    student = create_model(cfg.student, train_set.num_classes).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    objective = setup_objective(cfg, student, cache, len(train_set)).to(device)
    optimizer, scheduler = setup_optimizer(cfg, student, objective)
    state = restore(out, cfg, student, objective, optimizer, scheduler) if cfg.resume else None
    state = state or RunState(epoch=0, best_top1=0.0, history=[])
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**asdict(cfg), "target": cfg.resolved_target})
    model, loss = data_parallel(student, ctx), data_parallel(objective, ctx)
    images = setup_images(train_set, device)
    val_images = setup_images(val_set, device) if ctx.is_main else None
    pool = torch.from_numpy(subset_indices(train_set.labels, cfg.fraction, cfg.imbalance, cfg.seed))
    if len(pool) < len(train_set):
        reporter.info(f"training on {len(pool)} of {len(train_set)} samples (fraction {cfg.fraction}, "
                      f"imbalance {cfg.imbalance}); the cache is used as it is")
    generator = torch.Generator(device=device)
    for epoch in range(state.epoch, cfg.epochs):
        generator.manual_seed(cfg.seed * 100_003 + epoch)  # per epoch: a resumed run draws what a straight one did
        t0 = time.perf_counter()
        train_stats = train_epoch(model, loss, optimizer, images, train_set, windows, cfg, epoch, generator,
                                  reporter, ctx, pool)
        scheduler.step()
        state.epoch = epoch + 1
        if ctx.is_main:
            top1, top5 = evaluate(student, val_images, val_set, cfg.batch_size)
            record_epoch(state, optimizer, train_stats, top1, top5, time.perf_counter() - t0, cfg, reporter)
            save_run(out, cfg, student, objective, optimizer, scheduler, state, train_set.num_classes, top1)
        barrier(ctx)
    summary = summarize(cfg, state)
    if ctx.is_main:
        write_json(out / "summary.json", summary)
    return summary


def data_parallel(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP over ranks when there are several and the module has weights to train; the module otherwise.

    Buffers are not broadcast: BN statistics stay per rank (as with DDP's usual BN), and CRD's memory
    banks are updated by each rank for its own samples.
    """
    if not ctx.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    devices = [ctx.local_rank] if next(module.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=devices, broadcast_buffers=False)


def record_epoch(state: RunState, optimizer, train_stats: dict, top1: float, top5: float, seconds: float,
                 cfg: TrainConfig, reporter: Reporter) -> None:
    state.best_top1 = max(state.best_top1, top1)
    state.history.append({"epoch": state.epoch, "lr": optimizer.param_groups[0]["lr"], **train_stats,
                          "val_top1": top1, "val_top5": top5, "best_top1": state.best_top1, "epoch_s": seconds})
    reporter.info(
        f"epoch {state.epoch}/{cfg.epochs}  loss {train_stats['loss']:.3f}  "
        f"top1 {top1:.2f}  top5 {top5:.2f}  best {state.best_top1:.2f}  ({seconds:.1f}s)"
    )


# ---------------------------------------------------------------- data and targets


def setup_data(cfg: TrainConfig, cache: CacheReader | None) -> tuple[ImageDataset, ImageDataset]:
    """The dataset named on the command line, else the one the cache records (its root is a default)."""
    recorded = cache.manifest["dataset"] if cache else {}
    name = cfg.dataset or recorded.get("name")
    if name is None:
        raise ConfigError("no dataset: pass --dataset NAME (and --data-root DIR) or --cache CACHE")
    root = cfg.data_root or recorded.get("root")
    train_set = create_dataset(name, root, "train")
    val_set = create_dataset(name, root, "val")
    if cache:
        check_cache_matches(cache, train_set, name)
    return train_set, val_set


def check_cache_matches(cache: CacheReader, dataset: ImageDataset, name: str) -> None:
    """Refuse to train against data the cache was not built from, naming what differs."""
    recorded = cache.manifest["dataset"]
    differences = []
    if recorded.get("split") != dataset.split:
        differences.append(f"split ({recorded.get('split')} in the cache, {dataset.split} here)")
    if recorded.get("num_classes") != dataset.num_classes:
        differences.append(
            f"class count ({recorded.get('num_classes')} in the cache, {dataset.num_classes} here)"
        )
    elif list(recorded.get("classes", [])) != list(dataset.classes):
        differences.append("class names")
    if recorded.get("num_samples") != len(dataset):
        differences.append(f"sample count ({recorded.get('num_samples')} in the cache, {len(dataset)} here)")
    elif recorded.get("fingerprint") != dataset_fingerprint(dataset):
        differences.append("fingerprint (same size, but images, labels or order differ)")
    if differences:
        raise DataError(
            f"cache {cache.url} was built from other data than {name} at {dataset.root}: "
            + "; ".join(differences)
        )


def cached_arrays(cache: CacheReader) -> tuple[str, ...]:
    """The per-row arrays targets are computed from (the teacher's logits may be stored as top-k)."""
    logits = ("teacher/topk_values", "teacher/topk_indices") if cache.layout.teacher_topk else ("teacher/logits",)
    return (*logits, "teacher/features", "clip/image_embeds", "clip/features")


@dataclass(frozen=True)
class Fusion:
    """What turns cached rows into targets: the prompt set's text embeddings, tau, and the fixed
    CLIP-to-teacher feature map (eq. 7)."""

    text: torch.Tensor  # (M, C, D)
    tau: float
    fmap: FeatureMap | None


def setup_fusion(cfg: TrainConfig, cache: CacheReader) -> Fusion:
    """The feature map is fitted on every row, or with --stream-window on the first window's blocks."""
    if not cache.prompt_sets():
        raise ConfigError(f"cache {cache.url} stores no prompt set: add one with `richkd-cache prompts add`")
    text = torch.from_numpy(cache.text_embeddings(cfg.prompts or cache.prompt_sets()[0]))
    tau = cfg.clip_tau if cfg.clip_tau is not None else cache.manifest["clip"]["tau"]
    fmap = None
    if cfg.resolved_target in ("clip", "richkd"):
        stop = cache.layout.num_samples
        if cfg.stream_window:
            stop = cache.layout.block_range(min(cfg.stream_window, cache.layout.num_blocks) - 1)[1]
        feats = {k: flat(cache.load_rows(k, 0, stop)) for k in ("teacher/features", "clip/features")}
        fmap = fit_feature_map(feats["clip/features"], feats["teacher/features"])
    return Fusion(text, tau, fmap)


def compute_targets(cfg: TrainConfig, arrays: dict[str, np.ndarray], fusion: Fusion, device: torch.device,
                    views: np.ndarray | None) -> Targets:
    """z_C (eq. 2-3), z_F (eq. 4) and f_F (eq. 7) for a set of cached rows, placed on `device`."""
    t_feats, c_embeds, c_feats = (flat(arrays[k]) for k in ("teacher/features", "clip/image_embeds", "clip/features"))
    t_logits = teacher_logits(arrays, fusion.text.shape[1])
    c_logits = clip_logits(c_embeds, fusion.text, fusion.tau, renormalize=cfg.clip_renormalize)  # eq. 2-3
    built = build_targets(cfg.resolved_target, teacher_logits=t_logits, clip_logits=c_logits,
                          teacher_feats=t_feats, clip_feats=c_feats, alpha=cfg.alpha, lam=cfg.lam, fmap=fusion.fmap)
    logits, feats = built.get("logits"), built.get("features")
    pin = device.type == "cpu" and torch.cuda.is_available()  # host copies that feed a GPU are pinned

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.pin_memory() if pin else t

    return Targets(
        logits=None if logits is None else place(logits),
        features=None if feats is None or cfg.feature_loss is None else place(feats),
        views=None if views is None or views.shape[1] == 1 else torch.from_numpy(views).to(device),
    )


Window = tuple[torch.Tensor, Targets, "torch.Tensor | None"]


def whole_cache(cfg: TrainConfig, cache: CacheReader | None, device: torch.device) -> Callable[..., Iterator[Window]]:
    """The default: every row read once, targets computed once; each epoch is one window of all samples."""
    if cache is None or cfg.resolved_target == "ce":
        targets = Targets(None, None)
    else:
        arrays = cache.load_many(list(cached_arrays(cache)))
        targets = compute_targets(cfg, arrays, setup_fusion(cfg, cache), device, cache.load("views/params"))

    def windows(generator: torch.Generator, pool: torch.Tensor) -> Iterator[Window]:
        yield pool[torch.randperm(len(pool), generator=generator, device=generator.device).cpu()], targets, None

    return windows


def streamed_cache(cfg: TrainConfig, cache: CacheReader, device: torch.device) -> Callable[..., Iterator[Window]]:
    """For caches larger than memory: each epoch visits the write blocks (whole chunks) in a random order,
    `stream_window` blocks at a time, and shuffles the samples within each window."""
    fusion, layout = setup_fusion(cfg, cache), cache.layout

    def windows(generator: torch.Generator, pool: torch.Tensor) -> Iterator[Window]:
        in_pool = torch.zeros(layout.num_samples, dtype=torch.bool)
        in_pool[pool] = True
        blocks = torch.randperm(layout.num_blocks, generator=generator, device=generator.device).cpu().tolist()
        for w in range(0, len(blocks), cfg.stream_window):
            ranges = [layout.block_range(b) for b in sorted(blocks[w : w + cfg.stream_window])]
            arrays = {k: np.concatenate([cache.load_rows(k, a, b) for a, b in ranges])
                      for k in (*cached_arrays(cache), "views/params")}
            targets = compute_targets(cfg, arrays, fusion, device, arrays["views/params"])
            samples = torch.cat([torch.arange(a, b) for a, b in ranges])
            local = torch.full((layout.num_samples,), -1, dtype=torch.long)
            local[samples] = torch.arange(len(samples))
            members = samples[in_pool[samples]]
            yield members[torch.randperm(len(members), generator=generator, device=generator.device).cpu()], targets, local

    return windows


def setup_images(dataset: ImageDataset, device: torch.device) -> torch.Tensor | None:
    """CIFAR-sized sets live on the device as one uint8 tensor (N, 3, H, W); batches are index slices."""
    images = getattr(dataset, "images", None)
    if images is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def batches(
    images: torch.Tensor | None, dataset: ImageDataset, batch_size: int, order: torch.Tensor, workers: int = 0
):
    """Yield (index (B,), images uint8 (B, 3, H, W), labels (B,)) in the given order."""
    labels = torch.from_numpy(dataset.labels)
    if images is not None:
        labels = labels.to(images.device)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size].to(images.device)
            yield index, images[index], labels[index]
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=workers
    )
    for batch in loader:
        yield batch["index"], batch["image"], batch["label"]


# ---------------------------------------------------------------- model, loss, optimiser


def setup_objective(cfg: TrainConfig, student: torch.nn.Module, cache: CacheReader | None,
                    num_samples: int) -> DistillObjective:
    """Every target's features live in the teacher's feature space (CLIP's are mapped there, eq. 7)."""
    target = cfg.resolved_target
    distilled = target != "ce" and cache is not None
    return create_objective(
        target,
        cfg.method if distilled else None,
        cfg.feature_loss if distilled else None,
        student_dim=student.num_features,
        target_dim=cache.layout.teacher_dim if distilled else None,
        num_samples=num_samples,
        beta=cfg.beta,
        gamma=cfg.gamma,
        temperature=cfg.temperature,
    )


def setup_optimizer(cfg: TrainConfig, student: torch.nn.Module, objective: torch.nn.Module):
    """mdistiller's CIFAR recipe: SGD momentum 0.9, x0.1 at the milestones, weight decay 5e-4."""
    lr = cfg.lr if cfg.lr is not None else (0.01 if uses_small_lr(cfg.student) else 0.05)
    params = list(student.parameters()) + list(objective.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.lr_decay)
    return optimizer, scheduler


# ---------------------------------------------------------------- loops


def train_epoch(
    student: torch.nn.Module,
    objective: DistillObjective,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor | None,
    dataset: ImageDataset,
    windows: Callable[..., Iterator[Window]],
    cfg: TrainConfig,
    epoch: int,
    generator: torch.Generator,
    reporter: Reporter,
    ctx: DistContext = DistContext(),
    pool: torch.Tensor | None = None,
) -> dict[str, float]:
    """One epoch over `pool` (sample indices; default all), window by window (one window unless the
    cache is streamed). With several ranks each takes every world_size-th sample of each shuffled
    window (training statistics are then rank 0's share)."""
    student.train()
    objective.train()
    device = next(student.parameters()).device
    pool = torch.arange(len(dataset)) if pool is None else pool
    sums: dict[str, float] = {}
    correct = seen = 0
    with reporter.task(f"epoch {epoch + 1}", total=len(pool) // ctx.world_size) as advance:
        for shuffled, targets, local in windows(generator, pool):
            order = shuffled[ctx.rank :: ctx.world_size]
            for index, x, y in batches(images, dataset, cfg.batch_size, order, cfg.workers):
                x, y, index = x.to(device), y.to(device), index.to(device)
                rows_of = index if local is None else local.to(device)[index]  # this window's rows
                x, rows = augment(x, rows_of, targets, generator)
                x = normalize(x, dataset.mean, dataset.std)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                terms, logits = train_step(student, objective, optimizer, x, y, index, targets, epoch, rows)
                for name, value in terms.items():  # summed on the device: no sync per step
                    sums[name] = sums.get(name, 0.0) + value * len(y)
                correct = correct + (logits.argmax(1) == y).sum()
                seen += len(y)
                advance(len(y))
    stats = {f"train_{k}" if k != "loss" else "loss": float(v) / seen for k, v in sums.items()}
    if not math.isfinite(stats["loss"]):
        raise ConfigError(f"the loss became {stats['loss']} in epoch {epoch + 1}; lower --lr or the loss weights")
    stats["train_top1"] = 100.0 * float(correct) / seen
    return stats


def augment(images: torch.Tensor, index: torch.Tensor, targets: Targets,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) uint8 -> the pixels the student sees, and the rows of `targets` that match them
    (`index`: each image's sample position within `targets`).

    A cache with several views per sample replays one stored view per draw (the very pixels the teachers
    saw); a clean-view cache gets CIFAR's crop and flip, as in the paper (its targets are the clean view's).
    """
    if targets.views is None:
        return random_crop_flip(images, padding=images.shape[-1] // 8, generator=generator), index
    num_views = targets.views.shape[1]
    v = torch.randint(0, num_views, (len(index),), generator=generator, device=generator.device).to(index.device)
    params = targets.views[index.to(targets.views.device), v.to(targets.views.device)]
    return apply_views(images, params), index * num_views + v


def train_step(
    student: torch.nn.Module,
    objective: DistillObjective,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    targets: Targets,
    epoch: int,
    rows: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step on a normalised batch x (B, 3, H, W); targets are gathered at `rows`
    (the cache rows of the batch's views; default: the sample indices), CRD's memory at `index`.

    Returns the loss terms (eq. 9, each already weighted) and their sum as "loss", detached and left on
    the device (reading them would wait for the GPU every step), and the student's logits (B, C).
    """
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits, feats = student(x)
    terms = objective(
        logits.float(),
        feats.float(),
        y,
        target_logits=gather(targets.logits, index if rows is None else rows, device),
        target_feats=gather(targets.features, index if rows is None else rows, device),
        index=index,
        epoch=epoch,
    )
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    values = {name: value.detach() for name, value in terms.items()}
    values["loss"] = loss.detach()
    return values, logits.detach()


@torch.no_grad()
def evaluate(
    student: torch.nn.Module, images: torch.Tensor | None, dataset: ImageDataset, batch_size: int
) -> tuple[float, float]:
    """Top-1 and top-5 (%) on the clean validation images."""
    student.eval()
    device = next(student.parameters()).device
    order = torch.arange(len(dataset))
    correct1 = correct5 = 0
    k = min(5, dataset.num_classes)
    for _, x, y in batches(images, dataset, max(batch_size, 256), order):
        x, y = x.to(device), y.to(device)
        logits, _ = student(normalize(x, dataset.mean, dataset.std))
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    n = max(len(dataset), 1)
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def gather(rows: torch.Tensor | None, index: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The cached target rows of this batch's samples, (B, X), on the training device."""
    if rows is None:
        return None
    return rows[index.to(rows.device)].to(device, non_blocking=True)


# ---------------------------------------------------------------- checkpoints, metrics, resume


def run_identity(cfg: TrainConfig) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_run(out: Path, cfg: TrainConfig, student, objective, optimizer, scheduler, state: RunState,
             num_classes: int, top1: float) -> None:
    """last.pth and best.pth in mdistiller's layout; resume.pth with everything else; metrics.parquet."""
    meta = {"config": run_identity(cfg), "target": cfg.resolved_target, "cache": cfg.cache}
    save_checkpoint(str(out / "last.pth"), student, arch=cfg.student, num_classes=num_classes,
                    epoch=state.epoch, best_acc=state.best_top1, extra=meta)
    if top1 >= state.best_top1:
        save_checkpoint(str(out / "best.pth"), student, arch=cfg.student, num_classes=num_classes,
                        epoch=state.epoch, best_acc=state.best_top1, extra=meta)
    resume = {
        "identity": run_identity(cfg),
        "student": student.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
    }
    atomic_torch_save(resume, out / "resume.pth")
    write_metrics(out / "metrics.parquet", state.history)


def restore(out: Path, cfg: TrainConfig, student, objective, optimizer, scheduler) -> RunState | None:
    """Continue from OUT/resume.pth; a file from a run with other settings is refused."""
    path = out / "resume.pth"
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("identity") != run_identity(cfg):
        raise ConfigError(
            f"{path} belongs to a run with other settings; resume with the same settings or use another --out"
        )
    student.load_state_dict(saved["student"])
    objective.load_state_dict(saved["objective"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return RunState(**saved["state"])


def atomic_torch_save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_metrics(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(history), tmp)


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def summarize(cfg: TrainConfig, state: RunState) -> dict:
    last = state.history[-1] if state.history else {}
    return {
        "student": cfg.student,
        "target": cfg.resolved_target,
        "method": cfg.method if cfg.resolved_target != "ce" else None,
        "epochs": state.epoch,
        "seed": cfg.seed,
        "last_top1": last.get("val_top1", math.nan),
        "last_top5": last.get("val_top5", math.nan),
        "best_top1": state.best_top1,
        "out": cfg.out,
    }
