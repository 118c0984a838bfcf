"""Reading a cache: read-only, whole arrays at a time (random rows straight from zarr are slow)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import zarr

from cache_store._store import open_group_read
from cache_store.errors import CacheError
from cache_store.schema import (
    FORMAT_VERSION,
    MANIFEST_KEY,
    STATUS_COMPLETE,
    TEXT_GROUP,
    CacheLayout,
    check_array,
    validate_manifest,
)


def open_cache(url: str, require_complete: bool = True) -> "CacheReader":
    """Open and check a cache: version, status, and every array's dtype and shape against its layout."""
    group = open_group_read(url)
    manifest = group.attrs.get(MANIFEST_KEY)
    validate_manifest(manifest, url)
    reader = CacheReader(url, group, dict(manifest))
    reader.check_arrays()
    if require_complete and manifest["status"] != STATUS_COMPLETE:
        written = reader.written_mask()
        raise CacheError(
            f"cache {url} is incomplete (status {manifest['status']}, {int(written.sum())} of {written.size} "
            "blocks written): re-run the same build command to resume"
        )
    return reader


class CacheReader:
    """A checked cache opened read-only; get one from `open_cache`. Nothing it does writes to the store."""

    def __init__(self, url: str, group: zarr.Group, manifest: dict) -> None:
        self.url = url
        self.group = group
        self.manifest = manifest
        self.layout = CacheLayout(**manifest["layout"])

    def check_arrays(self) -> None:
        """Every array of the layout is there with its dtype and shape; prompt sets are float32 [M, C, D]."""
        for name, spec in self.layout.arrays().items():
            if name not in self.group:
                raise CacheError(f"cache {self.url} lacks array {name}; the cache is damaged, rebuild it")
            array = self.group[name]
            check_array(name, spec, array.dtype, array.shape, self.url)
        for name in self.prompt_sets():
            array = self.group[f"{TEXT_GROUP}/{name}"]
            c, d = self.layout.num_classes, self.layout.clip_embed_dim
            if array.dtype != np.float32 or array.ndim != 3 or array.shape[1:] != (c, d):
                raise CacheError(
                    f"cache {self.url}: prompt set {name} is {array.dtype} {array.shape}, "
                    f"format {FORMAT_VERSION} says float32 (M, {c}, {d})"
                )

    def prompt_sets(self) -> list[str]:
        if TEXT_GROUP not in self.group:
            return []
        return sorted(self.group[TEXT_GROUP].array_keys())

    def load(self, name: str) -> np.ndarray:
        """One whole array (the fast way: zarr reads each chunk once)."""
        if name not in self.layout.arrays() and name.removeprefix(f"{TEXT_GROUP}/") not in self.prompt_sets():
            raise CacheError(f"cache {self.url} has no array {name!r}; it has {', '.join(self.layout.arrays())}")
        return self.group[name][...]

    def load_many(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        return {name: self.load(name) for name in names}

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Sample rows start..stop of one array; whole chunks when the range is one or more write blocks."""
        if name not in self.group:
            raise CacheError(f"cache {self.url} has no array {name}")
        return self.group[name][start:stop]

    def text_embeddings(self, name: str) -> np.ndarray:
        """[M, C, D] float32 text embeddings of a stored prompt set."""
        if name not in self.prompt_sets():
            raise CacheError(
                f"prompt set {name!r} is not in cache {self.url}; stored: {', '.join(self.prompt_sets()) or 'none'}"
                " (add one with `richkd-cache prompts add`)"
            )
        return self.group[f"{TEXT_GROUP}/{name}"][...]

    def prompt_set_attrs(self, name: str) -> dict:
        return dict(self.group[f"{TEXT_GROUP}/{name}"].attrs)

    def written_mask(self) -> np.ndarray:
        """[num_blocks] bool: block b's rows are stored (fill values elsewhere)."""
        return self.group["written"][...]

    def array_info(self) -> list[dict]:
        names = list(self.layout.arrays()) + [f"{TEXT_GROUP}/{p}" for p in self.prompt_sets()]
        info = []
        for name in names:
            array = self.group[name]
            info.append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape),
                         "chunks": list(array.chunks), "stored_bytes": int(array.nbytes_stored())})
        return info

    def nbytes_per_sample_view(self) -> float:
        """Stored (compressed) bytes of the per-sample arrays, per sample-view."""
        per_sample = set(self.layout.sample_arrays())
        stored = sum(a["stored_bytes"] for a in self.array_info() if a["name"] in per_sample)
        return stored / max(self.layout.num_samples * self.layout.num_views, 1)
