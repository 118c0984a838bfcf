"""Writing a cache so that no interruption, and no second writer, can leave it silently wrong.

- each block of rows is written whole, one call per array (a block is exactly one chunk), and only then
  flagged in `written` (its own chunk): a killed build loses at most the blocks in flight;
- the manifest says `building` until `finalize` has seen every flag, and only then `complete`;
- writers of different blocks never touch the same chunk, so N processes lose nothing.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np
import zarr
from zarr.codecs import BytesCodec, ZstdCodec

from cache_store._store import group_exists, occupied, open_group_write
from cache_store.errors import CacheError
from cache_store.schema import (
    FORMAT_VERSION,
    MANIFEST_KEY,
    STATUS_BUILDING,
    STATUS_COMPLETE,
    TEXT_GROUP,
    CacheLayout,
    bad_rows,
    describe_samples,
    validate_manifest,
)

COMPRESSOR = ZstdCodec(level=3)
STORE_PACKAGES = ("zarr", "numpy", "numcodecs")
PROMPT_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # one array name under clip/text, no nesting


def create_cache(url: str, layout: CacheLayout, manifest: dict, overwrite: bool = False) -> "CacheWriter":
    """Create the cache, or reopen it to resume when it was started by the same build.

    "The same build" means the same `manifest["build_key"]` (data fingerprint, models, views) and layout.
    Another cache at `url` is refused unless `overwrite`; files that are not a cache are never deleted.
    """
    if group_exists(url):
        if not overwrite:
            return _resume(url, layout, manifest)
    elif occupied(url):
        raise CacheError(f"{url} already holds files that are not a cache; choose another location (nothing changed)")
    group = open_group_write(url, "w")
    for spec in layout.arrays().values():
        group.create_array(
            spec.name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=spec.fill_value,
            serializer=BytesCodec(), compressors=COMPRESSOR,
        )
    versions = {name: importlib.metadata.version(name) for name in STORE_PACKAGES}
    group.attrs[MANIFEST_KEY] = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "status": STATUS_BUILDING,
        "layout": asdict(layout),
        "chunking": {"block_rows": layout.block_rows, "compressor": "zstd", "level": COMPRESSOR.level},
        "versions": {**manifest.get("versions", {}), **versions},
    }
    return CacheWriter(url, group)


def _resume(url: str, layout: CacheLayout, manifest: dict) -> "CacheWriter":
    group = open_group_write(url, "r+")
    old = group.attrs.get(MANIFEST_KEY)
    differences = _differences(old, manifest, layout)
    if differences:
        raise CacheError(
            f"a different cache already exists at {url} (differs in: {', '.join(differences)}); "
            "pass --overwrite to replace it"
        )
    if old.get("status") not in (STATUS_BUILDING, STATUS_COMPLETE):
        raise CacheError(f"cache {url} has unknown status {old.get('status')!r}; pass --overwrite to rebuild it")
    return CacheWriter(url, group)


def open_for_write(url: str) -> "CacheWriter":
    """An existing cache, for another writer process or to add prompt sets; creates nothing."""
    if not group_exists(url):
        raise CacheError(f"no cache at {url}")
    group = open_group_write(url, "r+")
    validate_manifest(group.attrs.get(MANIFEST_KEY), url)  # never write into a format this code does not know
    return CacheWriter(url, group)


def _differences(old: object, manifest: dict, layout: CacheLayout) -> list[str]:
    if not isinstance(old, dict):
        return ["not a richkd-cache cache"]
    if old.get("format_version") != FORMAT_VERSION:
        return ["format_version"]
    found = [f"build_key.{k}" for k in _diff_keys(old.get("build_key", {}), manifest.get("build_key", {}))]
    if old.get("layout") != asdict(layout):
        found.append("layout")
    return found


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


class CacheWriter:
    def __init__(self, url: str, group: zarr.Group) -> None:
        self.url = url
        self.group = group
        self.manifest = dict(group.attrs[MANIFEST_KEY])
        self.layout = CacheLayout(**self.manifest["layout"])
        self._specs = self.layout.sample_arrays()

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def block_range(self, block: int) -> tuple[int, int]:
        return self.layout.block_range(block)

    def pending_blocks(self, blocks: Iterable[int] | None = None) -> list[int]:
        """Blocks not yet flagged in `written` (of `blocks`, or of all), in the order given."""
        done = self.group["written"][:]
        wanted = range(self.num_blocks) if blocks is None else [self._check_block(b) for b in blocks]
        return [int(b) for b in wanted if not done[b]]

    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Store one whole block, then flag it. Everything is checked before the first byte is written,
        so a refused block leaves the cache as it was."""
        start, stop = self.block_range(self._check_block(block))
        if set(arrays) != set(self._specs):
            raise CacheError(f"block {block}: expected arrays {sorted(self._specs)}, got {sorted(arrays)}")
        prepared = {name: self._prepare(name, np.asarray(value), start, stop) for name, value in arrays.items()}
        for name, value in prepared.items():
            self.group[name][start:stop] = value  # exactly one chunk: one call, no shared chunk
        self.group["written"][block] = True  # its own chunk: flags of other writers are untouched

    def _check_block(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise CacheError(f"block {block} does not exist: cache {self.url} has blocks 0..{self.num_blocks - 1}")
        return int(block)

    def _prepare(self, name: str, value: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Check one array of a block (shape, dtype kind, finiteness, range) and cast it to the stored dtype."""
        spec = self._specs[name]
        expected = (stop - start, *spec.shape[1:])
        if tuple(value.shape) != expected:
            raise CacheError(f"{name}: block rows {start}..{stop} need shape {expected}, got {tuple(value.shape)}")
        if not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
            raise CacheError(f"{name} must be {spec.dtype} (or castable to it), got {value.dtype}")
        bad = bad_rows(name, value, self.layout.num_classes)
        if bad.size:
            samples = describe_samples(bad + start)
            if np.issubdtype(value.dtype, np.floating):
                raise CacheError(f"non-finite values (NaN/Inf) in {name} for sample(s) {samples}; "
                                 "the model produced them, so the cache would be wrong")
            raise CacheError(f"{name} outside 0..{self.layout.num_classes - 1} for sample(s) {samples}")
        if spec.dtype == "float16" and np.abs(value).max(initial=0.0) > np.finfo(np.float16).max:
            raise CacheError(f"{name} has values beyond float16's range (65504) in rows {start}..{stop}")
        return value.astype(spec.dtype, copy=False)

    def put_text_embeddings(self, name: str, embeds: np.ndarray, attrs: dict, replace: bool = False) -> None:
        """Prompt set `name`: [M, C, D] float32 per-template text embeddings (eq. 2-3 need only these).

        Storing the same embeddings again is a no-op (a resumed build does it); other embeddings under an
        existing name are refused unless `replace`."""
        if not PROMPT_SET_NAME.fullmatch(name):
            raise CacheError(f"prompt set name {name!r} may use only letters, digits, '_', '-' and '.'")
        embeds = np.asarray(embeds, dtype=np.float32)
        c, d = self.layout.num_classes, self.layout.clip_embed_dim
        if embeds.ndim != 3 or embeds.shape[1:] != (c, d):
            raise CacheError(f"prompt set {name}: text embeddings must be [M, {c}, {d}], got {list(embeds.shape)}")
        if not np.isfinite(embeds).all():
            raise CacheError(f"prompt set {name}: the text embeddings hold NaN/Inf; the text encoder output is broken")
        path = f"{TEXT_GROUP}/{name}"
        if path in self.group:
            if np.array_equal(self.group[path][:], embeds):
                return
            if not replace:
                raise CacheError(
                    f"prompt set {name!r} already exists in {self.url} with other embeddings; choose another --name"
                )
        array = self.group.create_array(
            path, shape=embeds.shape, chunks=embeds.shape, dtype="float32", serializer=BytesCodec(),
            compressors=COMPRESSOR, overwrite=True,
        )
        array[...] = embeds
        array.attrs.update(attrs)
        self._keep_consolidated()

    def update_manifest(self, **fields: object) -> None:
        """Merge top-level manifest keys (e.g. accuracy figures measured after the forward pass)."""
        manifest = {**self.group.attrs[MANIFEST_KEY], **fields}
        self.group.attrs[MANIFEST_KEY] = manifest
        self.manifest = manifest
        self._keep_consolidated()

    def finalize(self) -> None:
        """Mark complete once every block is flagged; consolidate metadata for readers. Idempotent."""
        missing = len(self.pending_blocks())
        if missing:
            raise CacheError(f"cache {self.url} is missing {missing} of {self.num_blocks} blocks; cannot complete it")
        self.update_manifest(status=STATUS_COMPLETE)

    def _keep_consolidated(self) -> None:
        """A complete cache carries consolidated metadata (remote readers open it with one request).
        Any metadata change drops it, so re-consolidate; while building there is nothing to keep."""
        if self.manifest["status"] != STATUS_COMPLETE:
            return
        with warnings.catch_warnings():  # zarr notes that consolidation is outside the v3 spec: we know
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)

