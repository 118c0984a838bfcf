"""Stage one: dataset -> teacher + CLIP forward (no grad) -> a Zarr cache with its manifest.

Every write block of rows is computed, written whole in one call and only then flagged in `written`
(cache_store does the flagging), so a build killed at any moment resumes where it stopped and ends
identical to an uninterrupted one. Writes run on a background thread so they overlap the next forward.

A cache holds one or more CLIP models (`--clip A,B`), each with its own flags. A build into a complete cache
with a CLIP model it lacks runs only that model over the images (the teacher's blocks are all flagged, so
the teacher never runs) and adds it; killed, it resumes like any build.
"""

from __future__ import annotations

import importlib.metadata
import math
import shutil
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache_store import (
    CacheError,
    CacheLayout,
    CacheReader,
    CacheWriter,
    choose_block_rows,
    create_cache,
    open_cache,
    open_for_write,
)
from cache_store._store import check_filesystem, is_remote, local_path
from cache_store.schema import ClipLayout, clip_model_name
from pipelines.cached import has_clean_views, stored_policy
from pipelines.config import BuildConfig, resolve_device
from pipelines.distributed import (
    DistContext,
    barrier,
    broadcast,
    contiguous_share,
    init_distributed,
    rank_device,
    shutdown,
)
from pipelines.progress import Reporter
from pipelines.summary import human_bytes, prompt_set_accuracy
from richkd_cache.clip import ClipSpec, ClipTeacher, load_clip, resolve_clip
from richkd_cache.data import ImageDataset, create_dataset, dataset_fingerprint, normalize
from richkd_cache.distill import topk_kl, topk_log_probs
from richkd_cache.errors import ConfigError, RichKDError
from richkd_cache.files import file_sha256
from richkd_cache.models import load_checkpoint, resolve_checkpoint
from richkd_cache.data.replay import WithViews
from richkd_cache.views import (
    CIFAR_SIZE,
    ViewPolicy,
    clean_view_index,
    clip_policy,
    create_policy,
    num_views,
    parse_policy,
    policy_of,
    stored_views,
    teacher_policy,
)
from richkd_cache.prompts import (
    PromptSet,
    check_prompt_set_name,
    class_prompts,
    get_prompt_set,
    load_prompt_file,
    prompt_set_manifest,
)

# Teacher views per forward call: CIFAR teachers are small and 32 px views cheap, so their calls are
# larger than CLIP's: the pixels of 4096 CIFAR images, or --batch-size views where that is more. Larger
# images get --batch-size views per call, however many views a sample has.
TEACHER_PIXELS_PER_CALL = 4096 * CIFAR_SIZE * CIFAR_SIZE


@dataclass(frozen=True)
class BuildViews:
    """The views stage one stores per sample: the teacher's (`value`: clean, all, or K draws of `policy`, from
    `seed`), CLIP's count (1, the clean view, or the teacher's), and K strong views (MLKD's) or none."""

    value: str | int
    policy: ViewPolicy
    seed: int = 0
    clip_views: int = 1
    strong: ViewPolicy | None = None
    strong_views: int = 0

    @property
    def num_views(self) -> int:
        return num_views(self.value, self.policy.size)

    @property
    def stores_clean_row(self) -> bool:
        """Random views hold no clean view: the teacher's row on it is stored apart (accuracy reports)."""
        return clean_view_index(self.value, self.policy.size) is None

    def records(self, index: np.ndarray) -> np.ndarray:
        """(B, V, nbytes) uint8: the stored records of the samples `index` (views replayed on the device)."""
        if not isinstance(self.value, int):  # clean, all: the same records for every sample
            table = stored_views(self.value, self.policy, self.seed, 0, self.num_views)
            return np.broadcast_to(table, (len(index), *table.shape)).copy()
        return np.stack([stored_views(self.value, self.policy, self.seed, int(i), self.num_views) for i in index])

    def strong_records(self, index: np.ndarray) -> np.ndarray:
        """(B, K, nbytes) uint8: the samples' strong views, each drawn from the sample's own generator."""
        return np.stack([stored_views(self.strong_views, self.strong, self.seed, int(i), self.strong_views)
                         for i in index])


def recorded_views(reader: CacheReader) -> BuildViews:
    """The views a cache records, as its build drew them (verify recomputes rows with them)."""
    views, layout = reader.manifest["views"], reader.layout
    value = parse_policy(str(views["policy"]))
    strong = stored_policy(reader, "strong") if layout.strong_views else None
    # one --view-seed drew both; the top level records it for random teacher views only
    seed = views.get("seed") if views.get("seed") is not None else (views.get("strong") or {}).get("seed")
    return BuildViews(value, stored_policy(reader), int(seed or 0), layout.clip_num_views, strong,
                      layout.strong_views or 0)


