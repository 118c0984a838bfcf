"""Which chunks a cache must hold, and reads that name the array and chunk of any damage.

zarr alone cannot tell a deleted chunk from one never written (both read as the fill value), nor, without
a checksum, a flipped bit in a stored-raw zstd block from real data. So: every array ends its codec
chain in crc32c (a bad chunk fails to decode), a chunk the written flags say exists must be in the
store's listing, and any failed read is narrowed down to the chunk that failed.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import zarr

from cache_store.errors import CacheError
from cache_store.schema import (
    CHECKSUM_CODEC,
    STORED_BYTE_ORDER,
    ArraySpec,
    CacheLayout,
    ClipLayout,
    bad_rows,
    check_array,
    describe_dtype,
    describe_samples,
)


def text_arrays(group: zarr.Group, clip: ClipLayout) -> list[str]:
    """The prompt set arrays stored under one CLIP model (written or not)."""
    return sorted(group[clip.text_group].array_keys()) if clip.text_group in group else []


def check_array_metadata(group: zarr.Group, layout: CacheLayout, clips: dict[str, ClipLayout],
                         arrays: dict[str, ArraySpec], url: str, keys: set[str] | None = None) -> None:
    """Every array of `arrays` (the layout's, or those of the models being checked) reads and matches
    it; the prompt sets of `clips` are float32 [M, C, D]. A writer checks this on its group opened without
    consolidation before its first write (consolidating over a broken array would fail after the root was
    rewritten); `keys`, when given, must hold each zarr.json (a consolidated group still lists a deleted
    array)."""
    text = {f"{clip.text_group}/{t}": clip for clip in clips.values() for t in text_arrays(group, clip)}
    for name in [*arrays, *text]:
        try:
            array = group[name]
        except KeyError:
            array = None
        except Exception as e:  # zarr's metadata parsers raise ValueError, TypeError, ... on damaged JSON
            raise CacheError(f"cache {url}: the metadata of array {name} ({name}/zarr.json) is damaged "
                             f"({type(e).__name__}); rebuild the cache") from None
        if array is None or (keys is not None and f"{name}/zarr.json" not in keys):
            raise CacheError(f"cache {url} lacks array {name}; the cache is damaged, rebuild it")
        if name in arrays:
            check_array(name, arrays[name], stored_dtype(array), array.shape, array.chunks, url)
            continue
        d = text[name].embed_dim
        if stored_dtype(array) != np.dtype(f"{STORED_BYTE_ORDER}f4") or array.ndim != 3 \
                or array.shape[1:] != (layout.num_classes, d) or array.chunks != array.shape:
            raise CacheError(f"cache {url}: prompt set {name} is {describe_dtype(stored_dtype(array))} {array.shape} "
                             f"in chunks of {array.chunks}, its manifest says float32 (M, {layout.num_classes}, {d}) "
                             "in one chunk")


def stored_dtype(array: zarr.Array) -> np.dtype:
    """The dtype as the chunks hold it, byte order included: zarr reports the native dtype whatever byte
    order its `bytes` codec declares, so a flipped `endian` would read every value byte-swapped."""
    dtype = np.dtype(array.dtype)
    for codec in array.metadata.codecs:
        config = codec.to_dict()
        if config.get("name") == "bytes":
            endian = (config.get("configuration") or {}).get("endian")
            return dtype.newbyteorder({"little": "<", "big": ">"}.get(endian, "="))
    return dtype


def has_checksum(array: zarr.Array) -> bool:
    """The array's chunks carry a crc32c (caches written before checksums have none)."""
    return any(codec.to_dict().get("name") == CHECKSUM_CODEC for codec in array.metadata.codecs)


def chunk_key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    """The store key of one chunk, e.g. `teacher/logits/c/3/0/0`."""
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def block_coords(array: zarr.Array, block: int) -> tuple[int, ...]:
    """Sample-axis arrays hold one write block per chunk: block b is chunk (b, 0, ..., 0)."""
    return (block,) + (0,) * (array.ndim - 1)


def chunk_rows(array: zarr.Array, coords: tuple[int, ...]) -> str:
    """What a chunk holds, for messages: its rows along the first axis."""
    start = coords[0] * array.chunks[0]
    return f"rows {start}..{min(start + array.chunks[0], array.shape[0]) - 1}"


def missing_chunks(group: zarr.Group, keys: set[str], arrays: dict[str, np.ndarray]) -> list[str]:
    """Every array's metadata must be stored, and for each array the chunk of every block in its entry
    (the blocks its flags say are written) in every sample-axis array and in the flags themselves: an
    absent one would read as NaN or -1 fill."""
    problems = []
    for name, blocks in arrays.items():
        if f"{name}/zarr.json" not in keys:
            problems.append(f"array {name} is missing (no {name}/zarr.json)")
            continue
        array = group[name]
        lost = [b for b in blocks if chunk_key(array, block_coords(array, int(b))) not in keys]
        if lost:
            first = block_coords(array, int(lost[0]))
            more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
            problems.append(f"array {name} chunk {array.metadata.encode_chunk_key(first)} "
                            f"({chunk_rows(array, first)}){more} is missing")
    return problems


def read_checked(array: zarr.Array, name: str, selection: Any, url: str, written: np.ndarray | None = None,
                 num_classes: int | None = None) -> np.ndarray:
    """array[selection]; a chunk that fails its checksum or does not decode is named in one line, and so
    are values no model or dataset produces (NaN/Inf, with `num_classes` a class index out of range) in
    the rows of written blocks (`written`: [num_blocks] bool flags; None: every row is written). A valid
    checksum only says the bytes are those written: a NaN written under it must not reach training."""
    try:
        values = array[selection]
    except Exception as error:  # zarr's codecs raise ValueError, RuntimeError, ... on damaged bytes
        coords = damaged_chunk(array, selection)
        if coords is None:
            raise
        raise CacheError(f"cache {url}: {damage(array, name, coords, error)}; "
                         "the cache is damaged: copy it again or rebuild it") from None
    check_values(array, name, values, first_row(array, selection), url, written, num_classes)
    return values


def first_row(array: zarr.Array, selection: Any) -> int:
    """The first-axis index of the first row `array[selection]` returns (a slice or (slice, ...) selection)."""
    rows = selection[0] if isinstance(selection, tuple) else selection
    return rows.indices(array.shape[0])[0] if isinstance(rows, slice) else 0


def check_values(array: zarr.Array, name: str, values: np.ndarray, start: int, url: str,
                 written: np.ndarray | None, num_classes: int | None) -> None:
    """Refuse rows of written blocks that hold what no model writes, chunk by chunk (the scan's temporary
    memory is one chunk's, and it stops at the first damaged chunk). `values` are rows start.. of `array`."""
    floating = np.issubdtype(values.dtype, np.floating)
    if values.ndim == 0 or not (floating or num_classes is not None):
        return
    step = array.chunks[0]
    for offset in range(0, len(values), step):
        rows = bad_rows(name, values[offset : offset + step], num_classes or 0) + start + offset
        if written is not None:
            rows = rows[written[rows // step]]  # unwritten blocks hold the fill value (NaN, -1) by design
        if rows.size:
            what = "non-finite values (NaN or Inf)" if floating else "class indices out of range"
            coords = block_coords(array, int(rows[0]) // step)
            raise CacheError(f"cache {url}: array {name} holds {what} in row(s) {describe_samples(rows)} "
                             f"(chunk {array.metadata.encode_chunk_key(coords)}, {chunk_rows(array, coords)})"
                             "; no model writes these, so the cache is damaged: rebuild it")


def damage(array: zarr.Array, name: str, coords: tuple[int, ...], error: Exception) -> str:
    what = "fails its checksum" if "checksum" in str(error).lower() else f"does not decode ({type(error).__name__})"
    return f"array {name} chunk {array.metadata.encode_chunk_key(coords)} ({chunk_rows(array, coords)}) {what}"


def chunk_error(array: zarr.Array, coords: tuple[int, ...]) -> Exception | None:
    """The error reading one chunk raises, None when it reads."""
    try:
        array.get_block_selection(coords)
        return None
    except Exception as error:
        return error


def damaged_chunk(array: zarr.Array, selection: Any) -> tuple[int, ...] | None:
    """The first chunk overlapping `selection` (slice(None) or a row slice) that does not read."""
    rows = selection if isinstance(selection, slice) else slice(None)
    start, stop, _ = rows.indices(array.shape[0])
    first, last = start // array.chunks[0], max(start, stop - 1) // array.chunks[0]
    other_axes = [range(-(-s // c)) for s, c in zip(array.shape[1:], array.chunks[1:])]
    for coords in itertools.product(range(first, last + 1), *other_axes):
        if chunk_error(array, coords) is not None:
            return coords
    return None
