"""Stage two's targets: the cache's compact rows, memory-mapped and gathered per batch.

The run reads the arrays it needs from the cache's local copy (cache_store/local.py: uncompressed `.npy`
files made once per machine and mapped by every run), in their stored dtypes; nothing is expanded to
float32 per row. Each epoch draws a full permutation of the trained samples and, per sample, one stored
view (and one strong view for a two-view method). Each batch then gathers its rows by (sample, view) in a
background thread while the previous step runs, and `richkd_cache.distill.batch.fuse_batch` turns them into
targets on the training device (eq. 2-4, 7). The few statistics over every trained row (the joint space's
moments, alpha*'s error sums) come from one streaming pass over the mapped rows and are kept beside the
local copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cache_store import CacheReader
from cache_store.local import LocalCopy
from cache_store.schema import ClipLayout
from pipelines.cached import clean_views, stored_policy, teacher_logit_arrays
from pipelines.config import TrainConfig
from pipelines.progress import Reporter
from pipelines.summary import human_bytes
from richkd_cache.distill import uses_strong_view
from richkd_cache.distill.adaptive import alpha_from_sums, class_alphas, error_sums
from richkd_cache.distill.batch import ClipPart, FusionState, clip_rows_logits, fuse_batch, teacher_rows_logits
from richkd_cache.distill.fusion import feature_moments, joint_space_from_moments, scaled_concat_moments
from richkd_cache.errors import ConfigError
from richkd_cache.prompts import default_prompt_set
from richkd_cache.views import CIFAR_SIZE, ViewPolicy, create_policy

_STAT_ELEMENTS = 1 << 20  # values per chunk of the streaming statistics passes (each temporary 4-8 MB)


# ---------------------------------------------------------------- which arrays a run reads


def selected_clips(cfg: TrainConfig, cache: CacheReader) -> list[ClipLayout]:
    """The CLIP models the run's targets use (`--clip-model`; see CacheReader.select_clip): none for a
    target that needs no CLIP output (ce, kd) unless a CLIP setting asks for one."""
    asked = cfg.clip_model is not None or cfg.prompts is not None
    if cfg.resolved_target not in ("clip", "richkd") and not asked:
        return []
    return [cache.clips[name] for name in cache.select_clip(cfg.clip_model)]


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
class RowPlan:
    """The arrays a run gathers per batch, by where their rows are taken: the teacher's (and the view
    parameters) at the drawn view, CLIP's at the drawn view or its only one, the strong views' at the
    drawn strong view (paired with CLIP's clean view)."""

    teacher: tuple[str, ...]
    clip: tuple[str, ...]
    strong: tuple[str, ...] = ()
    clip_per_view: bool = False  # CLIP stores the teacher's views (Vc = V > 1), else one view per sample
    num_views: int = 1
    strong_views: int = 0
    clip_clean: int | None = 0  # CLIP's clean view, which the strong views' targets pair with
    cycle: bool = False  # random views (K draws per sample): epoch e trains on view e mod K, a fresh one each epoch

    @property
    def arrays(self) -> tuple[str, ...]:
        return (*self.teacher, *self.clip, *self.strong)


def row_plan(cfg: TrainConfig, cache: CacheReader, clips: list[ClipLayout], features: bool | None = None,
             views: bool = True) -> RowPlan:
    """What `cfg` reads from `cache` (`features`: override whether the pooled features are read). A target
    without a teacher part (clip) still reads the view parameters: they give the pixels its rows pair with."""
    layout = cache.layout
    features = features_needed(cfg) if features is None else features
    target = cfg.resolved_target
    teacher = teacher_logit_arrays(cache) if target != "clip" else ()
    if features and target != "clip":
        teacher += ("teacher/features",)
    if views and layout.num_views > 1:
        teacher += ("views/params",)
    clip = tuple(c.image_embeds for c in clips)
    if features and target in ("clip", "richkd"):
        clip += tuple(c.features for c in clips)
    strong = ()
    if strong_views_needed(cfg, cache):
        strong = ("views/strong_params", *teacher_logit_arrays(cache, part="strong_"))
    clean = clean_views(cache)  # the teacher has no clean view among K random views: they are cycled
    return RowPlan(teacher, clip, strong, layout.clip_num_views == layout.num_views > 1, layout.num_views,
                   layout.strong_views or 0, clean["clip"], clean["teacher"] is None)


# ---------------------------------------------------------------- fusion state: prompt sets and statistics


def setup_fusion(cfg: TrainConfig, cache: CacheReader, copy: LocalCopy, arrays: dict[str, np.ndarray],
                 labels: np.ndarray, pool: np.ndarray, reporter: Reporter | None = None) -> FusionState:
    """The state `fuse_batch` needs: each CLIP model's prompt set text embeddings and tau (eq. 2-3), the
    ensemble's feature scales and the joint space (eq. 7), alpha*'s table over the trained rows `pool`."""
    clips = selected_clips(cfg, cache)
    uses_clip = cfg.resolved_target in ("clip", "richkd")
    names = [c.name for c in clips]
    stored = cache.prompt_sets_of(names)
    if uses_clip and not stored:
        raise ConfigError(f"target {cfg.resolved_target} needs CLIP's logits but cache {cache.url} stores no prompt "
                          f"set{' common to ' + ', '.join(names) if len(names) > 1 else ''}: add one with "
                          "`richkd-cache prompts add`")
    prompt_set = chosen_prompt_set(cfg, stored) if clips and (uses_clip or cfg.prompts) else None
    features = features_needed(cfg)
    parts = [ClipPart(c.name, c.image_embeds, c.features,
                      None if prompt_set is None else torch.from_numpy(cache.text_embeddings(prompt_set, c.name)),
                      cfg.clip_tau if cfg.clip_tau is not None else cache.clip_records[c.name]["tau"])
             for c in clips]
    moments = {}
    if features and uses_clip and (len(clips) > 1 or cfg.resolved_target == "richkd" and cfg.feature_loss in ("cosine", "mse")):
        moments = {name: cached_moments(copy, arrays, name) for name in feature_arrays(clips)}
        if len(clips) > 1:  # each model's block at unit centred energy (eq. 7 with several models)
            parts = [dataclasses.replace(p, feature_scale=1.0 / math.sqrt(moments[p.features][1])) for p in parts]
    state = FusionState(cfg.resolved_target, cache.layout.num_classes, tuple(parts), cfg.clip_renormalize,
                        cfg.alpha, features=features)
    if cfg.resolved_target == "richkd" and cfg.feature_loss in ("cosine", "mse"):
        clip_side = scaled_concat_moments([moments[p.features] for p in parts], [p.feature_scale for p in parts])
        state = dataclasses.replace(state, space=joint_space_from_moments(moments["teacher/features"], clip_side,
                                                                          cfg.lam))
    if cfg.resolved_target == "richkd" and cfg.alpha in ("auto", "per-class"):
        sums = cached_alpha_sums(copy, arrays, labels, state, pool, prompt_set)
        table = class_alphas(sums) if cfg.alpha == "per-class" else torch.full(
            (cache.layout.num_classes,), alpha_from_sums(sums.sum(0)), dtype=torch.float32)
        state = dataclasses.replace(state, alpha_table=table)
        if reporter is not None:
            report_alpha(reporter, cfg.alpha, table)
    return state


def chosen_prompt_set(cfg: TrainConfig, stored: list[str]) -> str:
    """--prompts, else the paper's multi-prompting set (sec. 3.1) by name when stored, else the first stored."""
    return cfg.prompts or default_prompt_set(stored)


def cached_moments(copy: LocalCopy, arrays: dict[str, np.ndarray], name: str) -> tuple[torch.Tensor, float]:
    """The (mean, mean squared centred norm) of one feature array's rows: one streaming pass over the
    mapped rows, kept beside the local copy (it depends on the rows alone)."""
    key = "moments-" + name.replace("/", "__")
    stored = copy.load_stats(key)
    if stored is not None and {"mean", "energy"} <= set(stored):
        return torch.from_numpy(stored["mean"]), float(stored["energy"])
    rows = arrays[name]
    mean, energy = feature_moments(rows, name.split("/")[0], chunk_rows=max(1, _STAT_ELEMENTS // rows.shape[-1]))
    copy.save_stats(key, {"mean": mean.numpy(), "energy": np.float64(energy)})
    return mean, energy


def cached_alpha_sums(copy: LocalCopy, arrays: dict[str, np.ndarray], labels: np.ndarray, state: FusionState,
                      pool: np.ndarray, prompt_set: str | None) -> torch.Tensor:
    """alpha*'s error sums (C, 6) over the trained samples' (sample, teacher view) rows (supplement Sec. 9),
    kept beside the local copy under the settings they depend on."""
    identity = {"clips": [c.name for c in state.clips], "prompts": prompt_set, "tau": [c.tau for c in state.clips],
                "renormalize": state.renormalize,
                "pool": hashlib.sha256(np.ascontiguousarray(pool, dtype=np.int64).tobytes()).hexdigest()}
    key = "alpha-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    stored = copy.load_stats(key)
    if stored is not None and "sums" in stored:
        return torch.from_numpy(stored["sums"])
    sums = alpha_error_sums(arrays, labels, state, np.sort(pool), teacher_logit_arrays(copy.reader))
    copy.save_stats(key, {"sums": sums.numpy()})
    return sums


def alpha_error_sums(arrays: dict[str, np.ndarray], labels: np.ndarray, state: FusionState,
                     samples: np.ndarray, names: tuple[str, ...]) -> torch.Tensor:
    """Streams the teacher's and CLIP's logits of `samples` (every teacher view, each paired with its CLIP
    row) through `error_sums`, a chunk of samples at a time."""
    views = arrays[names[0]].shape[1]
    total = torch.zeros(state.num_classes, 6, dtype=torch.float64)
    step = max(1, _STAT_ELEMENTS // (views * state.num_classes))  # float64 temporaries of 8 MB each
    for start in range(0, len(samples), step):
        index = samples[start : start + step]
        rows = {n: torch.from_numpy(np.asarray(arrays[n][index])) for n in names}
        rows.update({c.embeds: torch.from_numpy(np.asarray(arrays[c.embeds][index])) for c in state.clips})
        z_t = teacher_rows_logits(rows, state.num_classes)  # (n, V, C)
        z_c = clip_rows_logits(state, rows)  # (n, Vc, C), eq. 2-3
        n, v, c = z_t.shape
        y = torch.from_numpy(labels[index].astype(np.int64)).repeat_interleave(v)
        total += error_sums(z_t.reshape(-1, c), z_c.expand(n, v, c).reshape(-1, c), y)
    return total


def report_alpha(reporter: Reporter, rule: str, table: torch.Tensor) -> None:
    """Say when alpha* comes out near 1 and why: on the rows it trains on, the teacher is rarely wrong."""
    mean = float(table.mean())
    if mean >= 0.9:
        reporter.info(f"--alpha {rule}: alpha* is {mean:.2f} on average, nearly the teacher alone: it is estimated "
                      "on the training rows, which the teacher fits almost perfectly, so its errors there are small "
                      "beside CLIP's; a fixed --alpha (the paper's 0.7) keeps more of CLIP")


# ---------------------------------------------------------------- per-epoch draws and per-batch gathering


@dataclass
class Draws:
    """One epoch's draws, in training order: samples (n,), and per sample its teacher view and strong view
    (n,) (None where the cache stores one view, or no strong views). All int64 on the host."""

    index: torch.Tensor
    view: torch.Tensor | None = None
    strong: torch.Tensor | None = None

    def share(self, rank: int, world: int) -> "Draws":
        """A rank's share: every world-th draw, views with their samples."""
        pick = slice(rank, None, world)
        return Draws(self.index[pick], None if self.view is None else self.view[pick],
                     None if self.strong is None else self.strong[pick])

    def batch(self, start: int, stop: int) -> "Draws":
        return Draws(self.index[start:stop], None if self.view is None else self.view[start:stop],
                     None if self.strong is None else self.strong[start:stop])


class CachedRows:
    """A run's compact rows, (N, V, X) in their stored dtypes: memory-mapped on the host (shared with every
    run on the machine), or tensors on `--cache-device cuda`. `gather` takes one batch's rows."""

    def __init__(self, plan: RowPlan, arrays: dict[str, np.ndarray], device: torch.device,
                 resident: bool | None = None) -> None:
        self.plan = plan
        self.device = device
        # resident: a copy of the rows in `device` memory (by default on a GPU), gathered there without the host
        self.on_device = device.type != "cpu" if resident is None else resident
        self.arrays: dict[str, np.ndarray | torch.Tensor] = {
            n: resident_copy(arrays[n], device) if self.on_device else arrays[n] for n in plan.arrays}
        self.pin = not self.on_device and torch.cuda.is_available()  # host rows that feed a GPU are pinned

    def draw(self, pool: torch.Tensor, generator: torch.Generator, epoch: int = 0) -> Draws:
        """A full shuffle of the trained samples and one stored view (and strong view) per sample: drawn from
        an enumerated policy (CIFAR's 162 crop+flips, as online training draws them), or, for K random views,
        view epoch mod K (K views of an image trained once each, in K epochs: a fresh view every epoch)."""
        order = pool[torch.randperm(len(pool), generator=generator, device=generator.device).cpu()]
        view = strong = None
        if self.plan.cycle:
            view = torch.full((len(order),), epoch % self.plan.num_views, dtype=torch.long)
        elif self.plan.num_views > 1:
            view = torch.randint(0, self.plan.num_views, (len(order),), generator=generator,
                                 device=generator.device).cpu()
        if self.plan.strong:
            strong = torch.randint(0, self.plan.strong_views, (len(order),), generator=generator,
                                   device=generator.device).cpu()
        return Draws(order, view, strong)

    def gather(self, draws: Draws) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The batch's rows {name: (B, X)} at its drawn views, and its strong-view rows (the teacher's under
        the teacher's names, with CLIP's clean-view rows), on the host (pinned) or the cache device."""
        index, view = draws.index, draws.view
        zero = torch.zeros_like(index)
        plan = self.plan
        rows = {n: self._take(n, index, zero if view is None else view) for n in plan.teacher}
        clip_view = view if plan.clip_per_view and view is not None else zero
        rows.update({n: self._take(n, index, clip_view) for n in plan.clip})
        strong = {}
        if plan.strong:
            strong = {n.replace("strong_", ""): self._take(n, index, draws.strong) for n in plan.strong}
            clean = torch.full_like(index, plan.clip_clean or 0)
            strong.update({n: self._take(n, index, clean) for n in plan.clip if n.endswith("image_embeds")})
        return rows, strong

    def records(self, draws: Draws) -> np.ndarray:
        """The drawn views' records (n, nbytes) uint8, for the loader's workers to replay (a few bytes each)."""
        return self._take("views/params", draws.index, draws.view).cpu().numpy()

    def _take(self, name: str, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        source = self.arrays[name]
        if self.on_device:
            return source[index.to(self.device), view.to(self.device)]
        rows = torch.from_numpy(np.asarray(source[index.numpy(), view.numpy()]))
        return rows.pin_memory() if self.pin else rows


def resident_copy(array: np.ndarray, device: torch.device, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """A copy of a mapped array in `device` memory, filled 64 MB of rows at a time: the host never holds
    more than one chunk of it besides the page cache."""
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    out = torch.empty(array.shape, dtype=dtype, device=device)
    step = max(1, chunk_bytes // max(1, array[:1].nbytes))
    for start in range(0, len(array), step):
        out[start : start + step] = torch.from_numpy(np.array(array[start : start + step])).to(device)
    return out


def to_device(rows: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {n: t.to(device, non_blocking=True) for n, t in rows.items()}


def prefetched(draws: Draws, batch_size: int, gather: Callable[[Draws], tuple[dict, dict]] | None) -> Iterator[tuple]:
    """(batch draws, rows, strong rows) per batch, the next batch's rows gathered in a background thread
    while the caller works on the current one (memory-mapped pages are read off the critical path)."""
    starts = list(range(0, len(draws.index), batch_size))
    if gather is None:
        for s in starts:
            yield draws.batch(s, s + batch_size), {}, {}
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(gather, draws.batch(0, batch_size)) if starts else None
        for i, s in enumerate(starts):
            rows, strong = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(gather, draws.batch(starts[i + 1], starts[i + 1] + batch_size))
            yield draws.batch(s, s + batch_size), rows, strong


# ---------------------------------------------------------------- pixels


def student_policy(cache: CacheReader | None, image_size: int) -> ViewPolicy:
    """The views the student trains on: the cache's stored ones when it stores several; else fresh draws
    of mdistiller's augmentation (its targets are the clean view's): CIFAR's pad-4 crop and flip for 32 px
    images, RandomResizedCrop of the whole image and flip (its ImageNet recipe) for larger ones."""
    if cache is not None and cache.layout.num_views > 1:
        return stored_policy(cache)
    return create_policy("crop-flip" if image_size == CIFAR_SIZE else "random-resized-crop", image_size)


def augment(images: torch.Tensor, records: torch.Tensor | None, policy: ViewPolicy,
            generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> the pixels the student sees: the drawn views' records (B, nbytes) replayed (the
    very pixels the teacher saw), or with `records` None fresh views of `policy`. Whole-image policies run on
    the CPU, where stage one ran them, so the bytes are the same."""
    if not policy.whole_image:
        return policy.replay(images, policy.draw(generator, len(images)) if records is None
                             else policy.record.unpack(records))
    host = images.cpu()
    if records is None:
        seed = torch.randint(1 << 62, (1,), generator=generator, device=generator.device).item()
        fields = policy.draw(torch.Generator().manual_seed(seed), len(host), *host.shape[-2:])
    else:
        fields = policy.record.unpack(records.cpu())
    return policy.replay(host, fields).to(images.device)


def strong_pixels(images: torch.Tensor, strong_rows: dict[str, torch.Tensor], policy: ViewPolicy) -> torch.Tensor:
    """The drawn strong views' pixels, replayed exactly as the teacher saw them (B, 3, H, W) uint8."""
    return policy.replay_packed(images, strong_rows["views/params"])


# ---------------------------------------------------------------- setting a run up


@dataclass
class StageTwoTargets:
    """What the loop distils from: the rows it gathers per batch and the state that fuses them. `online`,
    when set, replaces the gathered rows by the teacher's and CLIP's outputs on the batch (the reference)."""

    rows: CachedRows
    state: FusionState  # on the training device
    policy: ViewPolicy  # the student's views (`student_policy`)
    strong_policy: ViewPolicy | None = None  # the strong views' (MLKD), when the run trains on them
    online: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        # the strong views' targets are logits only (no feature loss reads them): made once, not per batch
        self.strong_state = dataclasses.replace(self.state, features=False)

    def gather(self, draws: Draws) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.rows.gather(draws)

    def targets(self, rows: dict[str, torch.Tensor], clean: torch.Tensor, pixels: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The batch's target logits (B, C) and feature parts from its rows (or, online, from the models run
        on `pixels`, the drawn views, and `clean`, the images)."""
        if self.online is not None:
            rows = self.online(clean, pixels)
        return fuse_batch(self.state, rows, labels)

    def strong_targets(self, strong_rows: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The strong views' target logits (B, C): the teacher's on them, fused (eq. 4) with CLIP's clean view."""
        return fuse_batch(self.strong_state, strong_rows, labels)[0]


def private_growth(cfg: TrainConfig, cache: CacheReader, plan: RowPlan, pool_size: int, cached_stats: bool) -> int:
    """Private bytes the cached path adds to a cross-entropy run of the same student: the epoch's draws
    (a permutation and a view per sample, int64, with the temporaries of drawing them), three batches of
    gathered rows in flight (gathered, pinned, on the device) and their float32 targets, and, on a first
    run, the statistics pass's largest chunk."""
    specs = cache.arrays()
    per_row = sum(int(np.prod(specs[n].shape[2:])) * np.dtype(specs[n].dtype).itemsize for n in plan.arrays)
    layout = cache.layout
    draws = 8 * pool_size * (3 + (plan.num_views > 1) + bool(plan.strong))
    in_flight = 3 * cfg.batch_size * (per_row + 4 * (layout.num_classes + layout.teacher_dim))
    transient = 0 if cached_stats else 6 * 8 * (1 << 20)  # error_sums' float64 chunk, or a features chunk
    return draws + in_flight + transient


def setup_targets(cfg: TrainConfig, cache: CacheReader, labels: np.ndarray, pool: torch.Tensor,
                  device: torch.device, cache_device: torch.device, reporter: Reporter,
                  plan: RowPlan | None = None, working: int = 0) -> StageTwoTargets:
    """Check the run fits, make (or reuse) the local copy of the arrays it reads (`plan`, by default what
    `cfg` needs), map them, and compute the fusion state; every check comes before a row is read.
    `working`: private bytes the caller will add besides (the training's own, `training_bytes`)."""
    from cache_store.local import disk_free
    from pipelines.memory import RunNeeds, check_run_memory, device_free, host_limits

    plan = plan or row_plan(cfg, cache, selected_clips(cfg, cache))
    copy = LocalCopy(cache)
    mapped = sum(copy.nbytes(n) for n in plan.arrays)
    missing = copy.missing_bytes(list(plan.arrays))
    needs = RunNeeds(working + private_growth(cfg, cache, plan, len(pool), missing == 0), mapped, missing,
                     disk_free(copy.folder) if missing else None,
                     mapped if cache_device.type == "cuda" else 0, device_free(cache_device), str(copy.folder))
    check_run_memory(needs, host_limits(), lighter_run(cfg, cache))
    if missing:
        reporter.info(f"making the local copy of cache {cache.url} ({human_bytes(missing)}, once per machine) "
                      f"in {copy.folder}")
    rows = cache.layout.num_samples * sum(not copy.present(n) for n in plan.arrays)
    with reporter.task("local copy", total=rows, unit="rows") as advance:
        copy.ensure(list(plan.arrays), advance)
    arrays = {n: copy.open(n) for n in plan.arrays}
    state = setup_fusion(cfg, cache, copy, arrays, labels, pool.numpy(), reporter)
    if plan.cycle and cfg.epochs > plan.num_views:
        reporter.info(f"the cache stores {plan.num_views} views per image and the run trains {cfg.epochs} epochs: "
                      f"epoch e trains on view e mod {plan.num_views}, so each view returns every "
                      f"{plan.num_views} epochs (build with --teacher-views {cfg.epochs} for a fresh view every epoch)")
    strong = stored_policy(cache, "strong") if plan.strong else None
    return StageTwoTargets(CachedRows(plan, arrays, cache_device), state.to(device),
                           student_policy(cache, cache.manifest["views"].get("image_size", CIFAR_SIZE)), strong)


def lighter_run(cfg: TrainConfig, cache: CacheReader) -> str:
    """What would need less: no pooled features (most of a view's bytes), the GPU rows kept on the host."""
    hints = []
    if features_needed(cfg):
        hints.append("train with --feature-loss none (logits only: reads no pooled features)")
    if cache.layout.num_views > 1:
        hints.append(f"build a cache with fewer --teacher-views than its {cache.layout.num_views}")
    return ", or ".join(hints)