def build_views(cfg: BuildConfig, dataset: ImageDataset) -> BuildViews:
    """The views `cfg` asks for on `dataset` (its side, and its normalisation for policies that fill pixels)."""
    size = image_size(dataset)
    policies = view_policies(cfg, size)
    value = policies["teacher"]["policy"]
    policy = policy_of(value, size, cfg.view_policy, (dataset.mean, dataset.std))
    return BuildViews(value, policy, cfg.view_seed, policies["clip"]["num_views"],
                      create_policy("mlkd-strong", size) if cfg.strong_views else None, cfg.strong_views)


@dataclass(frozen=True)
class Teacher:
    model: torch.nn.Module
    arch: str
    manifest: dict


# A CLIP model with the arrays it fills: its stored name, flags and array paths.
Clip = tuple[ClipLayout, ClipTeacher]
TEACHER_FLAGS = "written"  # the teacher's part (labels, views/params, teacher/*) is flagged here


def run_build(cfg: BuildConfig, reporter: Reporter) -> str:
    """Build (or resume) the cache at cfg.out and return its location. Under torchrun, every rank
    computes a contiguous share of the pending blocks."""
    ctx = init_distributed(cfg.device)
    try:
        check_filesystem(cfg.out)  # an s3:// cache without s3fs fails here, not after the models load
        device = resolve_device(rank_device(cfg.device, ctx))
        say = reporter if ctx.is_main else Reporter(reporter.console, quiet=True)
        dataset = create_dataset(cfg.dataset, cfg.data_root, cfg.split, image_size=cfg.image_size, resize=cfg.resize)
        views = build_views(cfg, dataset)
        prompt_sets = [resolve_prompt_set(p, cfg.dataset, dataset.classes) for p in cfg.prompts]  # before the models
        specs = clip_specs(cfg)
        with say.stage("loading teacher " + " ".join(filter(None, (cfg.teacher, cfg.teacher_checkpoint)))):
            teacher = setup_teacher(cfg.teacher, cfg.teacher_checkpoint, dataset, device)
        models = {}
        for name, spec in specs.items():
            with say.stage(f"loading CLIP {name} on {device}"):
                models[name] = load_clip(spec, device=device)
        existing = existing_cache(cfg)
        stored = existing.layout if existing else None
        features = cfg.features if cfg.features is not None else stored is None or stored.stores_features
        layout = cache_layout(len(dataset), dataset.num_classes, teacher.model.num_features, list(models.values()),
                              cfg.block_rows or (stored and stored.block_rows), views, cfg.topk, features)
        writer, pending = open_cache_for_build(cfg, layout, build_manifest(cfg, dataset, teacher, models),
                                               models, prompt_sets, dataset.classes, ctx, say, existing)
        clips = [(writer.clips[name], model) for name, model in models.items()]
        blocks = contiguous_share(list(pending), ctx)
        topk_error = forward_blocks(writer, blocks, dataset, teacher, clips, device, cfg.batch_size, cfg.workers,
                                    say, ctx.world_size, views, cfg.topk, pending)
        barrier(ctx)
        if ctx.is_main:
            finish_build(writer, cfg, list(models), topk_error)
        barrier(ctx)
        return cfg.out
    finally:
        shutdown(ctx)


def finish_build(writer: CacheWriter, cfg: BuildConfig, models: list[str], topk_error: tuple[float, int]) -> None:
    """Accuracies from the cache itself, then the teacher's part and this build's CLIP models completed."""
    teacher, zero_shot = accuracy_summary(cfg.out, models)
    if cfg.topk and topk_error[1]:
        teacher.update(topk_kl_mean=topk_error[0] / topk_error[1], topk_kl_rows=topk_error[1])
    writer.update_manifest(teacher=teacher)
    for name, accuracy in zero_shot.items():
        writer.update_clip_record(name, zero_shot_accuracy=accuracy)
    writer.finalize(models)


