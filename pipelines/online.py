"""The online reference: the teacher and CLIP run on every training batch, as the paper's code does.

`train --online` trains exactly as a cached run does except for where the targets come from. Instead of
gathering cached rows, each batch's drawn views go through the teacher and the images through CLIP (its
clean view, or the same views when the cache stores CLIP per view), both loaded from the files the
cache's manifest names and checked against its sha256s; the same `compute_targets` then turns their
outputs into targets (eq. 2-4, 7). The cache supplies only what does not depend on the image: the prompt
sets' text embeddings, tau, and the view table the draws replay. With a cache whose teacher views match
the student's draws (CIFAR's 162 crop+flip views), a cached and an online run see the same pixels and the
same random draws, so their per-step losses agree to within the cache's fp16 storage
(tests/test_online.py). It is also the online baseline of benchmarks/stage_two.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_store import CacheReader
from pipelines.build import Clip, Teacher, clip_forward, recorded_teacher, setup_teacher, teacher_forward
from pipelines.config import TrainConfig
from pipelines.targets import Fusion, Targets, Window, compute_targets, setup_fusion
from richkd_cache.clip import ClipTeacher, load_clip, recorded_activation, resolve_clip
from richkd_cache.data import ImageDataset
from richkd_cache.errors import ConfigError
from richkd_cache.files import file_sha256
from richkd_cache.models import resolve_checkpoint


@dataclass
class OnlineTargets(Targets):
    """Targets computed per batch from the models; `views` is the cache's view table, so `augment` draws
    and replays exactly what a cached run would."""

    cfg: TrainConfig | None = None
    fusion: Fusion | None = None
    teacher: Teacher | None = None
    clips: list[Clip] | None = None  # the chosen CLIP models (--clip-model), with the array names they fill
    dataset: ImageDataset | None = None
    clip_per_view: bool = False  # the cache stores CLIP on the teacher's views, not on the clean image

    @torch.no_grad()
    def lookup(self, rows: torch.Tensor, device: torch.device, clean: torch.Tensor,
               pixels: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Teacher on `pixels`, each CLIP model on `clean` (or on `pixels`), then eq. 2-4 and 7 on those rows."""
        z_t, f_t = teacher_forward(self.teacher, self.dataset, pixels, device)
        outputs = [("teacher/logits", z_t), ("teacher/features", f_t)]
        for layout, clip in self.clips or []:
            embeds, f_c = clip_forward(clip, pixels if self.clip_per_view else clean, device)
            outputs += [(layout.image_embeds, embeds), (layout.features, f_c)]
        # (B, 1, X): one view per row, as a cache stores it
        arrays = {name: t.float().cpu().numpy()[:, None] for name, t in outputs}
        batch = compute_targets(self.cfg, arrays, self.fusion, device, None)
        return Targets.lookup(batch, torch.arange(len(pixels), device=device), device, clean, pixels)


def online_windows(cfg: TrainConfig, cache: CacheReader, dataset: ImageDataset,
                   device: torch.device) -> Callable[..., Iterator[Window]]:
    """One window per epoch, as for a cache read whole, with targets computed per batch."""
    manifest = cache.manifest
    views = cache.load("views/params")  # (N, V, 5) the teacher's views
    fusion = setup_fusion(cfg, cache)
    if cfg.clip_checkpoint and len(fusion.clips) > 1:
        raise ConfigError("--clip-checkpoint is one CLIP model's weights; with several --clip-model models the "
                          "files their manifest entries record are used")
    targets = OnlineTargets(
        logits=None, features=None,
        views=torch.from_numpy(views).to(device) if views.shape[1] > 1 else None,
        cfg=cfg, fusion=fusion, dataset=dataset,
        teacher=online_teacher(cfg, manifest["teacher"], dataset, device),
        clips=[(c, online_clip(cfg, cache.clip_records[c.name], device)) for c in fusion.clips],
        clip_per_view=cache.layout.clip_num_views == views.shape[1] > 1,
    )

    def windows(generator: torch.Generator, pool: torch.Tensor) -> Iterator[Window]:
        yield pool[torch.randperm(len(pool), generator=generator, device=generator.device).cpu()], targets, None

    return windows


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
