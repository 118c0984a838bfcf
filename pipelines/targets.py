"""Stage two's targets: cached rows -> what the student is distilled towards, window by window.

The cached arrays are read once (or, for caches larger than memory, a window of whole write blocks at a
time) and turned into targets once: eq. 2-4 and 7 do not depend on the student. Each step then gathers
its rows by index, and `augment` pairs the pixels the student sees with the cached rows of that view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_store import CacheLayout, CacheReader
from cache_store.schema import ClipLayout
from pipelines.cached import clean_views, clip_feature_scales, flatten_views, float_rows, per_view_rows, teacher_logits
from pipelines.config import TrainConfig
from pipelines.summary import human_bytes
from richkd_cache.clip_logits import clip_logits, ensemble_logits
from richkd_cache.data import random_crop_flip, random_resized_crop_flip
from richkd_cache.distill import JointSpace, build_targets, fit_joint_space, uses_strong_view
from richkd_cache.distill.adaptive import error_sums, row_alphas
from richkd_cache.errors import ConfigError
from richkd_cache.strong_views import apply_strong_views
from richkd_cache.views import CIFAR_PAD, CIFAR_SIZE, apply_views


@dataclass
class StrongViews:
    """The second view of a two-view method (MLKD): targets for every cached (sample, strong view) row
    n * K + k, and the stored parameters that replay each view's pixels."""

    logits: torch.Tensor  # (N * K, C) float32: the teacher's, or fused with CLIP's clean view (eq. 4)
    params: torch.Tensor  # (N, K, 12) float32 (richkd_cache/strong_views.py)

    def draw(self, images: torch.Tensor, index: torch.Tensor, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One stored strong view per image, drawn uniformly: its pixels (B, 3, H, W) uint8, replayed
        exactly as the teacher saw them, and its target logits (B, C) on `device`."""
        k = self.params.shape[1]
        v = torch.randint(0, k, (len(index),), generator=generator, device=generator.device).to(index.device)
        params = self.params[index.to(self.params.device), v.to(self.params.device)]
        return apply_strong_views(images, params), gather(self.logits, index * k + v, device)


@dataclass
class Targets:
    """Distillation targets for every cached (sample, view) row n * V + v, on the cache device."""

    logits: torch.Tensor | None  # (N * V, C) float32
    # the target's feature parts by name, "teacher" (N * V, Ft) and/or "clip" (N * V, Fc) float32: raw for
    # CRD (it fuses after its embeddings), the blocks of the fixed fused f_F for cosine/MSE (docs/fusion.md)
    features: dict[str, torch.Tensor] | None
    views: torch.Tensor | None = None  # (N, V, 5) view parameters when V > 1; None: the clean view only
    # teacher rows per CLIP row of the "clip" feature part: V when CLIP is cached on the clean view only
    # (its (N, Fc) rows are not copied per view), 1 when it has a row per teacher view
    clip_stride: int = 1
    strong: StrongViews | None = None  # the strong views, for a method that trains on a second view

    def lookup(self, rows: torch.Tensor, device: torch.device, clean: torch.Tensor,
               pixels: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The batch's target logits (B, C) and feature parts {name: (B, F)} on `device`: the cached rows
        `rows` (from `augment`). `clean` (the images) and `pixels` (the drawn views) are what an online
        source runs its models on; cached targets need neither."""
        parts = {n: gather(p, rows // self.clip_stride if n == "clip" else rows, device)
                 for n, p in (self.features or {}).items()}
        return gather(self.logits, rows, device), parts


def selected_clips(cfg: TrainConfig, cache: CacheReader) -> list[ClipLayout]:
    """The CLIP models the run's targets use (`--clip-model`; see CacheReader.select_clip): none for a
    target that needs no CLIP output (ce, kd) unless a CLIP setting asks for one."""
    asked = cfg.clip_model is not None or cfg.prompts is not None
    if cfg.resolved_target not in ("clip", "richkd") and not asked:
        return []
    return [cache.clips[name] for name in cache.select_clip(cfg.clip_model)]


def cached_arrays(cache: CacheReader, clips: list[ClipLayout] | None = None, strong: bool = False,
                  features: bool = True) -> tuple[str, ...]:
    """The per-row arrays targets are computed from (the teacher's logits may be stored as top-k), with
    those of `clips` (None: the cache's only CLIP model), the strong views' parameters and teacher logits
    when `strong`, and the pooled features when `features`: a run without a feature loss never reads them
    (for ResNet-34 on ImageNet, 1,024 of a view's ~1,460 bytes)."""
    clips = [cache.clips[n] for n in cache.select_clip(None)] if clips is None else clips
    logits = ("teacher/topk_values", "teacher/topk_indices") if cache.layout.teacher_topk else ("teacher/logits",)
    extra = ("views/strong_params", *(n.replace("/", "/strong_") for n in logits)) if strong else ()
    feats = feature_arrays(clips) if features else ()
    return (*logits, *feats, *(c.image_embeds for c in clips), "labels", *extra)


def feature_arrays(clips: list[ClipLayout] | tuple[ClipLayout, ...]) -> tuple[str, ...]:
    return ("teacher/features", *(c.features for c in clips))


def features_needed(cfg: TrainConfig) -> bool:
    """Whether the targets include feature parts: only a feature loss reads them."""
    return cfg.feature_loss is not None and cfg.resolved_target != "ce"


def check_features_stored(cache: CacheReader, needs: str, instead: str) -> None:
    """Refuse, before anything is read or written, a cache built without the pooled features that `needs`
    (a feature loss, eq. 7-8, or exported features) reads; `instead`: how to do without them."""
    if not cache.layout.stores_features:
        raise ConfigError(f"{needs} reads the teacher's and CLIP's features, but cache {cache.url} was built with "
                          f"--no-features (logits only): {instead}, or rebuild the cache with --features")


def strong_views_needed(cfg: TrainConfig, cache: CacheReader | None) -> bool:
    """Whether the method trains on a second, strong view (MLKD); refuses a cache that stores none."""
    if cache is None or cfg.resolved_target == "ce" or not uses_strong_view(cfg.method):
        return False
    if not cache.layout.strong_views:
        raise ConfigError(f"method {cfg.method} also trains on strong views, which cache {cache.url} does not store: "
                          "build the cache with `richkd-cache build ... --strong-views K`")
    return True


@dataclass(frozen=True)
class Fusion:
    """What turns cached rows into targets: the CLIP models used, each one's prompt set text embeddings
    and tau, and for cosine/MSE with the richkd target the fixed joint feature space (eq. 7,
    docs/fusion.md). With several CLIP models their logits are ensembled (`ensemble_logits`) and their
    features concatenated, each scaled by `feature_scales`."""

    clips: tuple[ClipLayout, ...]  # the CLIP models used; none for a teacher-only target
    text: dict[str, torch.Tensor] | None  # model -> (M, C, D); None: the target uses no CLIP logits (kd)
    tau: dict[str, float]  # model -> eq. 2's tau
    space: JointSpace | None
    num_classes: int
    alpha_sums: torch.Tensor | None = None  # (C, 6) error sums over every cached row, for --alpha auto / per-class
    feature_scales: dict[str, float] | None = None  # several models: each one's feature block scale (eq. 7)
    clip_clean_view: int | None = 0  # CLIP's row of the clean view, which the strong views' targets pair with


def setup_fusion(cfg: TrainConfig, cache: CacheReader, arrays: dict[str, np.ndarray] | None = None) -> Fusion:
    """The joint space is fitted on `arrays` (every row), or with --stream-window on the first window's
    blocks; the fp16 rows are read in float32 chunks, never copied whole. Only targets with CLIP's logits
    (eq. 2-3) need a prompt set; a named one is checked for any target, for every CLIP model used."""
    clips = selected_clips(cfg, cache)
    uses_clip = cfg.resolved_target in ("clip", "richkd")
    names = [c.name for c in clips]
    if uses_clip and not cache.prompt_sets_of(names):
        raise ConfigError(f"target {cfg.resolved_target} needs CLIP's logits but cache {cache.url} stores no prompt "
                          f"set{' common to ' + ', '.join(names) if len(names) > 1 else ''}: add one with "
                          "`richkd-cache prompts add`")
    text = None
    if clips and (uses_clip or cfg.prompts):
        prompt_set = cfg.prompts or cache.prompt_sets_of(names)[0]
        text = {n: torch.from_numpy(cache.text_embeddings(prompt_set, n)) for n in names}
    tau = {n: cfg.clip_tau if cfg.clip_tau is not None else cache.clip_records[n]["tau"] for n in names}
    features = cfg.feature_loss is not None and cfg.resolved_target in ("clip", "richkd")
    if features and (len(clips) > 1 or cfg.resolved_target == "richkd" and cfg.feature_loss in ("cosine", "mse")):
        if arrays is None:  # a streamed cache: the first window's blocks
            stop = cache.layout.num_samples
            if cfg.stream_window:
                stop = cache.layout.block_range(min(cfg.stream_window, cache.layout.num_blocks) - 1)[1]
            arrays = {k: cache.load_rows(k, 0, stop) for k in feature_arrays(clips)}
    scales = clip_feature_scales(arrays, clips) if features and len(clips) > 1 else None
    fusion = Fusion(tuple(clips), text, tau, None, cache.layout.num_classes, None, scales, clean_views(cache)["clip"])
    if cfg.resolved_target == "richkd" and cfg.feature_loss in ("cosine", "mse"):
        fusion = dataclasses.replace(fusion, space=fit_joint_space(arrays["teacher/features"],
                                                                   clip_features(arrays, fusion), cfg.lam))
    if cfg.resolved_target == "richkd" and cfg.alpha in ("auto", "per-class"):
        fusion = dataclasses.replace(fusion, alpha_sums=alpha_statistics(cfg, cache, fusion, arrays))
    return fusion


def clip_features(arrays: dict[str, np.ndarray], fusion: Fusion) -> torch.Tensor | None:
    """f_C of eq. 7, (n, Vc, Fc) float32: the CLIP model's features, or with several models their
    concatenation, each block scaled to unit mean squared norm about its mean (docs/fusion.md); None
    when no CLIP model is used or the features were not read."""
    if not fusion.clips or fusion.clips[0].features not in arrays:  # no feature loss: never read
        return None
    if len(fusion.clips) == 1:
        return float_rows(arrays[fusion.clips[0].features])
    return torch.cat([float_rows(arrays[c.features]) * fusion.feature_scales[c.name] for c in fusion.clips], dim=-1)


def alpha_statistics(cfg: TrainConfig, cache: CacheReader, fusion: Fusion,
                     arrays: dict[str, np.ndarray] | None = None) -> torch.Tensor:
    """The teacher's and CLIP's error sums over every cached (sample, teacher view) row, from which
    --alpha auto and per-class take the supplement's alpha*: from `arrays` when every row is already
    read, else read block by block (the logits only)."""
    features = feature_arrays(fusion.clips)
    layout, names = cache.layout, [n for n in cached_arrays(cache, list(fusion.clips)) if n not in features]
    if arrays is not None and not set(names) <= set(arrays):
        arrays = None  # only the features were read (a streamed cache's first window)
    blocks = [arrays] if arrays is not None else (
        {k: cache.load_rows(k, *layout.block_range(b)) for k in names} for b in range(layout.num_blocks))
    total = None
    for part in blocks:
        t_logits, c_logits = fused_inputs(cfg, part, fusion)
        n, v, c = t_logits.shape
        labels = torch.from_numpy(part["labels"].astype(np.int64)).repeat_interleave(v)
        sums = error_sums(t_logits.reshape(-1, c), c_logits.expand(n, v, c).reshape(-1, c), labels)
        total = sums if total is None else total + sums
    return total


def fused_inputs(cfg: TrainConfig, arrays: dict[str, np.ndarray],
                 fusion: Fusion) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits (n, V, C) and CLIP's (n, Vc, C), eq. 2-3, of a set of cached rows (None
    without a prompt set: a teacher-only target); several CLIP models' logits are ensembled."""
    t_logits = teacher_logits(arrays, fusion.num_classes)
    if fusion.text is None:
        return t_logits, None
    per_model = [clip_logits(float_rows(arrays[c.image_embeds]), fusion.text[c.name], fusion.tau[c.name],
                             renormalize=cfg.clip_renormalize) for c in fusion.clips]
    return t_logits, ensemble_logits(per_model)


def fusion_alpha(cfg: TrainConfig, fusion: Fusion, t_logits: torch.Tensor, c_logits: torch.Tensor,
                 labels: np.ndarray | None) -> float | torch.Tensor:
    """eq. 4's alpha: the fixed number, or an adaptive rule's weight per (sample, view) row, (n, V, 1)."""
    if not isinstance(cfg.alpha, str) or cfg.resolved_target != "richkd":
        return cfg.alpha
    if labels is None:
        raise ConfigError(f"--alpha {cfg.alpha} weighs each row by its label's statistics; here only a fixed alpha works")
    n, v, c = t_logits.shape
    y = torch.from_numpy(labels.astype(np.int64)).repeat_interleave(v)
    alphas = row_alphas(cfg.alpha, t_logits.reshape(-1, c), c_logits.expand(n, v, c).reshape(-1, c), y,
                        fusion.alpha_sums)
    return alphas.reshape(n, v, 1)


def compute_targets(cfg: TrainConfig, arrays: dict[str, np.ndarray], fusion: Fusion, device: torch.device,
                    views: np.ndarray | None) -> Targets:
    """z_C (eq. 2-3), z_F (eq. 4) and the feature parts (eq. 7) for every teacher row (sample, view),
    placed on `device`.

    Computed on (n, V, X) teacher and (n, Vc, X) CLIP rows. With Vc = 1 the sample's clean CLIP row pairs
    with each of the teacher's views (the pixels the student sees): its logits broadcast over the views
    in eq. 4, and its feature part keeps one row per sample (`clip_stride` = V). With Vc = V view v pairs
    with view v.
    """
    t_feats = float_rows(arrays["teacher/features"]) if "teacher/features" in arrays else None
    c_feats = clip_features(arrays, fusion)
    t_logits, c_logits = fused_inputs(cfg, arrays, fusion)  # (n, V, C), (n, Vc, C); eq. 2-3
    alpha = fusion_alpha(cfg, fusion, t_logits, c_logits, arrays.get("labels"))
    built = build_targets(cfg.resolved_target, teacher_logits=t_logits, clip_logits=c_logits,
                          teacher_feats=t_feats, clip_feats=c_feats, alpha=alpha, space=fusion.space)
    num_views = t_logits.shape[1]
    clip_views = arrays[fusion.clips[0].image_embeds].shape[1] if fusion.clips else num_views
    logits = None if built.get("logits") is None else per_view_rows(built["logits"], num_views)
    feats = {name: flatten_views(built[f"{name}_features"]) for name in ("teacher", "clip")
             if built.get(f"{name}_features") is not None}
    pin = device.type == "cpu" and torch.cuda.is_available()  # host copies that feed a GPU are pinned

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.pin_memory() if pin else t

    return Targets(
        logits=None if logits is None else place(logits),
        features={name: place(t) for name, t in feats.items()} if cfg.feature_loss and feats else None,
        views=None if views is None or views.shape[1] == 1 else torch.from_numpy(views).to(device),
        clip_stride=num_views // clip_views,
        strong=strong_targets(cfg, arrays, fusion, c_logits, place) if "views/strong_params" in arrays else None,
    )


def strong_targets(cfg: TrainConfig, arrays: dict[str, np.ndarray], fusion: Fusion, c_logits: torch.Tensor | None,
                   place: Callable[[torch.Tensor], torch.Tensor]) -> StrongViews:
    """The targets on the (n, K) strong views: the teacher's logits on them, with the richkd target fused
    (eq. 4) with CLIP's logits on the clean view, as for the teacher's own views."""
    stored = {name.replace("strong_", ""): arrays[name] for name in arrays if name.startswith("teacher/strong_")}
    t_strong = teacher_logits(stored, fusion.num_classes)  # (n, K, C)
    c_clean = None
    if c_logits is not None:
        if fusion.clip_clean_view is None:
            raise ConfigError("the strong views' targets pair with CLIP's clean view, which this cache does not store")
        c_clean = c_logits[:, fusion.clip_clean_view : fusion.clip_clean_view + 1]  # (n, 1, C)
    alpha = fusion_alpha(cfg, fusion, t_strong, c_clean, arrays.get("labels"))
    logits = build_targets(cfg.resolved_target, teacher_logits=t_strong, clip_logits=c_clean, alpha=alpha)["logits"]
    params = torch.from_numpy(arrays["views/strong_params"])  # (n, K, 12)
    return StrongViews(logits=place(per_view_rows(logits, params.shape[1])), params=place(params))


Window = tuple[torch.Tensor, Targets, "torch.Tensor | None"]


def whole_cache(cfg: TrainConfig, cache: CacheReader | None, device: torch.device) -> Callable[..., Iterator[Window]]:
    """The default: every row read once, targets computed once; each epoch is one window of all samples."""
    if cache is None or cfg.resolved_target == "ce":
        targets = Targets(None, None)
    else:
        check_targets_fit(cfg, cache, device)
        arrays = cache.load_many(list(cached_arrays(cache, selected_clips(cfg, cache), strong_views_needed(cfg, cache),
                                                    features_needed(cfg))))
        targets = compute_targets(cfg, arrays, setup_fusion(cfg, cache, arrays), device, cache.load("views/params"))

    def windows(generator: torch.Generator, pool: torch.Tensor) -> Iterator[Window]:
        yield pool[torch.randperm(len(pool), generator=generator, device=generator.device).cpu()], targets, None

    return windows


def target_bytes(cfg: TrainConfig, cache: CacheReader, samples: int) -> int:
    """float32 bytes of the targets of `samples` samples: logits (V, C) per sample and, with a feature loss,
    the teacher's (V, Ft) and the chosen CLIP models' (Vc, Fc) feature parts; MLKD adds logits on its K strong views."""
    layout = cache.layout
    floats = layout.num_views * layout.num_classes
    if features_needed(cfg):
        clip_dim = sum(c.feature_dim for c in selected_clips(cfg, cache))  # f_C: every chosen model's, side by side
        floats += layout.num_views * layout.teacher_dim + layout.clip_num_views * clip_dim
    if strong_views_needed(cfg, cache):
        floats += layout.strong_views * layout.num_classes
    return 4 * samples * floats


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device (None where it cannot be asked). Host memory is Linux's MemAvailable, which
    counts the page cache the kernel would give back (free pages alone are often a small part of it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    available = [line.split()[1] for line in lines if line.startswith("MemAvailable:")]
    return int(available[0]) * 1024 if available else None


def check_targets_fit(cfg: TrainConfig, cache: CacheReader, device: torch.device) -> None:
    """Refuse, before reading a byte, a cache whose targets cannot be held whole on the cache device (an
    ImageNet cache of 10 top-k views: 1,281,167 x 10 rows of 1,000 float32, 51 GB), naming a stream window
    whose targets take at most a quarter of the free memory."""
    layout = cache.layout
    needed, free = target_bytes(cfg, cache, layout.num_samples), free_memory(device)
    if free is None or needed <= free:
        return
    window = min(max(1, free // 4 // max(target_bytes(cfg, cache, layout.block_rows), 1)), layout.num_blocks)
    host = ", or keep them in host memory with --cache-device cpu" if device.type == "cuda" else ""
    raise ConfigError(f"the targets of cache {cache.url} take {human_bytes(needed)} but {device} has "
                      f"{human_bytes(free)} free: stream the cache with --stream-window {window} (write blocks of "
                      f"{layout.block_rows} samples read at a time){host}")


def classes_per_window(labels: np.ndarray, layout: CacheLayout, window: int, draws: int = 8) -> float:
    """Mean count of distinct classes among the samples of `window` write blocks drawn at random, as a
    streamed epoch draws them: the batches of a window mix only these classes."""
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(draws):
        blocks = rng.choice(layout.num_blocks, size=min(window, layout.num_blocks), replace=False)
        counts.append(len(np.unique(np.concatenate([labels[slice(*layout.block_range(int(b)))] for b in blocks]))))
    return float(np.mean(counts))


def streamed_cache(cfg: TrainConfig, cache: CacheReader, device: torch.device) -> Callable[..., Iterator[Window]]:
    """For caches larger than memory: each epoch visits the write blocks (whole chunks) in a random order,
    `stream_window` blocks at a time, and shuffles the samples within each window."""
    fusion, layout = setup_fusion(cfg, cache), cache.layout
    names = (*cached_arrays(cache, list(fusion.clips), strong_views_needed(cfg, cache), features_needed(cfg)),
             "views/params")

    def windows(generator: torch.Generator, pool: torch.Tensor) -> Iterator[Window]:
        in_pool = torch.zeros(layout.num_samples, dtype=torch.bool)
        in_pool[pool] = True
        blocks = torch.randperm(layout.num_blocks, generator=generator, device=generator.device).cpu().tolist()
        for w in range(0, len(blocks), cfg.stream_window):
            ranges = [layout.block_range(b) for b in sorted(blocks[w : w + cfg.stream_window])]
            arrays = {k: np.concatenate([cache.load_rows(k, a, b) for a, b in ranges])
                      for k in names}
            targets = compute_targets(cfg, arrays, fusion, device, arrays["views/params"])
            samples = torch.cat([torch.arange(a, b) for a, b in ranges])
            local = torch.full((layout.num_samples,), -1, dtype=torch.long)
            local[samples] = torch.arange(len(samples))
            members = samples[in_pool[samples]]
            yield members[torch.randperm(len(members), generator=generator, device=generator.device).cpu()], targets, local

    return windows


def augment(images: torch.Tensor, index: torch.Tensor, targets: Targets,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) uint8 -> the pixels the student sees, and the rows of `targets` that match them
    (`index`: each image's sample position within `targets`).

    A cache with several views per sample replays one stored view per draw (the very pixels the teacher
    saw). Without stored views the student gets mdistiller's augmentation (its targets are the clean
    view's): CIFAR's pad-4 crop and flip for 32 px images, RandomResizedCrop and flip (its ImageNet
    recipe) for larger ones.
    """
    if targets.views is None:
        if images.shape[-1] == CIFAR_SIZE:
            return random_crop_flip(images, padding=CIFAR_PAD, generator=generator), index
        return random_resized_crop_flip(images, generator=generator), index
    num_views = targets.views.shape[1]
    v = torch.randint(0, num_views, (len(index),), generator=generator, device=generator.device).to(index.device)
    params = targets.views[index.to(targets.views.device), v.to(targets.views.device)]
    return apply_views(images, params), index * num_views + v


def gather(rows: torch.Tensor | None, index: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The cached target rows of this batch's samples, (B, X), on the training device."""
    if rows is None:
        return None
    return rows[index.to(rows.device)].to(device, non_blocking=True)