def clip_specs(cfg: BuildConfig) -> dict[str, ClipSpec]:
    """Each `--clip` model by the name it is stored under, with its weights and activation: each of
    --clip-pretrained, --clip-checkpoint and --clip-activation gives one value for every model or a
    comma-separated list with one item per model (an empty item: none)."""
    names = [n.strip() for n in cfg.clip.split(",")]
    if "" in names:
        raise ConfigError(f"--clip {cfg.clip!r} names an empty model; separate models with commas (ViT-L/14,RN50x64)")
    stored = [clip_model_name(n) for n in names]
    repeated = sorted({n for n in stored if stored.count(n) > 1})
    if repeated:
        raise ConfigError(f"--clip names {', '.join(repeated)} more than once")

    def per_model(flag: str, value: str | None) -> list[str | None]:
        items = [None] * len(names) if value is None else [v.strip() or None for v in value.split(",")]
        if len(items) == 1:
            return items * len(names)
        if len(items) != len(names):
            raise ConfigError(f"{flag} gives {len(items)} values for {len(names)} CLIP models: give one for all, "
                              f"or one per --clip model in order")
        return items

    weights = zip(per_model("--clip-pretrained", cfg.clip_pretrained),
                  per_model("--clip-checkpoint", cfg.clip_checkpoint),
                  per_model("--clip-activation", cfg.clip_activation))
    return {name: resolve_clip(requested, *given) for name, requested, given in zip(stored, names, weights)}


def existing_cache(cfg: BuildConfig) -> CacheReader | None:
    """The cache already at cfg.out (a resumed build, or one adding a CLIP model keeps its layout's block
    rows, whatever the models' row sizes, and whether it stores features); None when there is none or it
    is replaced."""
    if cfg.overwrite:
        return None
    try:
        return open_cache(cfg.out, require_complete=False, check_chunks=False)
    except CacheError:
        return None


def open_cache_for_build(cfg: BuildConfig, layout: CacheLayout, manifest: dict, models: dict[str, ClipTeacher],
                         prompt_sets: list[PromptSet], classes: list[str], ctx: DistContext, reporter: Reporter,
                         existing: CacheReader | None = None):
    """Rank 0 creates (or reopens to resume, or to add CLIP models) the cache, says what the build will
    do (and, resuming, what is done and what differs from the recorded build) and stores the prompt sets;
    then every rank opens it and receives the same pending blocks, each with the flags of the parts it
    lacks. A refusal on rank 0 stops every rank with it."""
    error, pending = None, {}
    if ctx.is_main:
        try:
            disk = layout_bytes(layout, list(models.values()))
            check_space(cfg.out, disk)
            writer = create_cache(cfg.out, layout, manifest, overwrite=cfg.overwrite)
            wanted = {TEACHER_FLAGS, *(writer.clips[name].written for name in models)}
            pending = {b: [f for f in flags if f in wanted] for b, flags in writer.pending_parts().items()}
            pending = {b: flags for b, flags in pending.items() if flags}
            if existing is not None:
                reporter.info(resume_line(cfg, existing, list(models), prompt_sets, pending))
            reporter.info(plan_line(writer, models, prompt_sets, classes, pending, disk))
            for name, model in models.items():
                store_prompt_sets(writer, name, model, prompt_sets, classes, reporter)
        except (CacheError, RichKDError) as e:
            error = e
    error, pending = broadcast((error, pending), ctx)
    if error is not None:
        raise error
    return (writer if ctx.is_main else open_for_write(cfg.out)), pending


def setup_teacher(arch: str | None, weights: str, dataset: ImageDataset, device: torch.device) -> Teacher:
    """Load the teacher strictly from a file or torchvision's published weights (`torchvision:TAG`); its
    class count must be the dataset's."""
    checkpoint = resolve_checkpoint(weights, arch)
    model, meta = load_checkpoint(checkpoint, arch=arch, num_classes=dataset.num_classes)
    model = model.to(device).eval()
    resolved_arch = meta["arch"]  # the registered name, also when an alias was given
    manifest = {
        "arch": resolved_arch,
        "checkpoint": checkpoint,
        "checkpoint_sha256": file_sha256(checkpoint),
        "weights": weights,  # as asked: the file, or torchvision:TAG, which resolves on any machine
        "num_features": model.num_features,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
    }
    return Teacher(model=model, arch=resolved_arch, manifest=manifest)


def recorded_teacher(given: str | None, recorded: dict) -> str:
    """The teacher's weights for a cache: `given` (a file or torchvision:TAG), else the recorded file, else
    (that file is not on this machine) the recorded torchvision:TAG, which resolves here."""
    if given:
        return given
    path, weights = recorded.get("checkpoint"), recorded.get("weights")
    if path and not Path(path).is_file() and weights and weights != path:
        return weights
    return path


def resolve_prompt_set(name_or_file: str, dataset: str, classes: list[str], name: str | None = None) -> PromptSet:
    """A shipped set by name, or a user set from a .toml/.json file (stored as `name` when given), checked
    against the dataset's classes: a bad file is refused before any model is loaded."""
    if name is not None:
        check_prompt_set_name(name, "--name")
    if name_or_file.endswith((".toml", ".json")):
        prompt_set = load_prompt_file(name_or_file, name)
    else:
        prompt_set = get_prompt_set(name_or_file, dataset)
        prompt_set = dataclasses.replace(prompt_set, name=name) if name else prompt_set
    class_prompts(prompt_set, classes)  # every template fills, every synonym names a class
    return prompt_set


