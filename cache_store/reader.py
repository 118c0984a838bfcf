"""Reading a cache: read-only, whole arrays at a time (random rows straight from zarr are slow)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import zarr

from cache_store._store import open_group_read, stored_keys
from cache_store.errors import CacheError
from cache_store.integrity import check_array_metadata, chunk_key, has_checksum, missing_chunks, read_checked
from cache_store.schema import (
    MANIFEST_KEY,
    STATUS_BUILDING,
    STATUS_COMPLETE,
    TEXT_GROUP,
    CacheLayout,
    is_strong,
    model_of,
    validate_manifest,
)


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
        self.layout = CacheLayout(**manifest["layout"])
        self.keys = keys  # every key stored when the cache was opened

    def check_arrays(self) -> None:
        """Every array of the layout is there with its dtype and shape; prompt sets are float32 [M, C, D]."""
        absent = [name for name in self.layout.arrays() if f"{name}/zarr.json" not in self.keys]
        if absent and self.manifest["status"] == STATUS_BUILDING:  # killed while creating them: resumable
            raise CacheError(f"cache {self.url} is incomplete (its build stopped before creating {', '.join(absent)}): "
                             "re-run the same build command to resume")
        check_array_metadata(self.group, self.layout, self.url, self.keys)

    def prompt_sets(self) -> list[str]:
        """The stored prompt sets: an array whose single chunk was never written (a build or `prompts add`
        stopped between creating and writing it) is not one; `verify` lists it."""
        return [name for name in self.prompt_set_arrays() if self._set_written(name)]

    def prompt_set_arrays(self) -> list[str]:
        if TEXT_GROUP not in self.group:
            return []
        return sorted(self.group[TEXT_GROUP].array_keys())

    def unwritten_prompt_sets(self) -> list[str]:
        """Prompt set arrays created but never written (their metadata is stored, their chunk is not)."""
        below = [k[len(TEXT_GROUP) + 1 :].split("/") for k in self.keys if k.startswith(f"{TEXT_GROUP}/")]
        created = {parts[0] for parts in below if parts[1:] == ["zarr.json"]}
        written = {parts[0] for parts in below if parts[1:2] == ["c"]}
        return sorted(created - written)

    def _set_written(self, name: str) -> bool:
        array = self.group[f"{TEXT_GROUP}/{name}"]
        return chunk_key(array, (0,) * array.ndim) in self.keys

    def missing(self) -> list[str]:
        """Arrays and chunks the manifest and written flags say exist but the store lacks."""
        if self.manifest["status"] == STATUS_COMPLETE:
            blocks = np.arange(self.layout.num_blocks)  # every flag, and so every chunk, must be there
        else:
            blocks = np.flatnonzero(self.written_mask())
        return missing_chunks(self.group, self.keys, self.layout, blocks)

    def without_checksums(self) -> list[str]:
        """Arrays whose chunks carry no crc32c (written before richkd-cache checksummed chunks)."""
        names = list(self.layout.arrays()) + [f"{TEXT_GROUP}/{p}" for p in self.prompt_set_arrays()]
        return [name for name in names if not has_checksum(self.group[name])]

    def _read(self, name: str, selection: slice | tuple) -> np.ndarray:
        return read_checked(self.group[name], name, selection, self.url)

    def load(self, name: str) -> np.ndarray:
        """One whole array (the fast way: zarr reads each chunk once)."""
        if name not in self.layout.arrays() and name.removeprefix(f"{TEXT_GROUP}/") not in self.prompt_sets():
            raise CacheError(f"cache {self.url} has no array {name!r}; it has {', '.join(self.layout.arrays())}")
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
        if name not in self.layout.sample_arrays() or len(self.layout.sample_arrays()[name].shape) != 3:
            raise CacheError(f"cache {self.url} has no per-view array {name!r}")
        return self._read(name, (slice(None), view))

    def text_embeddings(self, name: str) -> np.ndarray:
        """[M, C, D] float32 text embeddings of a stored prompt set."""
        if name not in self.prompt_sets():
            raise CacheError(
                f"prompt set {name!r} is not in cache {self.url}; stored: {', '.join(self.prompt_sets()) or 'none'}"
                " (add one with `richkd-cache prompts add`)"
            )
        return self._read(f"{TEXT_GROUP}/{name}", slice(None))

    def prompt_set_attrs(self, name: str) -> dict:
        return dict(self.group[f"{TEXT_GROUP}/{name}"].attrs)

    def written_mask(self) -> np.ndarray:
        """[num_blocks] bool: block b's rows are stored (fill values elsewhere)."""
        return self._read("written", slice(None))

    def array_info(self) -> list[dict]:
        names = list(self.layout.arrays()) + [f"{TEXT_GROUP}/{p}" for p in self.prompt_sets()]
        info = []
        for name in names:
            array = self.group[name]
            info.append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape),
                         "chunks": list(array.chunks), "stored_bytes": int(array.nbytes_stored())})
        return info

    def bytes_per_sample_view(self) -> dict[str, dict]:
        """Per model: its rows (N x its view count) and the bytes one row takes, as written (fp16 values,
        uncompressed) and as stored (compressed) on average. `views/params` and `labels` are not counted."""
        specs = self.layout.sample_arrays()
        stored = {a["name"]: a["stored_bytes"] for a in self.array_info()}
        out = {}
        groups = {"teacher": "teacher", "clip": "clip", **({"strong": "teacher"} if self.layout.strong_views else {})}
        for model, owner in groups.items():  # "strong": the teacher's rows on the strong views
            names = [n for n in specs if model_of(n) == owner and is_strong(n) == (model == "strong")]
            rows = self.layout.num_samples * specs[names[0]].shape[1]
            raw = sum(np.dtype(specs[n].dtype).itemsize * specs[n].shape[2] for n in names)
            out[model] = {"rows": rows, "bytes_per_row": raw,
                          "stored_bytes_per_row": sum(stored[n] for n in names) / max(rows, 1)}
        return out
