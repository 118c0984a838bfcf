"""The dataset interface every stage shares: canonical order, class names, dict samples."""

from __future__ import annotations

import abc
import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataset(Dataset, abc.ABC):
    """Row i of a cache is sample i of this dataset, in its canonical order.

    `__getitem__` returns {"image": uint8 (3, H, W), "label": int, "index": int}.
    """

    name: str
    split: str
    root: str
    classes: list[str]
    labels: np.ndarray  # (N,) int64
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def options(self) -> dict:
        """The options it was opened with that change its pixels (imagefolder: image_size, resize); stage one
        records them so stage two, `verify` and `evaluate` reopen the same images."""
        return {}

    @property
    def image_side(self) -> int:
        """The side of its (square) images: view parameters are fractions of it, models are built for it.
        Subclasses know it without decoding an image (stage two decodes each image once per draw)."""
        return int(self[0]["image"].shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    def whole(self, i: int) -> torch.Tensor:
        """Image i whole, (3, H, W) uint8: what whole-image views (random-resized crops) are cut from."""
        return self[i]["image"]

    def clean(self, image: torch.Tensor) -> torch.Tensor:
        """The clean view of a whole image (the image itself, unless the dataset resizes and crops it)."""
        return image

    @abc.abstractmethod
    def __getitem__(self, i: int) -> dict: ...

    @abc.abstractmethod
    def sample_ids(self) -> list[str]:
        """Identities for the fingerprint: what makes sample i the same sample on another machine."""


class ArrayImageDataset(ImageDataset):
    """Data that fits in memory as one uint8 array (N, H, W, 3): CIFAR and the bundled digits.

    Stage two moves `images` to the device once and augments whole batches there.
    """

    def __init__(self, name: str, split: str, root: str, images: np.ndarray, labels: np.ndarray,
                 classes: list[str], mean: tuple, std: tuple) -> None:
        self.name, self.split, self.root = name, split, root
        self.images = images  # (N, H, W, 3) uint8, HWC as CIFAR's pickles give after reshape
        self.labels = labels.astype(np.int64)
        self.classes = list(classes)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def image_side(self) -> int:
        return int(self.images.shape[2])

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))
        return {"image": image, "label": int(self.labels[i]), "index": int(i)}

    def sample_ids(self) -> list[str]:
        """sha1 of each image's bytes: the pixels are the identity, wherever the files live."""
        return [hashlib.sha1(img.tobytes()).hexdigest() for img in self.images]
