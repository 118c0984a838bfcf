"""Reading a cache: read-only, whole arrays at a time (random rows straight from zarr are slow).

A cache holds the teacher's arrays and one or more CLIP models'. The teacher's part
is complete when the manifest's status is; each CLIP model has its own status and flags, so a model being
added to a complete cache is reported incomplete while the others train as before.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import zarr

from cache_store._store import open_group_read, stored_keys
from cache_store.errors import CacheError
from cache_store.integrity import (
    check_array_metadata,
    chunk_key,
    has_checksum,
    missing_chunks,
    read_checked,
    text_arrays,
)
from cache_store.schema import (
    MANIFEST_KEY,
    STATUS_BUILDING,
    STATUS_COMPLETE,
    ArraySpec,
    ClipLayout,
    cache_arrays,
    clip_layouts,
    clip_records,
    flags_of,
    is_clean_row,
    is_strong,
    model_of,
    read_layout,
    validate_manifest,
)

ENSEMBLE = "ensemble"  # --clip-model ensemble: every complete CLIP model of the cache
JOIN = "+"  # --clip-model A+B: these models


def open_cache(url: str, require_complete: bool = True, check_chunks: bool = True) -> "CacheReader":
    """Open and check a cache: the manifest against its schema, every array's dtype and shape against its
    layout, and (unless `check_chunks` is off, for `verify`, which reports rather than raises) that every
    chunk its written flags promise is stored. Damaged chunks are found when they are read."""
    group = open_group_read(url)
    manifest = group.attrs.get(MANIFEST_KEY)
    validate_manifest(manifest, url)
    reader = CacheReader(url, group, dict(manifest), stored_keys(group.store))
    reader.check_arrays()
    if require_complete and manifest["status"] != STATUS_COMPLETE:
        written = reader.written_mask()
        raise CacheError(
            f"cache {url} is incomplete (status {manifest['status']}, {int(written.sum())} of {written.size} "
            "blocks written): re-run the same build command to resume"
        )
    if check_chunks:
        problems = reader.missing()
        if problems:
            more = f" (and {len(problems) - 1} more problems: run `richkd-cache verify`)" if len(problems) > 1 else ""
            raise CacheError(f"cache {url}: {problems[0]}{more}; the cache is damaged: copy it again or rebuild it")
    return reader


class CacheReader:
    """A checked cache opened read-only; get one from `open_cache`. Nothing it does writes to the store."""

    def __init__(self, url: str, group: zarr.Group, manifest: dict, keys: set[str]) -> None:
        self.url = url
        self.group = group
        self.manifest = manifest
        self.layout = read_layout(manifest)
        self.clips: dict[str, ClipLayout] = clip_layouts(manifest)  # every CLIP model, by name
        self.clip_records: dict[str, dict] = clip_records(manifest)  # their manifest entries, with `status`
        self.keys = keys  # every key stored when the cache was opened
        self._flags: dict[str, np.ndarray] = {}  # flags arrays read, by name (the reader never writes)

    # ------------------------------------------------------------ structure

    def arrays(self) -> dict[str, ArraySpec]:
        """Every fixed-shape array: the teacher's part and every CLIP model's, flags included."""
        return cache_arrays(self.layout, self.clips)

    def present_arrays(self) -> dict[str, ArraySpec]:
        """The arrays that must be there: a CLIP model still being added may not have created its own."""
        building = {n for n in self.clips if not self.clip_complete(n)}
        return {name: spec for name, spec in self.arrays().items()
                if f"{name}/zarr.json" in self.keys or self._owner(name) not in building}

    def _owner(self, name: str) -> str | None:
        """The CLIP model whose own arrays `name` is one of (None: the teacher's part)."""
        return next((n for n, c in self.clips.items() if name in c.arrays(self.layout)), None)

    def check_arrays(self) -> None:
        """Every array of the layout is there with its dtype and shape; prompt sets are float32 [M, C, D]."""
        absent = [name for name in self.arrays() if f"{name}/zarr.json" not in self.keys]
        if absent and self.manifest["status"] == STATUS_BUILDING:  # killed while creating them: resumable
            raise CacheError(f"cache {self.url} is incomplete (its build stopped before creating {', '.join(absent)}): "
                             "re-run the same build command to resume")
        check_array_metadata(self.group, self.layout, self.clips, self.present_arrays(), self.url, self.keys)

    # ------------------------------------------------------------ CLIP models

    def clip_complete(self, name: str) -> bool:
        return self.clip_records[name]["status"] == STATUS_COMPLETE

    def complete_clip_models(self) -> list[str]:
        return [name for name in self.clips if self.clip_complete(name)]

    def select_clip(self, choice: str | None) -> list[str]:
        """The CLIP models a run uses: `choice` names one, several joined by '+', or `ensemble` (every
        complete one); None means the cache's only complete model and is refused, listing them, when it
        has several (which one trains changes results, so it is never guessed)."""
        complete = self.complete_clip_models()
        if choice is None or choice == ENSEMBLE:
            if not complete:
                raise CacheError(f"cache {self.url} holds no complete CLIP model "
                                 f"({self._describe_incomplete()}): re-run the build that adds one")
            if choice is None and len(complete) > 1:
                raise CacheError(f"cache {self.url} holds several CLIP models ({', '.join(complete)}): choose with "
                                 f"--clip-model NAME, several joined by '{JOIN}', or {ENSEMBLE}")
            return complete
        names = choice.split(JOIN)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated or "" in names:
            raise CacheError(f"--clip-model {choice!r} names {', '.join(repeated) or 'an empty model'} "
                             f"{'more than once' if repeated else ''}".rstrip())
        for name in names:
            self.check_clip_usable(name)
        return names

    def check_clip_usable(self, name: str) -> None:
        if name not in self.clips:
            raise CacheError(f"cache {self.url} has no CLIP model {name!r}; it has {', '.join(self.clips)}"
                             + (f" (or {ENSEMBLE})" if len(self.complete_clip_models()) > 1 else ""))
        if not self.clip_complete(name):
            raise CacheError(f"CLIP model {name} of cache {self.url} is incomplete ({self._describe_incomplete(name)}): "
                             "re-run the build command that adds it to resume")

    def _describe_incomplete(self, only: str | None = None) -> str:
        parts = []
        for name in [only] if only else self.clips:
            if f"{self.clips[name].written}/zarr.json" not in self.keys:
                parts.append(f"{name}: arrays not created yet")
                continue
            written = self.written_mask(name)
            parts.append(f"{name}: {int(written.sum())} of {written.size} blocks written")
        return ", ".join(parts)

    def only_clip(self, model: str | None) -> ClipLayout:
        """The CLIP model a prompt-set call means: `model`, or the cache's only one."""
        if model is None:
            if len(self.clips) > 1:
                raise CacheError(f"cache {self.url} holds several CLIP models ({', '.join(self.clips)}): name one")
            model = next(iter(self.clips))
        if model not in self.clips:
            raise CacheError(f"cache {self.url} has no CLIP model {model!r}; it has {', '.join(self.clips)}")
        return self.clips[model]

    # ------------------------------------------------------------ prompt sets

    def prompt_sets(self, model: str | None = None) -> list[str]:
        """The stored prompt sets of `model`, or (None) those every complete CLIP model stores: an array
        whose single chunk was never written (a build or `prompts add` stopped between creating and
        writing it) is not one; `verify` lists it."""
        if model is not None:
            clip = self.only_clip(model)
            return [name for name in self.prompt_set_arrays(model) if self._set_written(clip, name)]
        return self.prompt_sets_of(self.complete_clip_models() or list(self.clips)[:1])

    def prompt_sets_of(self, models: list[str]) -> list[str]:
        """The prompt sets every one of `models` stores, in the first model's order."""
        if not models:
            return []
        sets = [self.prompt_sets(m) for m in models]
        return [name for name in sets[0] if all(name in other for other in sets[1:])]

    def prompt_set_arrays(self, model: str | None = None) -> list[str]:
        return text_arrays(self.group, self.only_clip(model))

    def unwritten_prompt_sets(self, model: str | None = None) -> list[str]:
        """Prompt set arrays created but never written (their metadata is stored, their chunk is not)."""
        group = self.only_clip(model).text_group
        below = [k[len(group) + 1 :].split("/") for k in self.keys if k.startswith(f"{group}/")]
        created = {parts[0] for parts in below if parts[1:] == ["zarr.json"]}
        written = {parts[0] for parts in below if parts[1:2] == ["c"]}
        return sorted(created - written)

    def _set_written(self, clip: ClipLayout, name: str) -> bool:
        array = self.group[f"{clip.text_group}/{name}"]
        return chunk_key(array, (0,) * array.ndim) in self.keys

    def text_embeddings(self, name: str, model: str | None = None) -> np.ndarray:
        """[M, C, D] float32 text embeddings of a stored prompt set of `model` (None: the only model)."""
        clip = self.only_clip(model)
        if name not in self.prompt_sets(clip.name):
            stored = ", ".join(self.prompt_sets(clip.name)) or "none"
            whose = f" for CLIP model {clip.name}" if len(self.clips) > 1 else ""
            raise CacheError(f"prompt set {name!r} is not in cache {self.url}{whose}; stored: {stored}"
                             " (add one with `richkd-cache prompts add`)")
        return self._read(f"{clip.text_group}/{name}", slice(None))

    def prompt_set_attrs(self, name: str, model: str | None = None) -> dict:
        return dict(self.group[f"{self.only_clip(model).text_group}/{name}"].attrs)

    # ------------------------------------------------------------ blocks and checks

    def written_mask(self, model: str | None = None) -> np.ndarray:
        """[num_blocks] bool: block b's rows are stored (fill values elsewhere), for the teacher's part or
        for CLIP model `model`."""
        return self._read("written" if model is None else self.clips[model].written, slice(None))

    def _required_blocks(self, flags: str, complete: bool) -> np.ndarray:
        if complete:
            return np.arange(self.layout.num_blocks)  # every flag, and so every chunk, must be there
        if f"{flags}/zarr.json" not in self.keys:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(self._read(flags, slice(None)))

    def missing(self) -> list[str]:
        """Arrays and chunks the manifest and written flags say exist but the store lacks."""
        blocks = {"written": self._required_blocks("written", self.manifest["status"] == STATUS_COMPLETE)}
        for name, clip in self.clips.items():
            blocks[clip.written] = self._required_blocks(clip.written, self.clip_complete(name))
        return missing_chunks(self.group, self.keys, {name: blocks[flags_of(name, self.clips)]
                                                      for name in self.present_arrays()})

    def without_checksums(self) -> list[str]:
        """Arrays whose chunks carry no crc32c (written before richkd-cache checksummed chunks)."""
        return [name for name in self.all_array_names() if not has_checksum(self.group[name])]

    def all_array_names(self) -> list[str]:
        """Every array there is: the fixed ones and every prompt set array, written or not."""
        texts = [f"{c.text_group}/{p}" for c in self.clips.values() for p in text_arrays(self.group, c)]
        return list(self.present_arrays()) + texts

    # ------------------------------------------------------------ reading

    def _read(self, name: str, selection: slice | tuple) -> np.ndarray:
        """Chunks checked (crc32c) as they decode, and every row of a written block checked for values no
        model writes (NaN/Inf, class indices out of range), so no reader trains on or exports them."""
        return read_checked(self.group[name], name, selection, self.url, self._written_blocks(name),
                            self.layout.num_classes)

    def _written_blocks(self, name: str) -> np.ndarray | None:
        """[num_blocks] bool: the blocks of sample-axis array `name` that hold data (the others hold the fill
        value); None when every row does (a complete part, a prompt set, a flags array)."""
        spec = self.arrays().get(name)
        flags = flags_of(name, self.clips)
        if spec is None or spec.dtype == "bool" or self._flags_complete(flags):
            return None
        if flags not in self._flags:
            self._flags[flags] = read_checked(self.group[flags], flags, slice(None), self.url)
        return self._flags[flags]

    def _flags_complete(self, flags: str) -> bool:
        """The part flagged by `flags` (the teacher's, or a CLIP model's own) is complete: every block is written."""
        if flags == "written":
            return self.manifest["status"] == STATUS_COMPLETE
        return all(self.clip_complete(n) for n, c in self.clips.items() if c.written == flags)

    def load(self, name: str) -> np.ndarray:
        """One whole array (the fast way: zarr reads each chunk once)."""
        texts = {f"{c.text_group}/{p}" for n, c in self.clips.items() for p in self.prompt_sets(n)}
        if name not in self.present_arrays() and name not in texts:
            raise CacheError(f"cache {self.url} has no array {name!r}; it has {', '.join(self.present_arrays())}")
        return self._read(name, slice(None))

    def load_many(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        return {name: self.load(name) for name in names}

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Sample rows start..stop of one array; whole chunks when the range is one or more write blocks."""
        if name not in self.group:
            raise CacheError(f"cache {self.url} has no array {name}")
        return self._read(name, slice(start, stop))

    def load_view(self, name: str, view: int) -> np.ndarray:
        """(N, X): view `view` of every sample of one (N, V, X) array, read chunk by chunk."""
        spec = self.arrays().get(name)
        if spec is None or len(spec.shape) != 3:
            raise CacheError(f"cache {self.url} has no per-view array {name!r}")
        return self._read(name, (slice(None), view))

    def array_info(self) -> list[dict]:
        texts = [f"{c.text_group}/{p}" for n, c in self.clips.items() for p in self.prompt_sets(n)]
        info = []
        for name in list(self.present_arrays()) + texts:
            array = self.group[name]
            info.append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape),
                         "chunks": list(array.chunks), "stored_bytes": int(array.nbytes_stored())})
        return info

    def bytes_per_sample_view(self) -> dict[str, dict]:
        """Per model (the teacher, each CLIP model by name): its rows (N x its view count) and the bytes one
        row takes, as written (fp16 values, uncompressed) and as stored (compressed) on average.
        `views/params` and `labels` are not counted."""
        stored = {a["name"]: a["stored_bytes"] for a in self.array_info()}
        teacher = [s for n, s in self.layout.sample_arrays().items() if model_of(n) == "teacher"]
        parts = {"teacher": [s for s in teacher if not is_strong(s.name) and not is_clean_row(s.name)]}
        if self.layout.strong_views:  # "strong": the teacher's rows on the strong views
            parts["strong"] = [s for s in teacher if is_strong(s.name)]
        for name, clip in self.clips.items():
            parts[name] = list(clip.sample_arrays(self.layout).values())
        out = {}
        for model, specs in parts.items():
            rows = self.layout.num_samples * specs[0].shape[1]
            raw = sum(np.dtype(s.dtype).itemsize * s.shape[2] for s in specs)
            out[model] = {"rows": rows, "bytes_per_row": raw,
                          "stored_bytes_per_row": sum(stored.get(s.name, 0) for s in specs) / max(rows, 1)}
        return out
