"""Datasets with a canonical sample order (row i of a cache is sample i), plus batched transforms.

    ds = create_dataset("cifar100", "/data", "train")   # ArrayImageDataset, images (N, 32, 32, 3) uint8
    ds[i] -> {"image": uint8 (3, H, W), "label": int, "index": i}
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from richkd_cache.data._base import ArrayImageDataset, ImageDataset
from richkd_cache.data.cifar import load_cifar10, load_cifar100
from richkd_cache.data.digits import load_digits
from richkd_cache.data.fingerprint import dataset_fingerprint
from richkd_cache.data.imagefolder import ImageFolderDataset
from richkd_cache.data.transforms import normalize
from richkd_cache.errors import DataError

# name -> loader(root, split, **options); every dataset name lives here and only here
_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
    "imagefolder": ImageFolderDataset,
}
# CIFAR calls its held-out batch "test"; we call every held-out split "val" so caches and runs agree
_SPLIT_ALIASES = {"cifar10": {"test": "val"}, "cifar100": {"test": "val"}}
_SPLITS = ("train", "val")


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def create_dataset(name: str, root: str | None, split: str = "train", **kwargs) -> ImageDataset:
    """Open one split of a named dataset; kwargs are the dataset's own options (imagefolder: image_size, resize),
    None meaning the dataset's default."""
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, _DATASETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; valid: {', '.join(list_datasets())}")
    split = _SPLIT_ALIASES.get(name, {}).get(split, split)
    if split not in _SPLITS:
        valid = [*_SPLITS, *_SPLIT_ALIASES.get(name, {})]
        raise DataError(f"unknown split {split!r} for {name}; valid: {', '.join(valid)}")
    loader = _DATASETS[name]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # defaults live in the dataset alone
    options = [p for p in inspect.signature(loader).parameters if p not in ("root", "split")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise DataError(
            f"{name} does not take option(s) {', '.join(unknown)}; valid: {', '.join(options) or 'none'}"
        )
    return loader(root, split, **kwargs)


__all__ = [
    "ArrayImageDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "create_dataset",
    "dataset_fingerprint",
    "list_datasets",
    "normalize",
]
