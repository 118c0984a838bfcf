"""The local copy: a cache's arrays uncompressed in plain `.npy` files that stage two memory-maps.

Random rows straight from compressed Zarr chunks cost ~50 ms per batch, and float32 targets for every
(sample, view) row cost several times the cache in memory. Stage two instead reads each chunk once, into
one `.npy` file per array (the stored dtype and shape, C order), and maps it: every run, seed, sweep job
and DDP rank on the machine then shares one copy of the rows through the page cache, and a batch gathers
its rows by index.

Where: `$RICHKD_CACHE_LOCAL`, else `$XDG_CACHE_HOME/richkd-cache/local`, else `~/.cache/richkd-cache/local`;
one folder per cache identity (the sha256 of its manifest, which names exactly what produced every row),
holding only the arrays runs have asked for. Files are written under a lock, to a temporary name, from
checksummed chunks, and renamed when complete: a file that is there is whole. Small statistics computed
from the rows (`.npz`, plain arrays, no pickles) are kept beside them. Deleting a folder (or the whole
root) is always safe: the next run makes it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cache_store.errors import CacheError
from cache_store.reader import CacheReader

LOCAL_ENV = "RICHKD_CACHE_LOCAL"


def local_root() -> Path:
    """The folder local copies live in (see the module doc)."""
    if os.environ.get(LOCAL_ENV):
        return Path(os.environ[LOCAL_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "richkd-cache" / "local"


def cache_identity(reader: CacheReader) -> str:
    """What the rows of a complete cache depend on: its manifest (dataset fingerprint, checkpoints, CLIP
    weights, views, layout). Two caches with one manifest hold the same rows (builds are deterministic)."""
    text = json.dumps(reader.manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _file_name(array: str) -> str:
    return array.replace("/", "__") + ".npy"


class LocalCopy:
    """One cache's local copy: `ensure` makes the files of the arrays a run reads, `open` maps them."""

    def __init__(self, reader: CacheReader, root: Path | None = None) -> None:
        self.reader = reader
        self.folder = (root or local_root()) / cache_identity(reader)

    def path(self, array: str) -> Path:
        return self.folder / _file_name(array)

    def present(self, array: str) -> bool:
        return self.path(array).is_file()

    def nbytes(self, array: str) -> int:
        """Uncompressed bytes of one array (what its file and its mapping take)."""
        spec = self.reader.arrays()[array]
        return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize

    def missing_bytes(self, arrays: list[str]) -> int:
        return sum(self.nbytes(a) for a in arrays if not self.present(a))

    def ensure(self, arrays: list[str], progress=None) -> list[str]:
        """Write the files of `arrays` that are not there yet; returns the names written (none on a
        re-run). `progress(rows)` is called as sample rows are copied. Checksums (and finiteness) of every
        chunk are checked as it is read, by the reader."""
        todo = [a for a in arrays if not self.present(a)]
        if not todo:
            return []
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        with self._lock():
            for array in todo:
                if self.present(array):  # another process made it while this one waited for the lock
                    continue
                self._copy(array, progress)
                written.append(array)
        return written

    def _copy(self, array: str, progress) -> None:
        spec = self.reader.arrays()[array]
        layout = self.reader.layout
        tmp = self.path(array).with_suffix(".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(spec.dtype), shape=spec.shape)
        try:
            for block in range(layout.num_blocks):
                start, stop = layout.block_range(block)
                out[start:stop] = self.reader.load_rows(array, start, stop)
                if progress is not None:
                    progress(stop - start)
            out.flush()
        except BaseException:
            del out
            tmp.unlink(missing_ok=True)
            raise
        del out
        os.replace(tmp, self.path(array))

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer per copy across processes (sweep jobs, DDP ranks); the others wait, then reuse."""
        with open(self.folder / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def open(self, array: str) -> np.ndarray:
        """The array's rows, memory-mapped read-only; a file whose header disagrees with the cache's layout
        (another version, a hand edit) is refused in one line."""
        spec = self.reader.arrays()[array]
        try:
            mapped = np.load(self.path(array), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CacheError(f"local copy {self.path(array)} is unreadable ({error}): delete {self.folder} "
                             "and run again") from None
        if mapped.dtype != np.dtype(spec.dtype) or mapped.shape != tuple(spec.shape):
            raise CacheError(f"local copy {self.path(array)} holds {mapped.dtype} {mapped.shape}, not the cache's "
                             f"{spec.dtype} {tuple(spec.shape)}: delete {self.folder} and run again")
        return mapped

    # ------------------------------------------------------------ statistics kept beside the rows

    def stats_path(self, key: str) -> Path:
        return self.folder / f"stats-{key}.npz"

    def load_stats(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.stats_path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError):
            return None  # damaged: computed again and rewritten

    def save_stats(self, key: str, values: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.stats_path(key).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **values)
        os.replace(tmp, self.stats_path(key))


def disk_free(folder: Path) -> int:
    """Free bytes on the file system that holds (or will hold) `folder`."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free
