"""A dataset fingerprint: the same on every machine for the same samples, different for any other data."""

from __future__ import annotations

import hashlib

from richkd_cache.data._base import ImageDataset


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """sha256 over the count, then (label, identity) of every sample in canonical order.

    The root path is left out on purpose: a cache moves between machines with the data.
    """
    digest = hashlib.sha256(f"n={len(dataset)};".encode())
    for label, sample_id in zip(dataset.labels.tolist(), dataset.sample_ids()):
        digest.update(f"{label}:{sample_id};".encode())
    return digest.hexdigest()
