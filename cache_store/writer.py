"""Writing a cache so that no interruption, and no second writer, can leave it silently wrong.

- each block of rows is written whole, one call per array (a block is exactly one chunk), and only then
  flagged in `written` (its own chunk): a killed build loses at most the blocks in flight;
- the manifest says `building` until `finalize` has seen every flag, and only then `complete`;
- writers of different blocks never touch the same chunk, so N processes lose nothing;
- the group is created with its manifest in one write, arrays are (re)created by a resumed build when
  missing, and a prompt set is created with its attributes and counts only once its chunk is stored:
  every step is atomic or redone on resume;
- only a cache (a group carrying this manifest, holding nothing but cache keys) is ever deleted;
- a CLIP model added to an existing cache gets its arrays first and its manifest entry (status
  `building`) second, so readers never see an entry without arrays; its blocks carry their own flags,
  and the entry becomes `complete` once every flag is set. The teacher's arrays are never touched.
"""

from __future__ import annotations

import importlib.metadata
import uuid
import warnings
from collections.abc import Iterable

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from cache_store._store import (
    delete_keys,
    group_exists,
    key_exists,
    occupied,
    open_group_write,
    open_store,
    read_json_key,
    stored_keys,
)
from cache_store.errors import CacheError
from cache_store.integrity import check_array_metadata, chunk_key
from cache_store.schema import (
    CACHE_KEY,
    CHECKSUM_CODEC,
    FORMAT_VERSION,
    MANIFEST_KEY,
    PROMPT_SET_NAME,
    WRITE_LEFTOVER,
    STATUS_BUILDING,
    STATUS_COMPLETE,
    CacheLayout,
    ClipLayout,
    bad_rows,
    cache_arrays,
    clip_layouts,
    describe_samples,
    flags_of,
    layout_record,
    read_layout,
    validate_manifest,
)

COMPRESSOR = ZstdCodec(level=3)
# crc32c over the compressed chunk, last in the chain: checked before zstd sees the bytes, and a flipped
# bit in a block zstd stored raw (float16 model outputs barely compress) no longer reads as a wrong value
COMPRESSORS = (COMPRESSOR, Crc32cCodec())
STORED_BYTES = BytesCodec(endian="little")  # schema.STORED_BYTE_ORDER, whatever the machine's
STORE_PACKAGES = ("zarr", "numpy", "numcodecs")
# What makes two CLIP entries under one name the same model (and so a resumable, not a clashing, one).
CLIP_IDENTITY = ("arch", "pretrained", "checkpoint_sha256", "embed_dim", "feature_dim")


def create_cache(url: str, layout: CacheLayout, manifest: dict, overwrite: bool = False) -> "CacheWriter":
    """Create the cache, or reopen it to resume when it was started by the same build.

    "The same build" means the same `manifest["build_key"]` (data fingerprint, teacher, views) and layout.
    `manifest["clip_models"]` names the CLIP models by name (each entry with its `embed_dim` and
    `feature_dim`): those an existing cache lacks are added to it (their arrays only; nothing else is
    rewritten), those it has must be the same weights. Another cache at `url` is refused unless
    `overwrite`; nothing that is not provably a richkd-cache cache (a zarr group carrying its manifest,
    holding only cache keys) is ever deleted.
    """
    if _cache_manifest(url) is not None:
        if not overwrite:
            return _resume(url, layout, manifest)
        _delete_cache(url)
    elif occupied(url):
        raise CacheError(f"{url} already holds files that are not a richkd-cache cache; "
                         "choose another location (nothing was changed)")
    versions = {name: importlib.metadata.version(name) for name in STORE_PACKAGES}
    clip_models = {name: {**record, "status": STATUS_BUILDING} for name, record in manifest["clip_models"].items()}
    full = {
        **manifest,
        "clip_models": clip_models,
        "format_version": FORMAT_VERSION,
        "status": STATUS_BUILDING,
        "cache_id": uuid.uuid4().hex,  # which cache a writer opened: another build's --overwrite changes it
        "layout": layout_record(layout),
        "chunking": {"block_rows": layout.block_rows, "compressor": "zstd", "level": COMPRESSOR.level,
                     "checksum": CHECKSUM_CODEC},
        "versions": {**manifest.get("versions", {}), **versions},
    }
    # one write: a group without its manifest never exists, so a kill here leaves nothing or a cache to resume
    validate_manifest(full, url)  # never write a manifest readers would refuse
    group = zarr.create_group(open_store(url, read_only=False), zarr_format=3, attributes={MANIFEST_KEY: full})
    _create_missing_arrays(group, cache_arrays(layout, clip_layouts(full)))
    return CacheWriter(url, group)


