"""Cached rows as tensors: (n, V, X) float16 arrays -> float32 tensors, the teacher's logits rebuilt,
and each model's clean view found.

The teacher holds V views per sample and CLIP Vc: 1 (the clean view, the paper's setting) or V (the
same views). Teacher row (i, v) pairs with CLIP row (i, 0) when Vc = 1 and (i, v) when Vc = V, which
is what broadcasting (n, V, X) against (n, Vc, X) does.
"""

from __future__ import annotations

import numpy as np
import torch

import math

from cache_store import CacheReader
from cache_store.schema import ClipLayout, model_views
from richkd_cache.distill import logits_from_topk
from richkd_cache.distill.fusion import centred_energy
from richkd_cache.errors import DataError
from richkd_cache.views import CIFAR_SIZE, clean_view_index, parse_policy


def teacher_logits(arrays: dict[str, np.ndarray], num_classes: int) -> torch.Tensor:
    """(n, V, C) float32: the stored logits, or a full distribution rebuilt from the stored top-k."""
    if "teacher/logits" in arrays:
        return float_rows(arrays["teacher/logits"])
    values = float_rows(arrays["teacher/topk_values"])
    indices = torch.from_numpy(arrays["teacher/topk_indices"].astype(np.int64))
    return logits_from_topk(values, indices, num_classes)


def float_rows(array: np.ndarray) -> torch.Tensor:
    """(n, V, X) float16 -> (n, V, X) float32."""
    return torch.from_numpy(array.astype(np.float32))


def flatten_views(rows: torch.Tensor) -> torch.Tensor:
    """(n, V, X) -> (n * V, X): row i * V + v is view v of the i-th sample."""
    return rows.reshape(-1, rows.shape[-1])


def per_view_rows(paired: torch.Tensor, num_views: int) -> torch.Tensor:
    """(n, V or 1, X) -> (n * V, X): one row per teacher view, a per-sample row repeated over the views."""
    n, _, x = paired.shape
    return paired.expand(n, num_views, x).reshape(n * num_views, x)


def clean_views(reader: CacheReader) -> dict[str, int | None]:
    """Each model's clean view index (None: that model has no clean view, e.g. random views only)."""
    size = (reader.manifest.get("views") or {}).get("image_size", CIFAR_SIZE)
    return {model: clean_view_index(parse_policy(str(v["policy"])), size)
            for model, v in model_views(reader.manifest).items()}


def clip_feature_scales(arrays: dict[str, np.ndarray], clips: list[ClipLayout]) -> dict[str, float]:
    """Each CLIP model's feature scale when several are concatenated into f_C (eq. 7): 1 / the root mean
    squared norm of its rows about their mean, so every model's block has the same energy and none
    dominates the fused feature by the scale of its features alone."""
    return {c.name: 1.0 / math.sqrt(centred_energy(arrays[c.features], f"CLIP {c.name}")) for c in clips}


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
    names = [n for n in ("teacher/logits", "teacher/topk_values", "teacher/topk_indices") if n in reader.layout.arrays()]
    z_t = teacher_logits({n: reader.load_view(n, t)[:, None] for n in names}, reader.layout.num_classes)[:, 0]
    models = reader.select_clip(None) if models is None else models
    embeds = {m: torch.from_numpy(reader.load_view(reader.clips[m].image_embeds, c).astype(np.float32)) for m in models}
    return torch.from_numpy(reader.load("labels").astype(np.int64)), z_t, embeds
