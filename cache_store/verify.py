"""`verify`: everything that can be checked without the models.

The manifest against its schema; every array's own metadata (not only the consolidated copy) against the
layout; every chunk the written flags promise is stored; every stored chunk of every array read once
(its crc32c checked, NaN/Inf and class indices out of range found); prompt sets written and finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cache_store._store import open_group_read
from cache_store.errors import CacheError
from cache_store.integrity import block_coords, check_array_metadata, chunk_error, chunk_key, damage
from cache_store.reader import CacheReader, open_cache
from cache_store.schema import CACHE_KEY, STATUS_COMPLETE, bad_rows, describe_samples, flags_of

NO_CHECKSUMS = "none (written before richkd-cache checksummed chunks: a flipped bit in stored data goes unnoticed)"


@dataclass
class VerifyReport:
    """What `verify` found; callers that can run the models append their own problems."""

    url: str
    status: str = "unknown"
    blocks_written: int = 0
    blocks_total: int = 0
    checksums: str = "unknown"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(url: str) -> VerifyReport:
    """Every check that needs no model; problems are collected, not raised, so one run lists them all."""
    report = VerifyReport(url)
    try:
        reader = open_cache(url, require_complete=False, check_chunks=False)
        written = reader.written_mask()
    except CacheError as e:
        report.problems.append(str(e))
        return report
    report.status = reader.manifest["status"]
    report.blocks_written, report.blocks_total = int(written.sum()), int(written.size)
    report.checksums = checksum_summary(reader)
    report.problems += own_metadata_problems(url, reader)
    if not written.all():
        report.problems.append(f"{written.size - written.sum()} of {written.size} blocks not written: incomplete build")
    elif report.status != STATUS_COMPLETE:
        report.problems.append("every block is written but the build never completed (status building)")
    report.problems += _clip_model_problems(reader)
    report.problems += reader.missing()
    report.problems += _scan_blocks(reader)
    report.problems += _scan_prompt_sets(reader)
    report.problems += _zip_entries(reader)
    return report


def _zip_entries(reader: CacheReader) -> list[str]:
    """A packed cache holds the cache's own keys and nothing else (pack copies only those): an entry
    outside it (`../x`, an absolute path) or any other file is reported. Nothing is ever extracted, but
    such a zip was not made by `pack`, and "no stray files" holds for zips as for directories' packs."""
    if not reader.url.endswith(".zip"):
        return []
    stray = sorted(k for k in reader.keys if not CACHE_KEY.fullmatch(k))
    outside = [k for k in stray if k.startswith(("/", "\\")) or ".." in k.replace("\\", "/").split("/")]
    problems = []
    for entries, what in ((outside, "entries that point outside the cache"),
                          ([k for k in stray if k not in outside], "files that are not part of the cache")):
        if entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            problems.append(f"the packed cache holds {what} ({shown}): `pack` writes none; pack the cache again")
    return problems


def _clip_model_problems(reader: CacheReader) -> list[str]:
    """A CLIP model still being added (its own flags) is reported, with how far it got."""
    problems = []
    for name, clip in reader.clips.items():
        if reader.clip_complete(name):
            continue
        if f"{clip.written}/zarr.json" not in reader.keys:
            problems.append(f"CLIP model {name} is incomplete (its arrays were never created): re-run the build "
                            "that adds it; the other models are usable")
            continue
        written = reader.written_mask(name)
        state = (f"{written.size - written.sum()} of {written.size} blocks not written" if not written.all()
                 else "every block is written but it was never completed")
        problems.append(f"CLIP model {name} is incomplete ({state}): re-run the build that adds it; "
                        "the other models are usable")
    return problems


def checksum_summary(reader: CacheReader) -> str:
    unchecked = reader.without_checksums()
    if not unchecked:
        return "crc32c on every chunk"
    if len(unchecked) == len(reader.all_array_names()):
        return NO_CHECKSUMS
    return f"crc32c, except on {', '.join(unchecked)}"


def own_metadata_problems(url: str, reader: CacheReader) -> list[str]:
    """Readers use the consolidated copy; writers and plain zarr read each array's own zarr.json."""
    if reader.manifest["status"] != STATUS_COMPLETE:
        return []  # nothing consolidated yet: the reader already read every array's own metadata
    try:
        check_array_metadata(open_group_read(url, consolidated=False), reader.layout, reader.clips,
                             reader.present_arrays(), url)
    except CacheError as e:
        return [f"{e} (the consolidated copy readers use is intact)"]
    return []


def _scan_blocks(reader: CacheReader) -> list[str]:
    """Read block by block (one chunk per array) so memory stays bounded on large caches; a chunk that
    does not read (checksum, truncation) is named, and the scan goes on. Each array is read on the blocks
    its own flags say are written."""
    problems = []
    layout = reader.layout
    flags = {name: np.flatnonzero(reader._read(name, slice(None)))
             for name in {flags_of(n, reader.clips) for n in reader.present_arrays()}
             if f"{name}/zarr.json" in reader.keys}
    for name in reader.present_arrays():
        array = reader.group[name]
        is_flags = name in flags
        chunks = range(layout.num_blocks) if is_flags else flags.get(flags_of(name, reader.clips), [])
        bad, damaged = [], []
        for b in chunks:
            coords = block_coords(array, int(b))
            if not is_flags and chunk_key(array, coords) not in reader.keys:
                continue  # reader.missing() names it; its fill values are not the cache's
            try:
                rows = array.get_block_selection(coords)  # one chunk: its crc32c is checked here
            except Exception as error:  # a codec's error on damaged bytes
                damaged.append(damage(array, name, coords, error))
                continue
            if not is_flags:
                bad.append(bad_rows(name, rows, layout.num_classes) + layout.block_range(int(b))[0])
        problems += damaged
        bad_samples = np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)
        if bad_samples.size:
            what = "non-finite values" if np.issubdtype(array.dtype, np.floating) else "class index out of range"
            problems.append(f"{name}: {what} in sample(s) {describe_samples(bad_samples)}")
    return problems


def _scan_prompt_sets(reader: CacheReader) -> list[str]:
    problems = []
    for model, clip in reader.clips.items():
        whose = f" of CLIP model {model}" if len(reader.clips) > 1 else ""
        stored = reader.prompt_sets(model)
        for name in reader.unwritten_prompt_sets(model):
            problems.append(f"prompt set {name}{whose} was created but never written (an interrupted build or "
                            "`prompts add`): run the same command again")
        for name in stored:
            path = f"{clip.text_group}/{name}"
            array = reader.group[path]
            error = chunk_error(array, (0,) * array.ndim)
            if error is not None:
                problems.append(damage(array, path, (0,) * array.ndim, error))
            elif not np.isfinite(array[...]).all():
                problems.append(f"prompt set {name}{whose}: non-finite text embeddings")
        if not stored and reader.clip_complete(model):  # being added: reported above
            problems.append(f"no prompt set stored{whose}: CLIP logits cannot be computed")
    return problems
