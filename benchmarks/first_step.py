"""Stage two's set-up before its first step, on a first run (the local copy is made from the cache's chunks,
the statistics computed) and on a re-run (the copy and statistics reused). RichKD (L+F) with cosine
features and --alpha per-class, so every streaming statistic is computed. Prints one JSON line.

    python benchmarks/first_step.py CACHE
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from cache_store import open_cache
from pipelines.config import TrainConfig
from pipelines.progress import Reporter
from pipelines.targets import setup_targets


def set_up(url: str) -> float:
    """Seconds from opening the cache to a run's targets being ready (what precedes the first step)."""
    start = time.perf_counter()
    cache = open_cache(url)
    labels = cache.load("labels")
    cfg = TrainConfig(student="resnet8", out="-", cache=url, feature_loss="cosine", alpha="per-class")
    cpu = torch.device("cpu")
    setup_targets(cfg, cache, labels, torch.arange(len(labels)), cpu, cpu, Reporter(quiet=True))
    return time.perf_counter() - start


def main() -> None:
    url = sys.argv[1]
    with tempfile.TemporaryDirectory() as root:
        os.environ["RICHKD_CACHE_LOCAL"] = root
        first, rerun = set_up(url), set_up(url)
        copied = sum(f.stat().st_size for f in Path(root).rglob("*.npy"))
    print(json.dumps({"first_run_s": round(first, 3), "rerun_s": round(rerun, 3), "local_copy_bytes": copied,
                      "copy_mb_per_s": round(copied / first / 1e6, 1)}))


if __name__ == "__main__":
    main()
