"""The local copy stage two maps: made once from checked chunks, whole or not at all, shared by concurrent
runs, keyed by what produced the cache (a packed copy lands in the same folder), refused when it is not the
layout's."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from cache_store import CacheError, open_cache, pack_cache
from cache_store.local import LocalCopy

ARRAYS = ["teacher/logits", "clip/richkd-tiny/image_embeds"]


def test_the_copy_holds_the_caches_rows_in_their_stored_dtypes(digits_cache: Path, tmp_path: Path) -> None:
    reader = open_cache(str(digits_cache))
    copy = LocalCopy(reader, tmp_path)
    assert copy.ensure(ARRAYS) == ARRAYS and copy.ensure(ARRAYS) == []  # the second call copies nothing
    for name in ARRAYS:
        mapped = copy.open(name)
        stored = reader.load(name)
        assert isinstance(mapped, np.memmap) and mapped.dtype == stored.dtype and np.array_equal(mapped, stored)
    assert sorted(f.name for f in copy.folder.glob("*.npy")) == ["clip__richkd-tiny__image_embeds.npy",
                                                                 "teacher__logits.npy"]


def test_concurrent_runs_copy_each_array_once(digits_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """Two runs starting together (sweep jobs, DDP ranks): one copies under the lock, the other waits and
    reuses its files."""
    copies: list[str] = []
    original = LocalCopy._copy
    monkeypatch.setattr(LocalCopy, "_copy", lambda self, name, progress: copies.append(name) or original(self, name, progress))
    reader = open_cache(str(digits_cache))
    threads = [threading.Thread(target=LocalCopy(reader, tmp_path).ensure, args=(ARRAYS,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(copies) == sorted(ARRAYS)


def test_an_interrupted_copy_leaves_no_file_and_is_made_again(digits_cache: Path, tmp_path: Path, monkeypatch) -> None:
    reader = open_cache(str(digits_cache))
    original = reader.load_rows
    calls = []

    def failing(name: str, start: int, stop: int) -> np.ndarray:
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the second block
        return original(name, start, stop)

    monkeypatch.setattr(reader, "load_rows", failing)
    copy = LocalCopy(reader, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        copy.ensure(["teacher/logits"])
    assert not copy.present("teacher/logits") and not list(copy.folder.glob("*.tmp"))
    monkeypatch.setattr(reader, "load_rows", original)
    assert copy.ensure(["teacher/logits"]) == ["teacher/logits"]
    assert np.array_equal(copy.open("teacher/logits"), reader.load("teacher/logits"))


def test_a_packed_cache_shares_the_folder_of_the_same_cache(digits_cache: Path, tmp_path: Path) -> None:
    packed = tmp_path / "digits.zip"
    pack_cache(str(digits_cache), str(packed))
    assert LocalCopy(open_cache(str(packed)), tmp_path).folder == LocalCopy(open_cache(str(digits_cache)), tmp_path).folder


def test_a_copy_that_is_not_the_layouts_is_refused_in_one_line(digits_cache: Path, tmp_path: Path) -> None:
    copy = LocalCopy(open_cache(str(digits_cache)), tmp_path)
    copy.folder.mkdir(parents=True)
    np.save(copy.path("teacher/logits"), np.zeros((3, 1, 10), dtype=np.float16))  # another shape
    with pytest.raises(CacheError, match="delete .* and run again"):
        copy.open("teacher/logits")
    copy.path("teacher/logits").write_bytes(b"not a numpy file")
    with pytest.raises(CacheError, match="unreadable"):
        copy.open("teacher/logits")
