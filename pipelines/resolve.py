"""The settings a run resolved, filled in where the run starts.

A flag left out means "the default", and several defaults depend on the student, the cache or the data
(the learning rate, the dataset, the prompt set, CLIP's model and tau, the devices). They are resolved
once here, the run trains with the resolved values, and config.json records them: it says what trained,
and a resumed run is matched on values, not on which flags were typed. A setting the run does not use
(the prompt set of a teacher-only target) stays null.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cache_store import CacheReader
from pipelines.config import TrainConfig
from pipelines.summary import default_prompts
from pipelines.targets import selected_clips
from richkd_cache.data import ImageDataset
from richkd_cache.models import uses_small_lr

CLIP_LOGIT_TARGETS = ("clip", "richkd")  # the targets built from CLIP's logits (eq. 2-4), hence a prompt set


def resolve_settings(cfg: TrainConfig, cache: CacheReader | None, train_set: ImageDataset, device: torch.device,
                     cache_device: torch.device) -> TrainConfig:
    """`cfg` with every default the run depends on replaced by its value (same training, named values)."""
    clips = [c.name for c in selected_clips(cfg, cache)] if cache is not None else []
    recorded = cache.manifest["dataset"] if cache is not None else {}
    filled = {
        "target": cfg.resolved_target,
        "dataset": cfg.dataset or recorded.get("name"),
        "data_root": cfg.data_root or train_set.root or None,  # none for bundled data (digits)
        "lr": resolved_lr(cfg),
        "device": str(device),
        "cache_device": str(cache_device) if cache is not None else None,
        **{k: v for k, v in train_set.options.items() if k in ("image_size", "resize")},
    }
    if clips:
        filled["clip_model"] = cfg.clip_model or "+".join(clips)
        if len(clips) == 1 and cfg.clip_tau is None:
            filled["clip_tau"] = float(cache.clip_records[clips[0]]["tau"])  # eq. 2's tau, as recorded
        if cfg.prompts is None and cfg.resolved_target in CLIP_LOGIT_TARGETS:
            filled["prompts"] = default_prompts(cache, clips)  # multi by name where stored
    return replace(cfg, **{k: v for k, v in filled.items() if v is not None})


def resolved_lr(cfg: TrainConfig) -> float:
    """--lr, else mdistiller's: 0.05, or 0.01 for MobileNet/ShuffleNet students."""
    if cfg.lr is not None:
        return cfg.lr
    return 0.01 if uses_small_lr(cfg.student) else 0.05
