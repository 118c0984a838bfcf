"""Stage two: images + cache -> student checkpoint and per-epoch metrics.

No teacher and no CLIP model is ever built here: targets come from the cache (pipelines/targets.py),
the run folder (checkpoints, metrics, resume) is pipelines/run_folder.py, and this file is the loop.
A step costs what a plain cross-entropy step costs.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

from cache_store import CacheReader, open_cache
from pipelines.config import TrainConfig, logit_params, recorded_method, resolve_device
from pipelines.memory import training_bytes
from pipelines.distributed import DistContext, barrier, init_distributed, rank_device, shutdown
from pipelines.optim import make_optimizer, make_schedule
from pipelines.progress import Reporter
from pipelines.resolve import resolve_settings, resolved_lr
from pipelines.run_folder import RunFolder
from pipelines.targets import (Draws, StageTwoTargets, augment, check_features_stored, features_needed,
                               prefetched, selected_clips, setup_targets, strong_pixels, strong_views_needed,
                               student_policy, to_device)
from richkd_cache.data import ImageDataset, create_dataset, dataset_fingerprint, normalize
from richkd_cache.data.replay import DrawnViews
from richkd_cache.distill import DistillObjective, create_objective
from richkd_cache.errors import ConfigError, DataError
from richkd_cache.models import create_model, input_size_options
from richkd_cache.subsets import subset_indices
from richkd_cache.views import ViewPolicy


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
    """Set everything up (every setting is checked before the run folder is written), then train."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(rank_device(cfg.device, ctx))
    if cfg.precision != "fp32" and device.type != "cuda":
        reporter.info(f"--precision {cfg.precision} applies on CUDA; this {device.type} run trains in fp32")
    run = RunFolder(cfg, ctx.is_main)
    method = logit_params(cfg)  # a setting the method does not use fails before any data is read
    if cfg.resolved_target != "ce" and not cfg.cache:
        raise ConfigError(f"target {cfg.resolved_target} distills from a cache: pass --cache (or --target ce)")
    cache = open_cache(cfg.cache) if cfg.cache else None
    if cache is not None and features_needed(cfg):
        check_features_stored(cache, f"--feature-loss {cfg.feature_loss}", "train with --feature-loss none")
    train_set, val_set = setup_data(cfg, cache)
    pool = setup_pool(cfg, train_set, reporter)
    # the compact rows: the shared memory-mapped copy on the host unless --cache-device puts a copy elsewhere
    cache_device = resolve_device(cfg.cache_device, "--cache-device") if cfg.cache_device else torch.device("cpu")
    cfg = resolve_settings(cfg, cache, train_set, device, cache_device)  # defaults named: config.json says what trains
    # its weights: from the seed alone; a timm student is built for the data's size unless told otherwise
    student = create_model(cfg.student, train_set.num_classes,
                           **input_size_options(cfg.student, cfg.student_image_size or train_set.image_side)).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    objective = setup_objective(cfg, student, cache, train_set, pool, method).to(device)
    optimizer, scheduler = setup_optimizer(cfg, student, objective)
    working = training_bytes(student, [p for g in optimizer.param_groups for p in g["params"]], train_set.image_side,
                             cfg.batch_size, min(max(cfg.batch_size, 1024), len(val_set)),
                             held_images(train_set, val_set, ctx), objective.step_bytes(cfg.batch_size))
    source = setup_source(cfg, cache, train_set, pool, device, cache_device, reporter, working)
    state = run.start(student, objective, optimizer, scheduler, {**asdict(cfg), "target": cfg.resolved_target,
                                                                      **recorded_method(cfg, method),
                                                                      "clip_models": used_clip_models(cfg, cache)})
    reporter = run.logging(reporter)  # --log: each step's loss terms and lr to TensorBoard / W&B
    model, loss = data_parallel(student, ctx), data_parallel(objective, ctx)
    images = setup_images(train_set, device)
    val_images = setup_images(val_set, device) if ctx.is_main else None
    generator = torch.Generator(device=device)
    for epoch in range(state.epoch, cfg.epochs):
        generator.manual_seed(cfg.seed * 100_003 + epoch)  # per epoch: a resumed run draws what a straight one did
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains with (the scheduler steps after it)
        stats = train_epoch(model, loss, optimizer, images, train_set, source, cfg, epoch, generator,
                            reporter, ctx, pool)
        scheduler.step()
        state.epoch = epoch + 1
        if ctx.is_main:
            top1, top5 = evaluate(student, val_images, val_set, cfg.batch_size, cfg.workers, reporter)
            stats = {"lr": lr, **stats, "val_top1": top1, "val_top5": top5, "epoch_s": time.perf_counter() - t0}
            run.end_epoch(state, stats, student, objective, optimizer, scheduler, train_set.num_classes, reporter)
        barrier(ctx)
    return run.finish(state)


