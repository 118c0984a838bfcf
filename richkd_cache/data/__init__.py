"""Datasets with a canonical sample order (row i of a cache is sample i), plus batched transforms."""

from __future__ import annotations

import difflib

from richkd_cache.data._base import ArrayImageDataset, ImageDataset
from richkd_cache.data.fingerprint import dataset_fingerprint
from richkd_cache.data.transforms import normalize, random_crop_flip
from richkd_cache.errors import DataError

_DATASETS = ("cifar10", "cifar100", "digits", "imagefolder")
_SPLITS = {"train": "train", "val": "val", "test": "val"}


def list_datasets() -> list[str]:
    return list(_DATASETS)


def create_dataset(name: str, root: str | None, split: str = "train", **kwargs) -> ImageDataset:
    """Open a split of a named dataset; "test" is accepted for CIFAR's test batch, which is our "val"."""
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; valid: {', '.join(_DATASETS)}")
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; valid: train, val")
    split = _SPLITS[split]
    if name in ("cifar10", "cifar100"):
        from richkd_cache.data.cifar import load_cifar

        return load_cifar(name, root, split)
    if name == "digits":
        from richkd_cache.data.digits import load_digits

        return load_digits(split)
    from richkd_cache.data.imagefolder import ImageFolderDataset

    return ImageFolderDataset(root, split, **kwargs)


__all__ = [
    "ArrayImageDataset",
    "ImageDataset",
    "create_dataset",
    "dataset_fingerprint",
    "list_datasets",
    "normalize",
    "random_crop_flip",
]
