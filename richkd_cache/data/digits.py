"""The bundled quickstart dataset: scikit-learn's handwritten digits as 32x32 RGB, CIFAR-shaped.

Real data that ships inside scikit-learn (1,797 8x8 grayscale images), so the quickstart and the tests
need no network. Every code path (in-memory images, batched augmentation, cache rows) is CIFAR's.
"""

from __future__ import annotations

import numpy as np

from richkd_cache.data._base import ArrayImageDataset

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# measured over all 1,797 upsampled images (the same value on every channel: grey digits)
DIGITS_MEAN, DIGITS_STD = (0.3053,) * 3, (0.3759,) * 3
VAL_EVERY = 5  # every 5th sample of each class is validation (a fixed, stratified 20 %)


def load_digits(root: str | None, split: str) -> ArrayImageDataset:
    """`root` is ignored: the data ships inside scikit-learn. Both splits keep sklearn's order."""
    from sklearn.datasets import load_digits as sklearn_digits  # here: importing sklearn takes ~1 s

    bunch = sklearn_digits()
    small = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    big = small.repeat(4, axis=1).repeat(4, axis=2)  # nearest upsample to (N, 32, 32)
    images = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=3))  # (N, 32, 32, 3)
    labels = bunch.target.astype(np.int64)
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each sample within its class
    for c in range(10):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    is_val = rank % VAL_EVERY == VAL_EVERY - 1
    keep = is_val if split == "val" else ~is_val
    return ArrayImageDataset("digits", split, "", images[keep], labels[keep], CLASSES, DIGITS_MEAN, DIGITS_STD)
