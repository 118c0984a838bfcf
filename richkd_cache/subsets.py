"""Training on part of a split without rebuilding its cache: the rows stay keyed by sample index.

- `fraction`: the few-shot study, the same share of every class (stratified, seeded).
- `imbalance`: the long-tailed protocol of the supplement, n_c = n_max * rho^(c / (C - 1)) for class c,
  rho the ratio of the rarest class to the most common one. The supplement's own Table 14 lists counts
  that do not follow this formula; the formula is what is implemented, and the counts it gives are
  exact (floor of the expression, at least one sample per class).
"""

from __future__ import annotations

import math

import numpy as np

from richkd_cache.errors import ConfigError


def long_tail_counts(num_classes: int, n_max: int, rho: float) -> list[int]:
    """n_c = floor(n_max * rho^(c / (C - 1))) for c = 0 .. C-1, at least 1."""
    if num_classes == 1:
        return [n_max]
    return [max(1, math.floor(n_max * rho ** (c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def subset_indices(labels: np.ndarray, fraction: float = 1.0, imbalance: float = 1.0, seed: int = 0) -> np.ndarray:
    """Sorted sample indices to train on; the identity when fraction = imbalance = 1."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fraction must be in (0, 1], not {fraction}")
    if not 0 < imbalance <= 1:
        raise ConfigError(f"--imbalance (the rarest class's share of the most common) must be in (0, 1], not {imbalance}")
    if fraction == 1 and imbalance == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    n_max = max(len(v) for v in per_class.values())
    tail = long_tail_counts(len(classes), n_max, imbalance)
    keep = []
    for rank, c in enumerate(classes):
        members = per_class[c]
        n = min(len(members), tail[rank]) if imbalance < 1 else len(members)
        n = max(1, round(n * fraction))
        keep.append(members[:n])
    return np.sort(np.concatenate(keep))