def image_size(dataset: ImageDataset) -> int:
    """The side of the dataset's (square) images, which view parameters are fractions of."""
    return dataset.image_side


def check_view_policy(policy: str | int, size: int) -> None:
    """Refuse `all` where it is not CIFAR's 162 views (9 x 9 offsets of a 32 px crop of the image
    zero-padded by 4, with and without flip): at 224 px it would be 6,498 padded crops."""
    if policy == "all" and size != CIFAR_SIZE:
        raise ConfigError(
            f"--teacher-views all means CIFAR's {num_views('all', CIFAR_SIZE)} crop+flip views of {CIFAR_SIZE} px "
            "images; "
            f"these images are {size} px ({num_views('all', size)} views): use --teacher-views clean or a number of "
            "random views"
        )


def layout_bytes(layout: CacheLayout, models: list[ClipTeacher]) -> int:
    """Uncompressed bytes of every array: an upper bound of the disk use (fp16 rows barely compress)."""
    clip_row = sum(2 * (m.embed_dim + (m.feature_dim if layout.stores_features else 0)) for m in models)
    teacher = sum(math.prod(spec.shape) * np.dtype(spec.dtype).itemsize for spec in layout.arrays().values())
    return teacher + layout.num_samples * layout.clip_num_views * clip_row


def check_space(url: str, needed: int) -> None:
    """Refuse a build whose arrays cannot fit on the local filesystem at `url` (object stores report no
    free space, so they are not checked). A cache already there counts as room: a resumed build keeps
    its rows, and --overwrite frees them."""
    if is_remote(url):
        return
    path = Path(local_path(url)).absolute()
    present = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    existing = path
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free + present:
        raise ConfigError(f"the cache needs {human_bytes(needed)} but the filesystem of {existing} has "
                          f"{human_bytes(free)} free: free space, build elsewhere, or store fewer views or "
                          "--topk logits")


def cache_layout(num_samples: int, num_classes: int, teacher_dim: int, models: list[ClipTeacher],
                 block_rows: int | None, views: BuildViews, topk: int | None = None,
                 features: bool = True) -> CacheLayout:
    """Chunks of whole write blocks, a few MB each (DESIGN.md section 3) unless block_rows is given.
    `views`: the teacher's, CLIP's and the strong views per sample and their record sizes; `models`: the
    CLIP models built now (a cache keeps the block rows it was created with: `existing_cache`); features:
    whether the teacher's and CLIP's pooled features are stored (only feature losses, eq. 7-8, read them)."""
    if topk is not None and not 0 < topk <= num_classes:
        raise ConfigError(f"--topk must be between 1 and {num_classes} (the dataset has {num_classes} classes)")
    num_views, clip_views, strong_views = views.num_views, views.clip_views, views.strong_views or None
    logit_width = 2 * topk if topk else num_classes  # top-k: fp16 values + int16 indices
    feature_width = teacher_dim if features else 0
    clip_row = sum(m.embed_dim + (m.feature_dim if features else 0) for m in models)
    row_bytes = 2 * (num_views * (logit_width + feature_width) + clip_views * clip_row
                     + (strong_views or 0) * logit_width)
    block_rows = block_rows or choose_block_rows(row_bytes)
    return CacheLayout(
        num_samples=num_samples,
        num_views=num_views,
        num_classes=num_classes,
        teacher_dim=teacher_dim,
        view_param_dim=views.policy.record.nbytes,
        block_rows=min(block_rows, max(num_samples, 1)),
        teacher_topk=topk,
        clip_views=clip_views,
        strong_views=strong_views,
        strong_param_dim=views.strong.record.nbytes if strong_views else None,
        teacher_clean=views.stores_clean_row or None,
        features=None if features else False,  # recorded only when false: older caches read unchanged
    )


