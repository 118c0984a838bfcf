"""Stage two's targets for chosen (sample, view) rows, as a training step gets them: the cache's local
copy mapped, the rows gathered, `fuse_batch` on them."""

from __future__ import annotations

import numpy as np
import torch

from cache_store import open_cache
from pipelines.config import TrainConfig
from pipelines.progress import Reporter
from pipelines.targets import Draws, StageTwoTargets, setup_targets


class Batches:
    """A run's targets source over a cache, and its labels."""

    def __init__(self, cfg: TrainConfig, pool: torch.Tensor | None = None) -> None:
        cache = open_cache(cfg.cache)
        self.labels = torch.from_numpy(cache.load("labels").astype(np.int64))
        pool = torch.arange(len(self.labels)) if pool is None else pool
        cpu = torch.device("cpu")
        self.source: StageTwoTargets = setup_targets(cfg, cache, self.labels.numpy(), pool, cpu, cpu,
                                                     Reporter(quiet=True))

    def __call__(self, samples, views=None, strong=None):
        """(logits (B, C), feature parts {name: (B, F)}, strong logits (B, C) or None) of samples (B,) at
        their views (B,) (None: the only one) and strong views."""
        index = torch.as_tensor(samples, dtype=torch.long)
        draws = Draws(index, None if views is None else torch.as_tensor(views, dtype=torch.long),
                      None if strong is None else torch.as_tensor(strong, dtype=torch.long))
        rows, strong_rows = self.source.gather(draws)
        rows.pop("views/params", None)
        labels = self.labels[index]
        logits, parts = self.source.targets(rows, None, None, labels)
        strong_logits = self.source.strong_targets(strong_rows, labels) if strong_rows else None
        return logits, parts, strong_logits
