"""The cached clean view, which accuracy is measured on (info, analyze): each model's clean view found, and
its rows read as tensors (the teacher's logits rebuilt from top-k where only that is stored)."""

from __future__ import annotations

import numpy as np
import torch

from cache_store import CacheReader
from cache_store.schema import model_views
from richkd_cache.distill.batch import teacher_rows_logits
from richkd_cache.errors import DataError
from richkd_cache.views import CIFAR_SIZE, clean_view_index, parse_policy


def clean_views(reader: CacheReader) -> dict[str, int | None]:
    """Each model's clean view index (None: that model has no clean view, e.g. random views only)."""
    size = (reader.manifest.get("views") or {}).get("image_size", CIFAR_SIZE)
    return {model: clean_view_index(parse_policy(str(v["policy"])), size)
            for model, v in model_views(reader.manifest).items()}


def teacher_logit_arrays(cache: CacheReader, strong: bool = False) -> tuple[str, ...]:
    """The arrays holding the teacher's logits (on its views, or on the strong views): full, or top-k."""
    prefix = "teacher/strong_" if strong else "teacher/"
    return tuple(f"{prefix}{n}" for n in (("topk_values", "topk_indices") if cache.layout.teacher_topk else ("logits",)))


def clean_view(reader: CacheReader,
               models: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Labels (N,), the teacher's logits (N, C) and each CLIP model's image embeddings (N, D) of the clean
    view (the whole image, which accuracy is measured on), the teacher's rebuilt from its top-k when the
    cache stores only that. `models`: the CLIP models (None: the cache's only one)."""
    clean = clean_views(reader)
    missing = [m for m, v in clean.items() if v is None]
    if missing:
        policies = {m: v["policy"] for m, v in model_views(reader.manifest).items()}
        raise DataError(f"cache {reader.url} holds no clean view of the {' and '.join(missing)} (views: "
                        f"{', '.join(f'{m} {p}' for m, p in policies.items())}); accuracy is measured on the clean view")
    t, c = clean["teacher"], clean["clip"]
    names = teacher_logit_arrays(reader)
    z_t = teacher_rows_logits({n: torch.from_numpy(reader.load_view(n, t)) for n in names}, reader.layout.num_classes)
    models = reader.select_clip(None) if models is None else models
    embeds = {m: torch.from_numpy(reader.load_view(reader.clips[m].image_embeds, c).astype(np.float32)) for m in models}
    return torch.from_numpy(reader.load("labels").astype(np.int64)), z_t, embeds
