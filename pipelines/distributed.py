"""torch.distributed for the stages: launched by `torchrun`, a plain process otherwise.

Stage one splits the pending write blocks into contiguous ranges, one per rank (never the strided
indices of DistributedSampler: interleaved writers would share chunks). Rank 0 creates the cache and
finalises it; everything it decides is broadcast, so every rank acts on the same facts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun describes in the environment (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: str, ctx: DistContext) -> str:
    """Each rank drives its own GPU: cuda -> cuda:LOCAL_RANK."""
    if ctx.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return device


def broadcast(value: Any, ctx: DistContext) -> Any:
    """Rank 0's value on every rank (any picklable object)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def contiguous_share(items: list, ctx: DistContext) -> list:
    """This rank's contiguous slice of `items` (sizes differ by at most one)."""
    n, k = len(items), ctx.world_size
    start = ctx.rank * n // k
    return items[start : (ctx.rank + 1) * n // k]


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