def used_clip_models(cfg: TrainConfig, cache: CacheReader | None) -> list[str]:
    """The CLIP models the targets come from, as resolved (--clip-model, or the cache's only one): recorded
    with the run, so a run says which CLIP it learned from whatever the cache holds later."""
    if cache is None or cfg.resolved_target == "ce":
        return []
    return [c.name for c in selected_clips(cfg, cache)]


def setup_source(cfg: TrainConfig, cache: CacheReader | None, train_set: ImageDataset, pool: torch.Tensor,
                 device: torch.device, cache_device: torch.device, reporter: Reporter,
                 working: int = 0) -> StageTwoTargets | None:
    """Where each batch's targets come from: the cache's rows, gathered per batch (None: plain cross-entropy),
    or the teacher and CLIP run on every batch (--online, the reference). `working`: the private bytes the
    training itself will add (`training_bytes`), checked with the cache's."""
    distilled = cache is not None and cfg.resolved_target != "ce"
    if cfg.online and not distilled:
        raise ConfigError("--online computes distillation targets: it needs --cache and a target other than ce")
    if not distilled:
        return None
    if cfg.online and strong_views_needed(cfg, cache):
        raise ConfigError(f"--online runs no teacher on strong views: train {cfg.method} from the cache")
    source = setup_targets(cfg, cache, train_set.labels, pool, device, cache_device, reporter, working=working)
    in_files = getattr(train_set, "images", None) is None and source.policy.whole_image
    if in_files and (cfg.online or source.strong_policy is not None):  # they also need the clean image
        raise ConfigError(f"{'train --online' if cfg.online else 'strong views'} need the clean image beside the "
                          f"drawn view, and image files under {source.policy.name} views are decoded to the view "
                          "alone in the loader's workers: train from the cache without them")
    if cfg.online:
        from pipelines.online import online_source  # builds models: imported only when asked for

        return online_source(cfg, cache, train_set, source, device)
    return source


def held_images(train_set: ImageDataset, val_set: ImageDataset, ctx: DistContext) -> int:
    """Bytes of the channels-first copies `setup_images` makes of in-memory sets (rank 0 also of validation's)."""
    sets = (train_set, val_set) if ctx.is_main else (train_set,)
    return sum(getattr(s, "images", np.empty(0, np.uint8)).nbytes for s in sets)


def setup_pool(cfg: TrainConfig, train_set: ImageDataset, reporter: Reporter) -> torch.Tensor:
    """The sample indices trained on: all of them, or a few-shot / long-tailed subset (no rebuild)."""
    pool = torch.from_numpy(subset_indices(train_set.labels, cfg.fraction, cfg.imbalance, cfg.seed))
    if len(pool) < len(train_set):
        reporter.info(f"training on {len(pool)} of {len(train_set)} samples (fraction {cfg.fraction}, "
                      f"imbalance {cfg.imbalance}); the cache is used as it is")
    return pool


