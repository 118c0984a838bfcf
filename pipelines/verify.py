"""`verify --recompute K`: run the teacher and CLIP again on K random cached rows and compare.

Everything else `verify` checks needs no model (cache_store.verify_cache); this part proves the numbers
themselves: the same weights (by hash) on the same images give the cached outputs within fp16 rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_store import open_cache
from pipelines.build import make_forward, recorded_teacher, recorded_views, setup_teacher
from pipelines.config import resolve_device
from richkd_cache.clip import load_clip, recorded_activation, resolve_clip
from richkd_cache.data import create_dataset, dataset_fingerprint
from richkd_cache.data.replay import WithViews
from richkd_cache.errors import ConfigError, DataError
from richkd_cache.files import file_sha256
from richkd_cache.models import resolve_checkpoint

def recompute_rows(url: str, k: int, data_root: str | None, teacher_checkpoint: str | None,
                   clip_checkpoint: str | None, device: str, seed: int = 0) -> list[str]:
    """Problems found on k random rows (empty: they match). Uses the recorded files unless overridden."""
    cache = open_cache(url)
    manifest = cache.manifest
    recorded = manifest["dataset"]
    dataset = create_dataset(recorded["name"], data_root or recorded.get("root"), recorded["split"],
                             **(recorded.get("options") or {}))
    if dataset_fingerprint(dataset) != recorded["fingerprint"]:
        raise DataError(f"the images under {dataset.root} are not the ones cache {url} was built from")
    checkpoint = resolve_checkpoint(recorded_teacher(teacher_checkpoint, manifest["teacher"]), manifest["teacher"]["arch"])
    if file_sha256(checkpoint) != manifest["teacher"]["checkpoint_sha256"]:
        raise ConfigError(f"teacher checkpoint {checkpoint} is not the file the cache was built with (sha256 differs)")
    torch_device = resolve_device(device)
    teacher = setup_teacher(manifest["teacher"]["arch"], checkpoint, dataset, torch_device)
    models = cache.complete_clip_models()
    if clip_checkpoint and len(models) > 1:
        raise ConfigError("--clip-checkpoint is one model's weights, and this cache holds several CLIP models; "
                          "recompute with the files their manifest entries record")
    clips = [(cache.clips[m], load_clip(resolve_clip(cache.clip_records[m]["requested"], cache.clip_records[m].get("pretrained"),
                                                     clip_checkpoint, recorded_activation(cache.clip_records[m])),
                                        device=torch_device)) for m in models]
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), size=min(k, len(dataset)), replace=False))
    views = recorded_views(cache)
    forward = make_forward(teacher, clips, dataset, torch_device, views, cache.layout.teacher_topk)
    source = WithViews(dataset, views.policy, views.value, views.seed, views.num_views) \
        if views.policy.whole_image else dataset
    batch = torch.utils.data.default_collate([source[int(i)] for i in rows])
    fresh = forward(batch)
    compared = [n for n, spec in cache.arrays().items()
                if spec.dtype == "float16" and n in fresh]  # the model outputs (top-k indices may swap on near-ties)
    problems = []
    for name in ("views/params", "views/strong_params"):  # the views are drawn again from the recorded seed
        if name in fresh:
            stored = np.concatenate([cache.load_rows(name, int(r), int(r) + 1) for r in rows])
            same = (fresh[name] == stored).all(axis=(1, 2))
            if not same.all():
                problems.append(f"{name}: the views of rows {rows[~same][:10].tolist()} are not those their seed draws")
    for name in compared:  # only the chunks holding the rows are read: an ImageNet cache is many GB
        cached = np.concatenate([cache.load_rows(name, int(r), int(r) + 1) for r in rows]).astype(np.float32)
        close = np.isclose(fresh[name], cached, rtol=1e-2, atol=1e-2).all(axis=(1, 2))
        if not close.all():
            problems.append(f"{name}: recomputed rows {rows[~close][:10].tolist()} differ from the cache")
    return problems