def _cache_manifest(url: str) -> dict | None:
    """The manifest of the cache at `url`; None when there is no zarr group; refused when a zarr.json is
    there that is not a richkd-cache cache's (a foreign group, a damaged file): it is not ours to replace."""
    try:
        root = read_json_key(open_store(url, read_only=False), "zarr.json")
    except CacheError as e:
        raise CacheError(f"{url}: {e}: not a richkd-cache cache, so nothing was changed; "
                         "choose another location") from None
    if root is None:
        return None
    manifest = root.get("attributes", {}).get(MANIFEST_KEY) if isinstance(root, dict) else None
    if not isinstance(manifest, dict) or root.get("node_type") != "group":
        raise CacheError(f"{url} holds a zarr.json that is not a richkd-cache cache (no '{MANIFEST_KEY}' manifest); "
                         "nothing was changed: choose another location")
    return manifest


def _delete_cache(url: str) -> None:
    """Delete a cache's keys, and refuse (deleting nothing) when anything else is stored beside them."""
    store = open_store(url, read_only=False)
    keys = stored_keys(store)
    foreign = sorted(k for k in keys if not (CACHE_KEY.fullmatch(k) or WRITE_LEFTOVER.fullmatch(k)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise CacheError(f"{url} holds files that are not part of a richkd-cache cache ({shown}); "
                         "nothing was deleted: move them away or choose another location")
    delete_keys(store, keys)


def _create_missing_arrays(group: zarr.Group, arrays: dict, replace: bool = False) -> None:
    """Create every array of `arrays` that has no metadata yet (all of them for a new cache; those a
    killed creation did not reach when resuming), or every one when `replace` (a CLIP model's arrays left
    by an add that was killed before its manifest entry). Each creation is one atomic metadata write."""
    existing = stored_keys(group.store)
    for spec in arrays.values():
        if replace or f"{spec.name}/zarr.json" not in existing:
            group.create_array(
                spec.name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=spec.fill_value,
                serializer=STORED_BYTES, compressors=COMPRESSORS, overwrite=True,
            )


def _resume(url: str, layout: CacheLayout, manifest: dict) -> "CacheWriter":
    group = open_group_write(url)
    old = group.attrs.get(MANIFEST_KEY)
    differences = _differences(old, manifest, layout)
    if differences:
        raise CacheError(
            f"a different cache already exists at {url} (differs in: {', '.join(differences)}); "
            "pass --overwrite to replace it"
        )
    validate_manifest(old, url)
    clashes = [name for name, record in manifest["clip_models"].items()
               if name in old["clip_models"] and _clip_identity(old["clip_models"][name]) != _clip_identity(record)]
    if clashes:
        raise CacheError(f"cache {url} already holds CLIP model {', '.join(clashes)} with other weights; "
                         "pass --overwrite to rebuild the cache, or build the other weights into another cache")
    if old["status"] == STATUS_BUILDING:
        _create_missing_arrays(group, layout.arrays())
    writer = CacheWriter(url, group)
    for name in old["clip_models"]:
        if old["clip_models"][name]["status"] == STATUS_BUILDING:  # a killed creation left some out
            _create_missing_arrays(group, writer.clips[name].arrays(layout))
    writer.check_metadata()
    for name, record in manifest["clip_models"].items():
        if name not in old["clip_models"]:
            writer.add_clip_model(name, record)
    return writer


def _clip_identity(record: dict) -> tuple:
    return tuple(record.get(k) for k in CLIP_IDENTITY)


def open_for_write(url: str) -> "CacheWriter":
    """An existing cache, for another writer process or to add prompt sets; creates nothing."""
    if not group_exists(url):
        raise CacheError(f"no cache at {url}")
    group = open_group_write(url)
    manifest = group.attrs.get(MANIFEST_KEY)
    validate_manifest(manifest, url)  # never write into a format this code does not know
    writer = CacheWriter(url, group)
    writer.check_metadata()
    return writer


def _differences(old: dict, manifest: dict, layout: CacheLayout) -> list[str]:
    if old.get("format_version") != FORMAT_VERSION:
        return ["format_version"]
    found = [f"build_key.{k}" for k in _diff_keys(old.get("build_key", {}), manifest.get("build_key", {}))]
    if old.get("layout") != layout_record(layout):
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
        self.layout = read_layout(self.manifest)
        self.clips: dict[str, ClipLayout] = clip_layouts(self.manifest)
        self.cache_id = self.manifest.get("cache_id")  # None for caches created before cache ids

    @property
    def parts(self) -> dict[str, dict]:
        """The sample-axis arrays of each flags array: `written` (the teacher's part) and each CLIP model's
        own flags."""
        parts: dict[str, dict] = {"written": dict(self.layout.sample_arrays())}
        for clip in self.clips.values():
            parts.setdefault(clip.written, {}).update(clip.sample_arrays(self.layout))
        return parts

    def check_metadata(self) -> None:
        """Every existing array's own metadata matches the layout (before any write: see integrity)."""
        keys = stored_keys(self.group.store)
        arrays = {n: s for n, s in cache_arrays(self.layout, self.clips).items()
                  if f"{n}/zarr.json" in keys or flags_of(n, self.clips) == "written"}
        check_array_metadata(self.group, self.layout, self.clips, arrays, self.url)

    def add_clip_model(self, name: str, record: dict) -> None:
        """A CLIP model new to this cache: its arrays (replacing any a killed add left before its entry),
        then its manifest entry, status `building`. Nothing of the teacher or other models is written."""
        layout = ClipLayout(name, record["embed_dim"], record["feature_dim"], f"clip/{name}", f"clip/{name}/written")
        self._check_same_cache()
        _create_missing_arrays(self.group, layout.arrays(self.layout), replace=True)
        models = {**self.manifest["clip_models"], name: {**record, "status": STATUS_BUILDING}}
        self.update_manifest(clip_models=models)

    def _check_same_cache(self) -> None:
        """Refuse to write once the cache this writer opened was replaced (another build's --overwrite) or
        deleted: its rows would land in someone else's cache."""
        try:
            root = read_json_key(self.group.store, "zarr.json")
        except CacheError:
            root = None
        manifest = root.get("attributes", {}).get(MANIFEST_KEY) if isinstance(root, dict) else None
        if not isinstance(manifest, dict) or manifest.get("cache_id") != self.cache_id:
            raise CacheError(f"cache {self.url} was replaced or deleted by another process (a build with "
                             "--overwrite?) while this one was writing to it; this build stopped")

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def block_range(self, block: int) -> tuple[int, int]:
        return self.layout.block_range(block)

    def pending_blocks(self, blocks: Iterable[int] | None = None, flags: str = "written") -> list[int]:
        """Blocks not yet flagged in `flags` (the teacher's `written`, or a CLIP model's `.written`) of
        `blocks` (or of all), in the order given."""
        done = self.group[flags][:]
        wanted = range(self.num_blocks) if blocks is None else [self._check_block(b) for b in blocks]
        return [int(b) for b in wanted if not done[b]]

    def pending_parts(self) -> dict[int, list[str]]:
        """Each block that some part still lacks -> the flags arrays of those parts, in block order."""
        pending: dict[int, list[str]] = {}
        for flags in self.parts:
            for b in self.pending_blocks(flags=flags):
                pending.setdefault(b, []).append(flags)
        return dict(sorted(pending.items()))

    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Store one whole block of one or more parts (every array of each: the teacher's part, a CLIP
        model's), then flag each. Everything is checked before the first byte is written, so a refused
        block leaves the cache as it was."""
        start, stop = self.block_range(self._check_block(block))
        parts = [flags for flags, specs in self.parts.items() if set(specs) & set(arrays)]
        expected = {name for flags in parts for name in self.parts[flags]}
        if not parts or set(arrays) != expected:
            raise CacheError(f"block {block}: expected arrays of whole parts (the teacher's or a CLIP model's: "
                             f"{'; '.join(', '.join(sorted(s)) for s in self.parts.values())}), got {sorted(arrays)}")
        prepared = {name: self._prepare(name, np.asarray(value), start, stop) for name, value in arrays.items()}
        self._check_same_cache()
        try:
            for name, value in prepared.items():
                self.group[name][start:stop] = value  # exactly one chunk: one call, no shared chunk
        except (KeyError, FileNotFoundError):  # an array vanished under us: say why, once
            self._check_same_cache()
            raise
        self._check_same_cache()
        for flags in parts:
            self.group[flags][block] = True  # its own chunk: flags of other writers are untouched

    def _check_block(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise CacheError(f"block {block} does not exist: cache {self.url} has blocks 0..{self.num_blocks - 1}")
        return int(block)

    def _prepare(self, name: str, value: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Check one array of a block (shape, dtype kind, finiteness, range) and cast it to the stored dtype."""
        spec = next(specs[name] for specs in self.parts.values() if name in specs)
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

    def clip(self, model: str | None) -> ClipLayout:
        """CLIP model `model`, or the cache's only one (None)."""
        if model is None and len(self.clips) == 1:
            return next(iter(self.clips.values()))
        if model not in self.clips:
            raise CacheError(f"cache {self.url} has no CLIP model {model!r}; it has {', '.join(self.clips)}")
        return self.clips[model]

    def put_text_embeddings(self, name: str, embeds: np.ndarray, attrs: dict, replace: bool = False,
                            model: str | None = None) -> None:
        """Prompt set `name` of CLIP model `model` (None: the only one): [M, C, D] float32 per-template text
        embeddings (eq. 2-3 need only these).

        Storing the same embeddings again is a no-op (a resumed build does it); other embeddings under an
        existing name are refused unless `replace`."""
        if not PROMPT_SET_NAME.fullmatch(name):
            raise CacheError(f"prompt set name {name!r} may use only letters, digits, '_', '-', and '.' between them")
        clip = self.clip(model)
        embeds = np.asarray(embeds, dtype=np.float32)
        c, d = self.layout.num_classes, clip.embed_dim
        if embeds.ndim != 3 or embeds.shape[1:] != (c, d):
            raise CacheError(f"prompt set {name}: text embeddings must be [M, {c}, {d}], got {list(embeds.shape)}")
        if not np.isfinite(embeds).all():
            raise CacheError(f"prompt set {name}: the text embeddings hold NaN/Inf; the text encoder output is broken")
        path = f"{clip.text_group}/{name}"
        self._check_same_cache()
        if self._text_written(path):
            if np.array_equal(self.group[path][:], embeds):
                return
            if not replace:
                raise CacheError(
                    f"prompt set {name!r} already exists in {self.url} with other embeddings; choose another --name"
                )
        # attributes go in with the array's metadata, and readers count a set only once its one chunk is
        # stored: a kill between creating and writing leaves an unwritten set the next run writes
        array = self.group.create_array(
            path, shape=embeds.shape, chunks=embeds.shape, dtype="float32", fill_value=np.nan,
            serializer=STORED_BYTES, compressors=COMPRESSORS, attributes=attrs, overwrite=True,
        )
        array[...] = embeds
        self._keep_consolidated()

    def _text_written(self, path: str) -> bool:
        """A prompt set array exists and its single chunk is stored."""
        if path not in self.group:
            return False
        array = self.group[path]
        return key_exists(self.group.store, chunk_key(array, (0,) * array.ndim))

    def update_manifest(self, **fields: object) -> None:
        """Merge top-level manifest keys (e.g. accuracy figures measured after the forward pass)."""
        self._check_same_cache()
        manifest = {**self.group.attrs[MANIFEST_KEY], **fields}
        self.group.attrs[MANIFEST_KEY] = manifest
        self.manifest = manifest
        self.clips = clip_layouts(manifest)
        self._keep_consolidated()

    def update_clip_record(self, model: str | None, **fields: object) -> None:
        """Merge keys into one CLIP model's manifest entry."""
        clip = self.clip(model)
        self._check_same_cache()
        manifest = self.group.attrs[MANIFEST_KEY]
        models = dict(manifest["clip_models"])
        models[clip.name] = {**models[clip.name], **fields}
        self.update_manifest(clip_models=models)

    def finalize(self, models: Iterable[str] | None = None) -> None:
        """Mark the cache (its teacher's part) complete once every block is flagged, and each of `models`
        once its own blocks are (None: every CLIP model whose blocks all are); consolidate metadata for
        readers. Idempotent."""
        self._check_same_cache()
        missing = len(self.pending_blocks())
        if missing:
            raise CacheError(f"cache {self.url} is missing {missing} of {self.num_blocks} blocks; cannot complete it")
        if models is None:
            models = [name for name, clip in self.clips.items() if not self.pending_blocks(flags=clip.written)]
        for model in models:
            clip = self.clip(model)
            missing = len(self.pending_blocks(flags=clip.written))
            if missing:
                raise CacheError(f"CLIP model {model} of cache {self.url} is missing {missing} of {self.num_blocks} "
                                 "blocks; cannot complete it")
            self.update_clip_record(model, status=STATUS_COMPLETE)
        self.update_manifest(status=STATUS_COMPLETE)

    def _keep_consolidated(self) -> None:
        """A complete cache carries consolidated metadata (remote readers open it with one request).
        Any metadata change drops it, so re-consolidate; while building there is nothing to keep."""
        if self.manifest["status"] != STATUS_COMPLETE:
            return
        with warnings.catch_warnings():  # zarr notes that consolidation is outside the v3 spec: we know
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(self.group.store)

