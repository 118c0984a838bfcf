"""How close `train`'s memory check comes to what the run then holds.

Trains one epoch from CACHE in this process, with the check's estimate of the run's private memory (the
process's RssAnon + RssShmem when it is checked, plus `training_bytes` and the cached path's growth) captured
as the check runs, and the process's peak private memory polled every 10 ms. Prints one JSON line.

    python benchmarks/memory_check.py CACHE --student resnet8 --feature-loss crd --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import pipelines.memory as memory
from pipelines.config import TrainConfig
from pipelines.progress import Reporter
from pipelines.train import run_train


def private_now() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return sum(int(line.split()[1]) * 1024 for line in status if line.startswith(("RssAnon:", "RssShmem:")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--feature-loss", default="crd", help="crd, cosine, mse or none")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    seen: dict[str, int] = {}
    check = memory.check_run_memory

    def spy(needs, limits, lighter):  # the check as train runs it, its figures kept
        seen.update(estimate=limits.private + needs.private, mapped=needs.mapped)
        return check(needs, limits, lighter)

    memory.check_run_memory = spy
    peak = [0]

    def poll() -> None:
        while True:
            peak[0] = max(peak[0], private_now())
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(student=args.student, out=out, cache=args.cache, epochs=1, batch_size=args.batch_size,
                          device="cpu", workers=0, quiet=True, overwrite=True,
                          feature_loss=None if args.feature_loss == "none" else args.feature_loss)
        run_train(cfg, Reporter(quiet=True))
    print(json.dumps({"student": args.student, "feature_loss": args.feature_loss, "batch": args.batch_size, **seen,
                      "peak": peak[0], "estimate_over_peak": round(seen["estimate"] / peak[0], 3)}))


if __name__ == "__main__":
    main()
