"""`verify`: everything that can be checked without the models (structure, dtypes, NaN/Inf, flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cache_store.errors import CacheError
from cache_store.reader import CacheReader, open_cache
from cache_store.schema import STATUS_COMPLETE, bad_rows, describe_samples


@dataclass
class VerifyReport:
    """What `verify` found; callers that can run the models append their own problems."""

    url: str
    status: str = "unknown"
    blocks_written: int = 0
    blocks_total: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(url: str) -> VerifyReport:
    """Every check that needs no model; problems are collected, not raised, so one run lists them all."""
    report = VerifyReport(url)
    try:
        reader = open_cache(url, require_complete=False)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    written = reader.written_mask()
    report.status = reader.manifest["status"]
    report.blocks_written, report.blocks_total = int(written.sum()), int(written.size)
    if not written.all():
        report.problems.append(f"{written.size - written.sum()} of {written.size} blocks not written: incomplete build")
    elif report.status != STATUS_COMPLETE:
        report.problems.append("every block is written but the build never completed (status building)")
    report.problems += _scan_blocks(reader, np.flatnonzero(written))
    if not reader.prompt_sets():
        report.problems.append("no prompt set stored: CLIP logits cannot be computed")
    for name in reader.prompt_sets():
        if not np.isfinite(reader.text_embeddings(name)).all():
            report.problems.append(f"prompt set {name}: non-finite text embeddings")
    return report


def _scan_blocks(reader: CacheReader, blocks: np.ndarray) -> list[str]:
    """Read block by block (one chunk per array) so memory stays bounded on large caches."""
    problems = []
    layout = reader.layout
    for name in layout.sample_arrays():
        array = reader.group[name]
        bad = []
        for b in blocks:
            start, stop = layout.block_range(int(b))
            bad.append(bad_rows(name, array[start:stop], layout.num_classes) + start)
        bad_samples = np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)
        if bad_samples.size:
            what = "non-finite values" if np.issubdtype(array.dtype, np.floating) else "class index out of range"
            problems.append(f"{name}: {what} in sample(s) {describe_samples(bad_samples)}")
    return problems