def data_parallel(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP over ranks when there are several and the module has weights to train; the module otherwise.

    Buffers are not broadcast: BN statistics stay per rank (as with DDP's usual BN), and CRD's memory
    banks are updated by each rank for its own samples.
    """
    if not ctx.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    devices = [ctx.local_rank] if next(module.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=devices, broadcast_buffers=False)


# ---------------------------------------------------------------- data and targets


def setup_data(cfg: TrainConfig, cache: CacheReader | None) -> tuple[ImageDataset, ImageDataset]:
    """The dataset named on the command line, else the one the cache records (its root is a default), opened
    with the options the cache records (imagefolder's image size) unless others are given."""
    recorded = cache.manifest["dataset"] if cache else {}
    name = cfg.dataset or recorded.get("name")
    if name is None:
        raise ConfigError("no dataset: pass --dataset NAME (and --data-root DIR) or --cache CACHE")
    root = cfg.data_root or recorded.get("root")
    given = {"image_size": cfg.image_size, "resize": cfg.resize}
    options = {**(recorded.get("options") or {}), **{k: v for k, v in given.items() if v is not None}}
    train_set = create_dataset(name, root, "train", **options)
    val_set = create_dataset(name, root, "val", **options)
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
    options = recorded.get("options")  # caches built before options were recorded used the defaults
    if options is not None and options != dataset.options:
        differences.append(f"image options ({options} in the cache, {dataset.options} here)")
    if recorded.get("num_samples") != len(dataset):
        differences.append(f"sample count ({recorded.get('num_samples')} in the cache, {len(dataset)} here)")
    elif recorded.get("fingerprint") != dataset_fingerprint(dataset):
        differences.append("fingerprint (same size, but images, labels or order differ)")
    if differences:
        raise DataError(
            f"cache {cache.url} was built from other data than {name} at {dataset.root}: "
            + "; ".join(differences)
        )


def setup_images(dataset: ImageDataset, device: torch.device) -> torch.Tensor | None:
    """CIFAR-sized sets live on the device as one uint8 tensor (N, 3, H, W); batches are index slices."""
    images = getattr(dataset, "images", None)
    if images is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def batches(
    images: torch.Tensor | None, dataset: ImageDataset, batch_size: int, order: torch.Tensor, workers: int = 0,
    views: DrawnViews | None = None,
):
    """Yield (index (B,), images uint8 (B, 3, H, W), labels (B,)) in the given order; with `views` (image
    files, whole-image views), the images are the drawn views, decoded and replayed in the loader's workers."""
    labels = torch.from_numpy(dataset.labels)
    if images is not None:
        labels = labels.to(images.device)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size].to(images.device)
            yield index, images[index], labels[index]
        return
    source = views if views is not None else torch.utils.data.Subset(dataset, order.tolist())
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=workers)
    for batch in loader:
        yield batch["index"], batch["image"], batch["label"]


# ---------------------------------------------------------------- model, loss, optimiser


def setup_objective(cfg: TrainConfig, student: torch.nn.Module, cache: CacheReader | None,
                    train_set: ImageDataset, pool: torch.Tensor, method: dict[str, float] | None) -> DistillObjective:
    """The feature loss sees the target's feature parts (the teacher's and/or CLIP's); CRD also needs the
    labels (negatives of other classes) and the samples trained on (its memory bank)."""
    target = cfg.resolved_target
    distilled = target != "ce" and cache is not None
    return create_objective(
        target,
        cfg.method if distilled else None,
        cfg.feature_loss if distilled else None,
        student_dim=student.num_features,
        teacher_dim=cache.layout.teacher_dim if distilled else None,
        clip_dim=sum(c.feature_dim for c in selected_clips(cfg, cache)) or None if distilled else None,
        lam=cfg.lam,
        labels=torch.from_numpy(train_set.labels.astype(np.int64)),
        trained=pool,
        seed=cfg.seed,
        gamma=cfg.gamma,
        logit_params=method if distilled else None,
    )


def setup_optimizer(cfg: TrainConfig, student: torch.nn.Module, objective: torch.nn.Module):
    """By default mdistiller's CIFAR recipe: SGD momentum 0.9, x0.1 at the milestones, weight decay 5e-4;
    ViT recipes choose AdamW with a warmed-up cosine (pipelines/optim.py)."""
    lr = resolved_lr(cfg)
    optimizer = make_optimizer(cfg.optimizer, (student, objective), lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_schedule(optimizer, cfg.schedule, cfg.epochs, cfg.milestones, cfg.lr_decay,
                              cfg.warmup_epochs, cfg.min_lr)
    return optimizer, scheduler


# ---------------------------------------------------------------- loops


def train_epoch(
    student: torch.nn.Module,
    objective: DistillObjective,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor | None,
    dataset: ImageDataset,
    source: StageTwoTargets | None,
    cfg: TrainConfig,
    epoch: int,
    generator: torch.Generator,
    reporter: Reporter,
    ctx: DistContext = DistContext(),
    pool: torch.Tensor | None = None,
) -> dict[str, float]:
    """One epoch over `pool` (sample indices; default all) in a fresh full shuffle, each sample at one
    drawn view. With several ranks each takes every world_size-th draw (training statistics are then rank
    0's share). The next batch's cached rows are gathered while this one trains (`prefetched`)."""
    student.train()
    objective.train()
    device = next(student.parameters()).device
    pool = torch.arange(len(dataset)) if pool is None else pool
    compiled = compiled_step(device.type) if cfg.compile else None
    sums: dict[str, torch.Tensor | float] = {}
    correct = seen = 0
    if source is None:
        draws = Draws(pool[torch.randperm(len(pool), generator=generator, device=generator.device).cpu()])
    else:
        draws = source.rows.draw(pool, generator, epoch)
    draws = draws.share(ctx.rank, ctx.world_size)
    order = draws.index.to(device) if images is not None else draws.index  # one copy per epoch, not per batch
    policy = source.policy if source is not None else student_policy(None, dataset.image_side)
    in_workers = replayed_in_workers(images, dataset, policy, source, draws, cfg, epoch)
    cached = prefetched(draws, cfg.batch_size, gatherer(source, dataset, images))
    with reporter.task(f"epoch {epoch + 1}", total=len(draws.index)) as advance:
        for (index, x, y), (_, rows, strong_rows) in zip(
                batches(images, dataset, cfg.batch_size, order, cfg.workers, in_workers), cached):
            x, y, index = x.to(device), y.to(device), index.to(device)
            rows, strong_rows = to_device(rows, device), to_device(strong_rows, device)
            records = rows.pop("views/params", None)
            # (B, 3, H, W) uint8: the drawn views (already cut in the loader's workers, or with the rows)
            pixels = x if in_workers is not None else rows.pop("pixels", None)
            pixels = augment(x, records, policy, generator) if pixels is None else pixels
            target_logits, target_feats = (None, {}) if source is None else source.targets(rows, x, pixels, y)
            # a two-view method's (MLKD) second input: the drawn strong view's pixels and its targets
            strong = None
            if strong_rows:
                strong = (model_input(strong_pixels(x, strong_rows, source.strong_policy), dataset),
                          source.strong_targets(strong_rows, y))
            x = model_input(pixels, dataset)
            # The compiled step sees one static batch shape. The epoch's last, partial batch runs eagerly
            # on the same weights and optimiser instead of being padded: padded rows would enter
            # BatchNorm's batch statistics and CRD's memory banks, and every loss would need row
            # weights. One eager step per epoch (CIFAR: 50,000 = 781 x 64 + 16) costs nothing.
            step = compiled if compiled is not None and len(y) == cfg.batch_size else train_step
            terms, logits = step(student, objective, optimizer, x, y, index, target_logits, target_feats, epoch,
                                 strong, cfg.precision)
            reporter.step(terms)
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


def gatherer(source: StageTwoTargets | None, dataset: ImageDataset,
             images: torch.Tensor | None) -> Callable[[Draws], tuple[dict, dict]] | None:
    """What the background thread gathers per batch: the cached rows, and for in-memory images under a
    whole-image policy (deit, random-resized crops of CIFAR) also the views' pixels, replayed there on the
    host (where stage one replayed them) rather than in the step."""
    host = getattr(dataset, "images", None)  # (N, H, W, 3) uint8
    if source is None or images is None or host is None or not source.policy.whole_image:
        return None if source is None else source.gather
    policy = source.policy

    def gather(draws: Draws) -> tuple[dict, dict]:
        rows, strong = source.gather(draws)
        x = torch.from_numpy(np.ascontiguousarray(host[draws.index.numpy()].transpose(0, 3, 1, 2)))
        rows["pixels"] = policy.replay_packed(x, rows.pop("views/params").cpu())
        return rows, strong

    return gather


def replayed_in_workers(images: torch.Tensor | None, dataset: ImageDataset, policy: ViewPolicy,
                        source: StageTwoTargets | None, draws: Draws, cfg: TrainConfig, epoch: int) -> DrawnViews | None:
    """Image files under a whole-image policy are decoded and cut in the loader's workers: the epoch's drawn
    records (a few bytes per draw, gathered at once), or fresh draws from the epoch's seed. None: the views
    are replayed on the training device (in-memory images, or views of the clean image)."""
    if images is not None or not policy.whole_image:
        return None
    records = source.rows.records(draws) if source is not None and draws.view is not None else None
    return DrawnViews(dataset, policy, draws.index.numpy(), records, seed=cfg.seed * 100_003 + epoch)


def model_input(pixels: torch.Tensor, dataset: ImageDataset) -> torch.Tensor:
    """uint8 pixels (B, 3, H, W) -> the normalised float batch the student takes (channels-last on CUDA)."""
    x = normalize(pixels, dataset.mean, dataset.std)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


@functools.cache
def compiled_step(device_type: str) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """`train_step` (forward, objective, backward, optimiser step) under torch.compile, built once per process.

    On CUDA the "reduce-overhead" mode replays the step's kernels as CUDA graphs: at batch 64 a step is
    bound by kernel launches and Python, not arithmetic. A CPU has no launches to save: inductor's default.
    `zero_grad` and `backward()` break the graph: the forward and objective (with their compiled backward)
    and the optimiser step are compiled graphs of their own. The epoch counter recompiles once (then it is
    a symbol), and so does each lr change at a milestone.
    """
    step = torch.compile(train_step, mode="reduce-overhead" if device_type == "cuda" else "default")
    if device_type != "cuda":
        return step

    def graphed(*args: object) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        # a new iteration: the graphs may now reuse the memory of the previous step's outputs, which the
        # loop has already folded into its sums
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args)

    return graphed


def train_step(
    student: torch.nn.Module,
    objective: DistillObjective,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    target_logits: torch.Tensor | None,
    target_feats: dict[str, torch.Tensor],
    epoch: int,
    strong: tuple[torch.Tensor, torch.Tensor] | None = None,
    precision: str = "fp32",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step on a normalised batch x (B, 3, H, W) towards the batch's target logits (B, C)
    and feature parts {name: (B, F)}; CRD's memory is keyed by `index` (sample indices). `strong`: a second
    view's normalised batch and its target logits (B, C), for a two-view method (MLKD). `precision`: the
    student's forward in fp32, or under bf16 autocast ("bf16", CUDA only); the losses are fp32 either way.

    Returns the loss terms (eq. 9, each already weighted) and their sum as "loss", detached and left on
    the device (reading them would wait for the GPU every step), and the student's logits (B, C).
    """
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda"):
        logits, feats = student(x)
        # a forward of its own, as MLKD's KD_ours.py runs the student on each view (BatchNorm statistics per view)
        strong_logits = None if strong is None else student(strong[0])[0].float()
    terms = objective(
        logits.float(),
        feats.float(),
        y,
        target_logits=target_logits,
        target_feats=target_feats,
        index=index,
        epoch=epoch,
        strong_logits=strong_logits,
        strong_target_logits=None if strong is None else strong[1],
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
    student: torch.nn.Module, images: torch.Tensor | None, dataset: ImageDataset, batch_size: int, workers: int = 0,
    reporter: Reporter | None = None,
) -> tuple[float, float]:
    """Top-1 and top-5 (%) on the clean validation images, in batches of at least 1024 (no weights change,
    so a batch is as large as memory allows), counted on the device and read once; with `reporter`, its
    progress by images (ImageNet's 50,000 validation JPEGs take minutes to decode)."""
    student.eval()
    device = next(student.parameters()).device
    order = torch.arange(len(dataset))
    correct1 = correct5 = torch.zeros((), dtype=torch.long, device=device)
    k = min(5, dataset.num_classes)
    with (reporter or Reporter(quiet=True)).task("validation", total=len(dataset)) as advance:
        for _, x, y in batches(images, dataset, max(batch_size, 1024), order, workers):  # files: decoded in workers
            x, y = model_input(x.to(device), dataset), y.to(device)
            logits, _ = student(x)
            top = logits.topk(k, dim=1).indices
            correct1 = correct1 + (top[:, 0] == y).sum()
            correct5 = correct5 + (top == y[:, None]).any(dim=1).sum()
            advance(len(y))
    n = max(len(dataset), 1)
    return 100.0 * int(correct1) / n, 100.0 * int(correct5) / n
