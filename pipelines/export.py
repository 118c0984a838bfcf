"""`richkd-cache export`: the fused targets as a plain array file, for labs that train with another tool.

For chosen settings (alpha, prompt set, temperature, lambda) it writes, per cached (sample, view) row, the
fused soft labels softmax(z_F / T) (eq. 4, 5), and optionally the fused feature f_F of the fixed joint space
(eq. 7, docs/fusion.md), with the sample index and view number that key them. Replaying view v of sample i
(its parameters are exported too) gives the pixels those targets belong to. The cache is read block by
block, so a cache larger than memory exports to Parquet in bounded memory; `.npz` gathers every row first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cache_store import open_cache
from pipelines.cached import stored_policy
from pipelines.config import TrainConfig
from pipelines.progress import Reporter
from pipelines.targets import (StageTwoTargets, check_features_stored, chosen_prompt_set, row_plan, selected_clips,
                               setup_targets)
from richkd_cache.distill.batch import fuse_batch
from richkd_cache.errors import ConfigError
from richkd_cache.files import atomic_path
from richkd_cache.views import ViewPolicy

FORMATS = (".parquet", ".npz")


def run_export(cfg: TrainConfig, out: str, with_features: bool, overwrite: bool,
               reporter: Reporter | None = None) -> dict:
    """Write the targets `cfg` describes (target, alpha, prompts, temperature, lam) to `out`."""
    check_export_settings(cfg, with_features)
    path = Path(out)
    if path.suffix not in FORMATS:
        raise ConfigError(f"--out must end in {' or '.join(FORMATS)}, not {path.name!r}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    cache = open_cache(cfg.cache)
    if with_features:
        check_features_stored(cache, "export --features", "export without --features")
    plan = row_plan(cfg, cache, selected_clips(cfg, cache), features=with_features, views=False)
    plan = dataclasses.replace(plan, teacher=(*plan.teacher, "views/params"))
    labels = cache.load("labels")
    cpu = torch.device("cpu")
    source = setup_targets(cfg, cache, labels, torch.arange(len(labels)), cpu, cpu,
                           reporter or Reporter(quiet=True), plan)
    with atomic_path(path) as tmp:
        blocks = export_blocks(cfg, cache.layout.block_rows, source, labels, stored_policy(cache))
        rows = write_parquet(tmp, blocks) if path.suffix == ".parquet" else write_npz(tmp, blocks)
    clips = [c.name for c in source.state.clips]
    return {"out": str(path), "rows": rows, "target": cfg.resolved_target, "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "prompts": chosen_prompt_set(cfg, cache.prompt_sets_of(clips)) if clips else None,
            "clip_models": clips, "features": with_features}


def export_blocks(cfg: TrainConfig, block_rows: int, source: StageTwoTargets, labels: np.ndarray,
                  policy: ViewPolicy) -> Iterator[dict[str, np.ndarray]]:
    """Per block of samples: sample (R,) int64, view (R,) int32, each of the view's fields as view_NAME (R,)
    int32 (the stored policy's: crop box, flip, ...), soft_labels (R, C) float32 and optionally features
    (R, F) float32, one row per (sample, teacher view), each teacher view paired with its CLIP row as
    training pairs them (the clean view's, or the same view's)."""
    arrays, plan = source.rows.arrays, source.rows.plan
    views = arrays["views/params"]  # (N, V, nbytes)
    total, v = views.shape[:2]
    for a in range(0, total, block_rows):
        b = min(a + block_rows, total)
        n = b - a
        rows = {name: flat_views(arrays[name][a:b], v) for name in (*plan.teacher, *plan.clip)}
        y = torch.from_numpy(np.repeat(labels[a:b].astype(np.int64), v))
        logits, parts = fuse_batch(source.state, rows, y)
        part = {
            "sample": np.repeat(np.arange(a, b, dtype=np.int64), v),
            "view": np.tile(np.arange(v, dtype=np.int32), n),
            **{f"view_{name}": value.numpy().astype(np.int32)
               for name, value in policy.record.unpack(rows["views/params"]).items()},
            "soft_labels": torch.softmax(logits / cfg.temperature, dim=1).numpy(),  # eq. 5's target side
        }
        if "teacher" in parts:
            part["features"] = torch.cat([parts[k] for k in ("teacher", "clip")], dim=1).numpy()
        yield part


def flat_views(rows: np.ndarray, views: int) -> torch.Tensor:
    """(n, V or 1, X) -> (n * V, X): one row per (sample, teacher view), a per-sample row repeated."""
    n, stored, x = rows.shape
    out = np.array(rows) if stored == views else np.repeat(np.asarray(rows), views, axis=1)  # a writable copy
    return torch.from_numpy(out.reshape(n * views, x))


def write_parquet(path: Path, blocks: Iterator[dict[str, np.ndarray]]) -> int:
    """One row group per block; vectors as fixed-size lists, so any Parquet reader gets (R, C) back."""
    writer, rows = None, 0
    try:
        for part in blocks:
            table = pa.table({name: column(values) for name, values in part.items()})
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def column(values: np.ndarray) -> pa.Array:
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_npz(path: Path, blocks: Iterator[dict[str, np.ndarray]]) -> int:
    parts = list(blocks)
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append .npz to the temporary name
        np.savez(f, **arrays)
    return len(arrays["sample"])


def check_export_settings(cfg: TrainConfig, with_features: bool) -> None:
    """Exported features are the fixed joint space's f_F: CRD's fusion is learned with the student."""
    if cfg.resolved_target not in ("kd", "clip", "richkd"):
        raise ConfigError(f"--target {cfg.resolved_target} has no soft labels to export; use kd, clip or richkd")
    if with_features and cfg.resolved_target != "richkd":
        raise ConfigError("--features exports the fused feature f_F (eq. 7): it needs --target richkd")
