"""Cached rows as tensors: (n, V, X) float16 arrays -> (n * V, X) float32, the teacher's logits rebuilt."""

from __future__ import annotations

import numpy as np
import torch

from cache_store import CacheReader
from richkd_cache.distill import logits_from_topk


def teacher_logits(arrays: dict[str, np.ndarray], num_classes: int) -> torch.Tensor:
    """(n * V, C) float32: the stored logits, or a full distribution rebuilt from the stored top-k."""
    if "teacher/logits" in arrays:
        return flat(arrays["teacher/logits"])
    values = flat(arrays["teacher/topk_values"])
    indices = torch.from_numpy(arrays["teacher/topk_indices"].reshape(values.shape).astype(np.int64))
    return logits_from_topk(values, indices, num_classes)


def flat(rows: np.ndarray) -> torch.Tensor:
    """(n, V, X) float16 -> (n * V, X) float32: row i * V + v is view v of the i-th sample."""
    return torch.from_numpy(rows.reshape(-1, rows.shape[-1]).astype(np.float32))


def clean_view(reader: CacheReader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels (N,), the teacher's logits (N, C) and CLIP's image embeddings (N, D) of the clean (first) view,
    the teacher's rebuilt from its top-k when the cache stores only that."""
    names = [n for n in ("teacher/logits", "teacher/topk_values", "teacher/topk_indices") if n in reader.layout.arrays()]
    z_t = teacher_logits({n: reader.load(n)[:, :1] for n in names}, reader.layout.num_classes)
    embeds = flat(reader.load("clip/image_embeds")[:, :1])
    return torch.from_numpy(reader.load("labels").astype(np.int64)), z_t, embeds