def build_manifest(cfg: BuildConfig, dataset: ImageDataset, teacher: Teacher, models: dict[str, ClipTeacher]) -> dict:
    """Provenance: what produced every array. `build_key` is what a resumed build, or one adding a CLIP
    model, must match; each CLIP model's entry says what produced its arrays."""
    fingerprint = dataset_fingerprint(dataset)
    dataset_manifest = {
        "name": cfg.dataset,
        "split": dataset.split,
        "root": dataset.root,
        "num_samples": len(dataset),
        "num_classes": dataset.num_classes,
        "classes": list(dataset.classes),
        "fingerprint": fingerprint,
        "options": dataset.options,  # what stage two, verify and evaluate reopen the images with
    }
    size = image_size(dataset)
    per_model = view_policies(cfg, size)
    chosen = build_views(cfg, dataset)
    policy = per_model["teacher"]["policy"]
    # top-level policy / num_views: the teacher's, whose records `views/params` holds
    views = {"num_views": per_model["teacher"]["num_views"], "policy": str(policy), **policy_manifest(chosen.policy),
             "seed": cfg.view_seed if isinstance(policy, int) else None,
             "image_size": size, **{m: {**v, "policy": str(v["policy"])} for m, v in per_model.items()}}
    if cfg.strong_views:
        views["strong"] = {"policy": "mlkd-strong", "num_views": cfg.strong_views, "seed": cfg.view_seed,
                           **policy_manifest(chosen.strong),
                           "reference": "Jin-Ying/Multi-Level-Logit-Distillation mdistiller/dataset/cifar100.py"}
    build_key = {
        "dataset_fingerprint": fingerprint,
        "split": dataset.split,
        **({"dataset_options": dataset.options} if dataset.options else {}),  # imagefolder's image size
        "teacher_arch": teacher.arch,
        "teacher_checkpoint_sha256": teacher.manifest["checkpoint_sha256"],
        "views": {k: views[k] for k in ("policy", "augment", "seed", "num_views", "clip", "strong") if k in views},
        "teacher_topk": cfg.topk,
    }
    return {
        "tool": {"name": "richkd-cache", "version": importlib.metadata.version("richkd-cache")},
        "versions": {
            "torch": torch.__version__,
            "open_clip": importlib.metadata.version("open_clip_torch"),
        },
        "dataset": dataset_manifest,
        "views": views,
        "teacher": teacher.manifest,
        "clip_models": {name: model.manifest() for name, model in models.items()},
        "build_key": build_key,
    }


def policy_manifest(policy: ViewPolicy) -> dict:
    """How a policy's records read: its name, and its fields in packing order (name, bits), little-endian."""
    return {"augment": policy.name, "fields": policy.record.manifest(), "record_bytes": policy.record.nbytes,
            "whole_image": policy.whole_image}


def view_policies(cfg: BuildConfig, size: int) -> dict[str, dict]:
    """Each model's policy and views per sample, with its clean view's index (None: no clean view)."""
    teacher = teacher_policy(cfg.teacher_views, size)
    check_view_policy(teacher, size)
    clip = clip_policy(cfg.clip_views, teacher)
    return {m: {"policy": p, "num_views": num_views(p, size), "clean_view": clean_view_index(p, size)}
            for m, p in (("teacher", teacher), ("clip", clip))}


def store_prompt_sets(writer: CacheWriter, name: str, clip: ClipTeacher, prompt_sets: list[PromptSet],
                      classes: list[str], reporter: Reporter) -> None:
    """CLIP model `name`'s per-template text embeddings [M, C, D]: prompt sets stay a training-time choice
    (eq. 2-3). Each set's text-tower passes are a task of their own (thousands of prompts take minutes)."""
    for ps in prompt_sets:
        with reporter.task(f"text {ps.name} ({name})", total=prompt_count(ps, classes), unit="prompt") as advance:
            embeds = clip.encode_prompt_set(ps, classes, advance=advance)
        writer.put_text_embeddings(ps.name, embeds, prompt_set_manifest(ps, classes), model=name)


def prompt_count(prompt_set: PromptSet, classes: list[str]) -> int:
    """Prompts the text tower encodes for a set: every template filled with every name of every class."""
    return sum(len(names) for per_template in class_prompts(prompt_set, classes) for names in per_template)


def plan_line(writer: CacheWriter, models: dict[str, ClipTeacher], prompt_sets: list[PromptSet],
              classes: list[str], pending: dict[int, list[str]], disk: int) -> str:
    """What the build computes, before it starts: `plan: N samples x V views = R teacher rows, ...`; on a
    resumed build each count says how much is left. The time is estimated once the first batches ran."""
    layout = writer.layout

    def rows_left(flags: str, views: int) -> int:
        return views * sum(stop - start for start, stop in map(writer.block_range,
                                                                (b for b, f in pending.items() if flags in f)))

    def rows(total: int, left: int) -> str:
        return f"{total:,}" if left == total else f"{total:,} ({left:,} left to compute)"

    n, v, vc = layout.num_samples, layout.num_views, layout.clip_num_views
    teacher = rows(n * v, rows_left(TEACHER_FLAGS, v))
    if layout.strong_views:
        teacher += f" + {n * layout.strong_views:,} strong-view rows"
    clip = "; ".join(f"{rows(n * vc, rows_left(writer.clips[name].written, vc))} CLIP rows ({name})" for name in models)
    prompts = sum(prompt_count(ps, classes) for ps in prompt_sets) * len(models)
    sets = ", ".join(ps.name for ps in prompt_sets)
    return (f"plan: {n:,} samples x {v:,} view{'s' if v > 1 else ''} = {teacher} teacher rows; {clip}; "
            f"{prompts:,} text prompts ({sets}{' per CLIP model' if len(models) > 1 else ''}); "
            f"{human_bytes(disk)} on disk at most; time: "
            + ("estimated once the first batches are timed" if pending else "the text prompts only"))


