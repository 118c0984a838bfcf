"""Cache format 1: the arrays, their dtypes, shapes and chunking, and the manifest rules.

docs/cache-format.md is the prose version of this module; keep the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cache_store.errors import CacheError

FORMAT_VERSION = 1
MANIFEST_KEY = "richkd_cache"
STATUS_BUILDING, STATUS_COMPLETE = "building", "complete"
TEXT_GROUP = "clip/text"
REQUIRED_MANIFEST_KEYS = ("format_version", "status", "layout", "dataset", "teacher", "clip")


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    fill_value: float | int | bool


@dataclass(frozen=True)
class CacheLayout:
    """Sizes that fix every array's shape. Sample-axis chunks are whole write blocks of `block_rows`."""

    num_samples: int
    num_views: int
    num_classes: int
    teacher_dim: int
    clip_embed_dim: int
    clip_feature_dim: int
    view_param_dim: int
    block_rows: int
    teacher_topk: int | None = None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.block_rows)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.num_samples)

    def sample_arrays(self) -> dict[str, ArraySpec]:
        """Arrays with one row per sample (and a view axis): written block by block."""
        n, v, r = self.num_samples, self.num_views, self.block_rows
        nan = float("nan")

        def per_view(name: str, dtype: str, width: int, fill: float | int = nan) -> ArraySpec:
            return ArraySpec(name, dtype, (n, v, width), (r, v, width), fill)

        specs = [
            ArraySpec("labels", "int32", (n,), (r,), -1),
            per_view("views/params", "float32", self.view_param_dim),
            per_view("teacher/features", "float16", self.teacher_dim),
            per_view("clip/image_embeds", "float16", self.clip_embed_dim),
            per_view("clip/features", "float16", self.clip_feature_dim),
        ]
        if self.teacher_topk:
            specs += [per_view("teacher/topk_values", "float16", self.teacher_topk),
                      per_view("teacher/topk_indices", "int32", self.teacher_topk, -1)]
        else:
            specs.append(per_view("teacher/logits", "float16", self.num_classes))
        return {s.name: s for s in specs}

    def arrays(self) -> dict[str, ArraySpec]:
        """Every fixed array, `written` included: one flag per block, one chunk per flag, so writers
        of different blocks never touch the same chunk."""
        written = ArraySpec("written", "bool", (self.num_blocks,), (1,), False)
        return {**self.sample_arrays(), "written": written}


def choose_block_rows(bytes_per_row: int, target_bytes: int = 4 << 20, multiple: int = 64) -> int:
    """Rows per write block (= per chunk) so the largest chunk is a few MB (zarr reads whole chunks)."""
    rows = max(multiple, target_bytes // max(bytes_per_row, 1))
    return int(rows // multiple * multiple)


def validate_manifest(manifest: object, url: str) -> None:
    """Refuse what this version does not understand, saying why."""
    if not isinstance(manifest, dict):
        raise CacheError(f"{url} is not a richkd-cache cache (no '{MANIFEST_KEY}' manifest)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CacheError(
                f"cache {url} has format {version}, newer than this richkd-cache understands "
                f"({FORMAT_VERSION}); upgrade richkd-cache"
            )
        raise CacheError(f"cache {url} has unknown format version {version!r} (this richkd-cache reads {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CacheError(f"cache {url} manifest lacks {', '.join(missing)}")


def check_array(name: str, spec: ArraySpec, dtype: np.dtype, shape: tuple[int, ...], url: str) -> None:
    if np.dtype(dtype) != np.dtype(spec.dtype) or tuple(shape) != spec.shape:
        raise CacheError(
            f"cache {url}: array {name} is {np.dtype(dtype)} {tuple(shape)}, "
            f"format {FORMAT_VERSION} says {spec.dtype} {spec.shape}"
        )
