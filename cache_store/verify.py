"""`verify`: everything that can be checked without the models (structure, dtypes, NaN/Inf, flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cache_store.errors import CacheError
from cache_store.reader import CacheReader, open_cache


@dataclass
class VerifyReport:
    url: str
    status: str = "unknown"
    blocks_written: int = 0
    blocks_total: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(url: str) -> VerifyReport:
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
    elif report.status != "complete":
        report.problems.append("every block is written but the build never completed (status building)")
    report.problems += _scan_blocks(reader, np.flatnonzero(written))
    if not reader.prompt_sets():
        report.problems.append("no prompt set stored: CLIP logits cannot be computed")
    return report


def _scan_blocks(reader: CacheReader, blocks: np.ndarray) -> list[str]:
    """Read block by block (one chunk per array) so memory stays bounded on large caches."""
    problems = []
    layout = reader.layout
    for name in layout.sample_arrays():
        array = reader.group[name]
        for b in blocks:
            start, stop = layout.block_range(int(b))
            rows = array[start:stop]
            if np.issubdtype(rows.dtype, np.floating):
                bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
                if bad.any():
                    problems.append(f"{name}: non-finite values in sample(s) {(np.flatnonzero(bad) + start)[:10].tolist()}")
            if name == "labels" and ((rows < 0) | (rows >= layout.num_classes)).any():
                problems.append(f"labels out of range 0..{layout.num_classes - 1} in rows {start}..{stop}")
    return problems