def resume_line(cfg: BuildConfig, existing: CacheReader, models: list[str], prompt_sets: list[PromptSet],
                pending: dict[int, list[str]]) -> str:
    """A build into an existing cache says so: how much is written, and what this command changes
    compared with what the cache records (prompt sets and CLIP models it adds, prompt sets it leaves)."""
    total = existing.layout.num_blocks
    state = (f"resuming the build of {cfg.out}: {total - len(pending)} of {total} write blocks done"
             if pending else f"{cfg.out} is complete: no image is computed again")
    differs = []
    added = [m for m in models if m not in existing.clips]
    if added:
        differs.append(f"--clip adds {', '.join(added)} (the cache records {', '.join(existing.clips)})")
    for model in (m for m in models if m in existing.clips):
        recorded = existing.prompt_sets(model)
        asked = [ps.name for ps in prompt_sets]
        new, kept = [p for p in asked if p not in recorded], [p for p in recorded if p not in asked]
        if new or kept:
            change = "; ".join(part for part in (f"adds {', '.join(new)}" if new else "",
                                                 f"keeps {', '.join(kept)} it does not name" if kept else "") if part)
            who = f" for {model}" if len(existing.clips) > 1 else ""
            differs.append(f"--prompts {','.join(asked)} {change}{who} (the cache records "
                           f"{', '.join(recorded) or 'none'})")
    return f"{state}; " + ("; ".join(differs) if differs else "same settings as the cache records")


