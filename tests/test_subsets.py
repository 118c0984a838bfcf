"""Subsets of a split for the few-shot and long-tailed studies: exact counts, no rebuild."""

from __future__ import annotations

import numpy as np
import pytest

from richkd_cache.errors import ConfigError
from richkd_cache.subsets import long_tail_counts, subset_indices

LABELS = np.repeat(np.arange(10), 500)  # CIFAR-10-like: 500 per class


def test_long_tail_follows_the_formula() -> None:
    counts = long_tail_counts(10, 500, 0.01)
    assert counts[0] == 500 and counts[-1] == 5
    assert counts == [int(np.floor(500 * 0.01 ** (c / 9) + 1e-9)) for c in range(10)]
    assert counts[3] == 107  # 500 * 0.01^(3/9) = 107.7
    kept = subset_indices(LABELS, imbalance=0.01, seed=0)
    assert np.bincount(LABELS[kept]).tolist() == counts


def test_fraction_keeps_the_same_share_of_every_class() -> None:
    kept = subset_indices(LABELS, fraction=0.25, seed=1)
    assert np.bincount(LABELS[kept]).tolist() == [125] * 10
    assert len(np.unique(kept)) == len(kept) and np.array_equal(kept, np.sort(kept))
    assert not np.array_equal(kept, subset_indices(LABELS, fraction=0.25, seed=2))  # seeded draw
    assert np.array_equal(kept, subset_indices(LABELS, fraction=0.25, seed=1))


def test_both_and_none() -> None:
    assert np.array_equal(subset_indices(LABELS), np.arange(len(LABELS)))
    both = subset_indices(LABELS, fraction=0.5, imbalance=0.1)
    assert np.bincount(LABELS[both]).tolist() == [round(n * 0.5) for n in long_tail_counts(10, 500, 0.1)]


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"imbalance": 0.0}, {"imbalance": 2.0}])
def test_out_of_range_is_refused(kwargs) -> None:
    with pytest.raises(ConfigError):
        subset_indices(LABELS, **kwargs)
