"""The online reference: the teacher and CLIP run on every training batch, as the paper's code does.

`train --online` trains exactly as a cached run does except for where the targets come from. Instead of
gathering cached rows, each batch's drawn views go through the teacher and the images through CLIP (its
clean view, or the same views when the cache stores CLIP per view), both loaded from the files the
cache's manifest names and checked against its sha256s; the same `fuse_batch` then turns their outputs
into targets (eq. 2-4, 7). The cache supplies only what does not depend on the image: the prompt sets'
text embeddings, tau, the statistics over its rows, and the view parameters the draws replay. With a cache whose teacher views match
the student's draws (CIFAR's 162 crop+flip views), a cached and an online run see the same pixels and the
same random draws, so their per-step losses agree to within the cache's fp16 storage
(tests/test_online.py). It is also the online baseline of benchmarks/stage_two.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cache_store import CacheReader
from pipelines.build import clip_forward, recorded_teacher, setup_teacher, teacher_forward, Teacher
from pipelines.config import TrainConfig
from pipelines.targets import CachedRows, StageTwoTargets
from richkd_cache.clip import ClipTeacher, load_clip, recorded_activation, resolve_clip
from richkd_cache.data import ImageDataset
from richkd_cache.errors import ConfigError
from richkd_cache.files import file_sha256
from richkd_cache.models import resolve_checkpoint


def online_source(cfg: TrainConfig, cache: CacheReader, dataset: ImageDataset, cached: StageTwoTargets,
                  device: torch.device) -> StageTwoTargets:
    """`cached` with its rows replaced by the models' outputs: only the view parameters are still gathered
    (they replay the pixels the models then see); the fusion state (prompt sets, tau, statistics) is the
    cached run's."""
    if cfg.clip_checkpoint and len(cached.state.clips) > 1:
        raise ConfigError("--clip-checkpoint is one CLIP model's weights; with several --clip-model models the "
                          "files their manifest entries record are used")
    teacher = online_teacher(cfg, cache.manifest["teacher"], dataset, device)
    clips = [(part, online_clip(cfg, cache.clip_records[part.name], device)) for part in cached.state.clips]
    per_view = cached.rows.plan.clip_per_view
    names = {"logits": "teacher/logits", "features": "teacher/features"}

    @torch.no_grad()
    def run_models(clean: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher on `pixels`, each CLIP model on `clean` (or on `pixels`): rows as a cache stores them."""
        z_t, f_t = teacher_forward(teacher, dataset, pixels, device)
        rows = {names["logits"]: z_t, names["features"]: f_t}
        for part, clip in clips:
            embeds, f_c = clip_forward(clip, pixels if per_view else clean, device)
            rows.update({part.embeds: embeds, part.features: f_c})
        return {n: t.float() for n, t in rows.items()}

    plan = cached.rows.plan
    views_only = dataclasses.replace(plan, teacher=tuple(n for n in plan.teacher if n == "views/params"), clip=())
    rows = CachedRows(views_only, cached.rows.arrays, cached.rows.device)
    return dataclasses.replace(cached, rows=rows, online=run_models)


def online_teacher(cfg: TrainConfig, recorded: dict, dataset: ImageDataset, device: torch.device) -> Teacher:
    """The teacher the cache was built with: its recorded checkpoint, or --teacher-checkpoint on this machine."""
    weights = recorded_teacher(cfg.teacher_checkpoint, recorded)
    path = checked_file(resolve_checkpoint(weights, recorded["arch"]) if weights else None,
                        recorded.get("checkpoint_sha256"), "teacher", "--teacher-checkpoint")
    return setup_teacher(recorded["arch"], path, dataset, device)


def online_clip(cfg: TrainConfig, recorded: dict, device: torch.device) -> ClipTeacher:
    """CLIP as the cache recorded it: the same architecture, activation and weights (a tag, seeded random
    weights, or a checkpoint file checked by sha256)."""
    checkpoint = None
    if recorded.get("checkpoint_sha256"):
        checkpoint = checked_file(cfg.clip_checkpoint or recorded.get("checkpoint"), recorded["checkpoint_sha256"],
                                  "CLIP", "--clip-checkpoint")
    spec = resolve_clip(recorded["arch"], None if checkpoint else recorded.get("pretrained"), checkpoint,
                        recorded_activation(recorded))
    return load_clip(spec, device=device)


def checked_file(path: str | None, sha256: str | None, what: str, flag: str) -> str:
    """A model file that must be the very one the cache was built with."""
    if not path:
        raise ConfigError(f"the cache does not record the {what}'s file; pass {flag} FILE")
    if not Path(path).is_file():
        raise ConfigError(f"the {what}'s file {path} is not on this machine; pass {flag} FILE")
    if sha256 and file_sha256(path) != sha256:
        raise ConfigError(f"{path} is not the {what} this cache was built with (sha256 differs)")
    return path