def forward_blocks(
    writer: CacheWriter,
    pending: list[int],
    dataset: ImageDataset,
    teacher: Teacher,
    clips: list[Clip],
    device: torch.device,
    batch_size: int,
    workers: int,
    reporter: Reporter,
    world_size: int = 1,
    views: BuildViews | None = None,
    topk: int | None = None,
    parts: dict[int, list[str]] | None = None,
) -> tuple[float, int]:
    """Run the teacher and the CLIP models over the given blocks; a writer thread stores finished blocks.

    parts: for each block, the flags of the parts it lacks (the teacher's `written`, a CLIP model's own);
    only those models run on it (None: all of them, on every block).

    views: the views stored per sample (None: the clean view only). A batch holds batch_size views: batch_size
    // V samples when CLIP sees every view or the views are cut from whole images in the loader's workers
    (`WithViews`), batch_size samples otherwise.
    The bar shows this process's blocks; with several ranks its rate is scaled to the total.
    Returns (sum, count) of the per-row KL cost of keeping only the teacher's top k (0, 0 without top-k).
    """
    ranges = [writer.block_range(b) for b in pending]
    if not ranges:
        return 0.0, 0
    # Batches never straddle blocks and start at block boundaries, so a resumed build runs exactly
    # the batches an uninterrupted one does (and writes bit-identical rows).
    whole = views is not None and views.policy.whole_image
    per_batch = max(1, batch_size // (views.num_views if views and (whole or views.clip_views > 1) else 1))
    batch_indices = [list(range(i, min(i + per_batch, stop))) for start, stop in ranges
                     for i in range(start, stop, per_batch)]
    loader = DataLoader(
        WithViews(dataset, views.policy, views.value, views.seed, views.num_views) if whole else dataset,
        batch_sampler=batch_indices,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    block_rows = writer.layout.block_rows
    wanted = None if parts is None else (lambda index: parts[int(index[0]) // block_rows])
    forward = make_forward(teacher, clips, dataset, device, views, topk, batch_size, wanted)
    kl_sum, kl_rows = 0.0, 0
    total = sum(stop - start for start, stop in ranges)
    label = "build" if world_size == 1 else f"build (rank 0 of {world_size}; total ~{world_size}x this rate)"
    with reporter.task(label, total=total, unit="img", estimate_after=3) as advance, ThreadPoolExecutor(1) as pool:

        def counted(batches: Iterator[dict]) -> Iterator[dict[str, np.ndarray]]:
            for batch in batches:  # the bar moves by images, batch by batch, not by whole blocks
                rows = forward(batch)
                advance(len(batch["index"]))
                yield rows

        written = 0

        def wrote(write: Future) -> None:
            nonlocal written
            write.result()  # re-raises a failed write (e.g. NaN) at once
            written += 1
            advance(0, status=f"{written}/{len(pending)} blocks written")

        in_flight: list[Future] = []
        for block, arrays in zip(pending, assemble_blocks(ranges, counted(iter(loader)))):
            kl = arrays.pop("topk_kl", None)  # measured here, where the full logits still exist
            if not writer.layout.stores_features:  # computed with the logits at no extra cost, not kept
                arrays = {name: rows for name, rows in arrays.items() if not name.endswith("/features")}
            if kl is not None:
                kl_sum, kl_rows = kl_sum + float(kl.sum()), kl_rows + kl.size
            in_flight.append(pool.submit(writer.write_block, block, arrays))
            # at most two blocks wait for the disk
            while len(in_flight) > 2 or (in_flight and in_flight[0].done()):
                wrote(in_flight.pop(0))
        for w in in_flight:
            wrote(w)
    return kl_sum, kl_rows


def make_forward(
    teacher: Teacher, clips: list[Clip], dataset: ImageDataset, device: torch.device,
    views: BuildViews | None = None, topk: int | None = None, batch_size: int = 256,
    parts: Callable[[np.ndarray], Collection[str]] | None = None,
) -> Callable[[dict], dict[str, np.ndarray]]:
    """One batch of samples -> numpy rows for every sample-axis array: the teacher's V views of each
    sample, and each CLIP model's clean view (clip_views = 1) or the same V views (clip_views = V).
    `parts` maps the batch's sample indices to the flags of the parts to compute (the teacher's
    `written`, CLIP models' own flags); None: every part. A model whose part is not asked never runs.

    views: None, the clean view only. Views cut from whole images come with the batch (`WithViews`: their
    records and pixels); the others are replayed here, on the device, from the samples' records, by the
    policy stage two replays them with. The teacher also sees the strong views, when stored (logits only).
    CLIP sees at most `batch_size` images per call, and the teacher `teacher_views_per_call` views, so a
    call's memory does not grow with V (when V alone exceeds the batch, a sample's views are split).
    """
    views = views or BuildViews("clean", create_policy("clean", image_size(dataset)))

    @torch.no_grad()
    def forward(batch: dict) -> dict[str, np.ndarray]:
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) uint8
        index = batch["index"].numpy()
        b = len(index)
        if "views" in batch:  # (B, V, 3, S, S) uint8, cut in the loader's workers
            records = batch["records"].numpy()
            pixels = batch["views"].flatten(0, 1)
            view_pixels = lambda rows: pixels[rows].to(device, non_blocking=True)  # noqa: E731
        else:
            records = views.records(index)  # (B, V, nbytes)
            view_pixels = lambda rows: views_of(images, records, rows, views.policy)  # noqa: E731
        v = records.shape[1]
        wanted = None if parts is None else set(parts(index))

        def rows(t: torch.Tensor, count: int) -> np.ndarray:  # (B * count, X) -> (B, count, X) float32
            return t.float().cpu().numpy().reshape(b, count, -1)

        out = {}
        for layout, clip in clips:
            if wanted is None or layout.written in wanted:
                c_embeds, c_feats = run_clip(clip, images, view_pixels if views.clip_views > 1 else None, b * v,
                                             device, batch_size)  # (B * Vc, D), (B * Vc, Fc)
                out.update({layout.image_embeds: rows(c_embeds, views.clip_views),
                            layout.features: rows(c_feats, views.clip_views)})
        if wanted is not None and TEACHER_FLAGS not in wanted:
            return out
        per_call = teacher_views_per_call(batch_size, images.shape[-1])
        t_logits, t_feats = run_teacher(teacher, dataset, view_pixels, b * v, device, per_call)  # (B * V, C), (B * V, Ft)
        out.update({
            "labels": batch["label"].numpy().astype(np.int32),
            "views/params": records,
            "teacher/logits": rows(t_logits, v),
            "teacher/features": rows(t_feats, v),
        })
        if views.stores_clean_row:  # (B, 1, C): the teacher on the clean images, what accuracy is measured on
            c_logits, _ = in_calls(b, per_call, lambda r: teacher_forward(teacher, dataset, images[r], device))
            out["teacher/clean_logits"] = rows(c_logits, 1)
        if views.strong is not None:  # (B, K, C): the teacher on the strong views (its features are not needed)
            strong = views.strong_records(index)
            s_logits, _ = run_teacher(teacher, dataset, lambda r: views_of(images, strong, r, views.strong),
                                      b * views.strong_views, device, per_call)
            out.update({"views/strong_params": strong, "teacher/strong_logits": rows(s_logits, views.strong_views)})
        if topk:  # keep the k largest log-probabilities per view, and what dropping the rest costs
            logits = torch.from_numpy(out.pop("teacher/logits"))
            values, indices = topk_log_probs(logits, topk)
            out.update({"teacher/topk_values": values.numpy(), "teacher/topk_indices": indices.numpy(),
                        "topk_kl": topk_kl(logits, topk).numpy()})  # (B, V)
            for part in ("clean_", "strong_"):
                if f"teacher/{part}logits" in out:
                    values, indices = topk_log_probs(torch.from_numpy(out.pop(f"teacher/{part}logits")), topk)
                    out.update({f"teacher/{part}topk_values": values.numpy(),
                                f"teacher/{part}topk_indices": indices.numpy()})
        return out

    return forward


def views_of(images: torch.Tensor, records: np.ndarray, rows: slice, policy: ViewPolicy) -> torch.Tensor:
    """Pixels of views `rows` of the sample-major list of B x V views: flat row i * V + j is view j of
    sample i. images: (B, 3, H, W) uint8, records: (B, V, nbytes) uint8 -> (len(rows), 3, H, W) uint8."""
    b, v = records.shape[:2]
    flat = torch.from_numpy(np.ascontiguousarray(records.reshape(b * v, -1)[rows])).to(images.device)
    sample = torch.arange(b * v, device=images.device).div(v, rounding_mode="floor")[rows]
    return policy.replay_packed(images[sample], flat)


def teacher_views_per_call(batch_size: int, size: int) -> int:
    return max(batch_size, TEACHER_PIXELS_PER_CALL // (size * size))


def teacher_forward(teacher: Teacher, dataset: ImageDataset, pixels: torch.Tensor,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher on uint8 pixels (B, 3, H, W) with the dataset's normalisation, bf16 on GPUs:
    logits (B, C) and pooled features (B, Ft). Stage one and `train --online` both run it this way."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return teacher.model(normalize(pixels, dataset.mean, dataset.std))


def clip_forward(clip: ClipTeacher, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP on uint8 images with its own preprocessing, bf16 on GPUs: normalised embeddings and features."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return clip.encode_images(images)


def in_calls(total: int, per_call: int,
             forward: Callable[[slice], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward` over rows 0..total in slices of `per_call`, its two outputs concatenated."""
    parts = [forward(slice(start, start + per_call)) for start in range(0, total, per_call)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def run_teacher(teacher: Teacher, dataset: ImageDataset, pixels: Callable[[slice], torch.Tensor], total: int,
                device: torch.device, per_call: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits and pooled features on `total` views, whose pixels `pixels(rows)` gives,
    `per_call` views per call."""
    return in_calls(total, per_call, lambda rows: teacher_forward(teacher, dataset, pixels(rows), device))


def run_clip(clip: ClipTeacher, images: torch.Tensor, pixels: Callable[[slice], torch.Tensor] | None, total: int,
             device: torch.device, per_call: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's normalised embeddings and features on the images (`pixels` None), or on the `total` views
    `pixels(rows)` gives, `per_call` images per call."""
    return in_calls(len(images) if pixels is None else total, per_call, lambda rows: clip_forward(
        clip, images[rows] if pixels is None else pixels(rows), device))


def assemble_blocks(
    ranges: list[tuple[int, int]], batches: Iterator[dict[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """Regroup a stream of batches (in row order) into whole write blocks of the given sizes. Batches
    never straddle blocks, so every batch of a block carries the same arrays."""
    held: dict[str, list[np.ndarray]] = {}
    held_rows = 0
    sizes = iter(stop - start for start, stop in ranges)
    need = next(sizes)
    for batch in batches:
        for name, value in batch.items():
            held.setdefault(name, []).append(value)
        held_rows += len(next(iter(batch.values())))
        while need is not None and held_rows >= need:
            joined = {name: np.concatenate(parts) for name, parts in held.items()}
            yield {name: value[:need] for name, value in joined.items()}
            held = {name: [value[need:]] for name, value in joined.items()}
            held_rows -= need
            need = next(sizes, None)


def accuracy_summary(url: str, models: list[str]) -> tuple[dict, dict[str, dict]]:
    """The teacher's manifest entry with its top-1, and each of `models`' CLIP zero-shot top-1 per stored
    prompt set, on the clean view, from the cache itself (none when a model has no clean view: random
    views only)."""
    reader = open_cache(url, require_complete=False)
    clean = has_clean_views(reader)
    rows = {m: prompt_set_accuracy(reader, 0.7, m) if clean else [] for m in models}
    top1 = next((r[0]["teacher_top1"] for r in rows.values() if r), None)
    teacher = dict(reader.manifest["teacher"], accuracy=top1)
    return teacher, {m: {r["prompt_set"]: r["clip_top1"] for r in model_rows} for m, model_rows in rows.items()}
