"""CIFAR-10 and CIFAR-100 from their standard python-pickle files (no download: bring the files)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from richkd_cache.data._base import ArrayImageDataset
from richkd_cache.errors import DataError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_LAYOUT = {
    # name: (folder, train files, val files, meta file, label key, class-name key, pretty name)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names", "CIFAR-10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names",
                 "CIFAR-100"),
}


def load_cifar(name: str, root: str | None, split: str) -> ArrayImageDataset:
    folder, train_files, val_files, meta_file, label_key, names_key, pretty = _LAYOUT[name]
    base = _find_folder(root, folder, [*train_files, *val_files, meta_file], pretty)
    files = train_files if split == "train" else val_files
    images, labels = [], []
    for f in files:
        batch = _unpickle(base / f, pretty)
        # (N, 3072) uint8, channel-major per row -> (N, 32, 32, 3)
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    classes = [c.decode() if isinstance(c, bytes) else c for c in _unpickle(base / meta_file, pretty)[names_key]]
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return ArrayImageDataset(name, split, str(root), np.ascontiguousarray(np.concatenate(images)),
                             np.concatenate(labels), classes, mean, std)


def _find_folder(root: str | None, folder: str, files: list[str], pretty: str) -> Path:
    """Accept ROOT containing FOLDER (torchvision's layout) or ROOT being FOLDER itself."""
    if root is None:
        raise DataError(f"{pretty} needs --data-root: the folder holding {folder}/")
    for base in (Path(root) / folder, Path(root)):
        if all((base / f).is_file() for f in files):
            return base
    raise DataError(
        f"{pretty} not found under {root}: expected {Path(root) / folder}/{{{','.join(files)}}} "
        "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html); pass --data-root"
    )


def _unpickle(path: Path, pretty: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated download, wrong file: one line, not a traceback
        raise DataError(f"cannot read {pretty} file {path}: {e.__class__.__name__}: {e}") from None
