"""The cached clean view, which accuracy is measured on (info, analyze): each model's clean view found, and
its rows read as tensors (the teacher's logits rebuilt from top-k where only that is stored)."""

from __future__ import annotations

import numpy as np
import torch

from cache_store import CacheReader
from cache_store.schema import model_views
from richkd_cache.distill.batch import teacher_rows_logits
from richkd_cache.errors import DataError, RichKDError
from richkd_cache.views import CIFAR_SIZE, ViewPolicy, clean_view_index, create_policy, parse_policy


def clean_views(reader: CacheReader) -> dict[str, int | None]:
    """Each model's clean view index (None: that model has no clean view, e.g. random views only)."""
    size = (reader.manifest.get("views") or {}).get("image_size", CIFAR_SIZE)
    return {model: clean_view_index(parse_policy(str(v["policy"])), size)
            for model, v in model_views(reader.manifest).items()}


def clean_rows(reader: CacheReader) -> dict[str, tuple[tuple[str, ...], int] | None]:
    """Where each model's clean view is: (arrays, view) for the teacher (its clean view among its views, or
    the clean row stored beside random views) and CLIP ((), its clean view); None where there is none."""
    clean = clean_views(reader)
    teacher = None
    if clean["teacher"] is not None:
        teacher = (teacher_logit_arrays(reader), clean["teacher"])
    elif reader.layout.teacher_clean:
        teacher = (teacher_logit_arrays(reader, part="clean_"), 0)
    return {"teacher": teacher, "clip": None if clean["clip"] is None else ((), clean["clip"])}


def has_clean_views(reader: CacheReader) -> bool:
    """Whether accuracy can be measured from the cache: both models have a clean row."""
    return None not in clean_rows(reader).values()


def stored_policy(reader: CacheReader, which: str = "teacher") -> ViewPolicy:
    """The policy whose records a cache stores for the teacher's views (`views/params`) or the strong views
    (`which="strong"`), refused in one line when its recorded fields are not those this version replays."""
    views = reader.manifest.get("views") or {}
    entry = views.get("strong") if which == "strong" else views
    size = views.get("image_size", CIFAR_SIZE)
    teacher = reader.manifest.get("teacher") or {}
    norm = (tuple(teacher["mean"]), tuple(teacher["std"])) if teacher.get("mean") and teacher.get("std") else None
    try:
        policy = create_policy(str(entry["augment"]), int(size), norm)  # the normalisation the build drew with
    except (KeyError, TypeError, ValueError, RichKDError):
        raise DataError(f"cache {reader.url} records no view policy this version replays for its {which} views "
                        f"({entry.get('augment') if isinstance(entry, dict) else entry!r})") from None
    if entry.get("fields") != policy.record.manifest():
        raise DataError(f"cache {reader.url} packs its {which} views' records with fields {entry.get('fields')}, "
                        f"but policy {policy.name} here packs {policy.record.manifest()}: rebuild the cache or "
                        "use the richkd-cache that built it")
    return policy


def teacher_logit_arrays(cache: CacheReader, part: str = "") -> tuple[str, ...]:
    """The arrays holding the teacher's logits: on its views (`part` ""), on the strong views ("strong_"), or
    its clean row beside random views ("clean_"); full, or top-k."""
    return tuple(f"teacher/{part}{n}" for n in (("topk_values", "topk_indices") if cache.layout.teacher_topk else ("logits",)))


def clean_view(reader: CacheReader,
               models: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Labels (N,), the teacher's logits (N, C) and each CLIP model's image embeddings (N, D) of the clean
    view (the whole image, which accuracy is measured on), the teacher's rebuilt from its top-k when the
    cache stores only that. `models`: the CLIP models (None: the cache's only one)."""
    clean = clean_rows(reader)
    missing = [m for m, v in clean.items() if v is None]
    if missing:
        policies = {m: v["policy"] for m, v in model_views(reader.manifest).items()}
        raise DataError(f"cache {reader.url} holds no clean view of the {' and '.join(missing)} (views: "
                        f"{', '.join(f'{m} {p}' for m, p in policies.items())}); accuracy is measured on the clean view")
    (names, t), (_, c) = clean["teacher"], clean["clip"]
    # the clean row's arrays are read under the teacher's own names (teacher/clean_logits -> teacher/logits)
    z_t = teacher_rows_logits({n.replace("/clean_", "/"): torch.from_numpy(reader.load_view(n, t)) for n in names},
                              reader.layout.num_classes)
    models = reader.select_clip(None) if models is None else models
    embeds = {m: torch.from_numpy(reader.load_view(reader.clips[m].image_embeds, c).astype(np.float32)) for m in models}
    return torch.from_numpy(reader.load("labels").astype(np.int64)), z_t, embeds
