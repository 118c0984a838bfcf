"""A dataset fingerprint: the same on every machine for the same samples, different for any other data."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from richkd_cache.data._base import ImageDataset
from richkd_cache.files import atomic_path, file_sha256


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """sha256 over the count, then (label, identity) of every sample in canonical order.

    The root path is left out on purpose: a cache moves between machines with the data.
    """
    digest = hashlib.sha256(f"n={len(dataset)};".encode())
    for label, sample_id in zip(dataset.labels.tolist(), dataset.sample_ids()):
        digest.update(f"{label}:{sample_id};".encode())
    return digest.hexdigest()


def file_digests(folder: Path, files: list[str]) -> list[str]:
    """sha256 of each file's bytes (`files` relative to `folder`).

    Cost: the first time, every file is read once (about one epoch's reading, without decoding: ImageNet's
    train split is ~140 GB). The digests are remembered per user, keyed by size and modification time,
    so later calls on an unchanged tree only stat each file. A file rewritten with the same size and an
    unchanged modification time (a tool that restores timestamps) would keep its old digest.
    """
    memo_file = _memo_file(folder)
    memo = _read_memo(memo_file, folder)
    current: dict[str, list] = {}
    for name in files:
        stat = (folder / name).stat()
        key = [stat.st_size, stat.st_mtime_ns]
        known = memo.get(name)
        unchanged = isinstance(known, list) and len(known) == 3 and known[:2] == key
        current[name] = [*key, known[2] if unchanged else file_sha256(folder / name)]
    if current != memo:
        _write_memo(memo_file, folder, current)
    return [current[name][2] for name in files]


def _memo_file(folder: Path) -> Path:
    """$XDG_CACHE_HOME/richkd-cache/digests/<hash of the absolute folder>.json"""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return home / "richkd-cache" / "digests" / f"{key}.json"


def _read_memo(path: Path, folder: Path) -> dict[str, list]:
    """The remembered digests, or none when the file is missing, damaged or of another folder."""
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict) or memo.get("folder") != str(folder.resolve()):
        return {}
    files = memo.get("files")
    return files if isinstance(files, dict) else {}


def _write_memo(path: Path, folder: Path, files: dict[str, list]) -> None:
    """Best effort: a read-only home only costs the hashing again next time."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"folder": str(folder.resolve()), "files": files}))
    except OSError:
        pass
