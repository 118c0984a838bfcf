"""Optimisers and learning-rate schedules by name, for `setup_optimizer` in train.py.

- `sgd` + `step`: mdistiller's CIFAR recipe (SGD momentum 0.9, weight decay on every weight, lr x0.1
  at the milestones).
- `adamw` + `cosine` with a warm-up: LG's recipe for ViT students (lkhl/tiny-transformers,
  pycls/core/optimizer.py): AdamW betas (0.9, 0.999), no weight decay on biases, norm weights,
  class tokens and position embeddings; timm's CosineLRScheduler stepped per epoch, warming up
  linearly from lr x WARMUP_FACTOR (0.001 in its configs) and then following the cosine from lr to
  min_lr over all the epochs (timm's default: the warm-up is not a prefix of the cosine).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from richkd_cache.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
WARMUP_FACTOR = 1e-3  # LG's OPTIM.WARMUP_FACTOR in every ViT config
NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token")  # LG's skip_list (pycls/core/optimizer.py)


def make_optimizer(kind: str, modules: Iterable[torch.nn.Module], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """All parameters of `modules` (the student and the loss's own maps) under one optimiser."""
    if kind not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {kind!r}; valid: {', '.join(OPTIMIZERS)}")
    named = [(name, p) for m in modules for name, p in m.named_parameters()]
    # one multi-tensor update instead of kernels per parameter: fused on CUDA, foreach elsewhere
    cuda = all(p.is_cuda for _, p in named)
    multi = {"foreach": not cuda, "fused": cuda}
    if kind == "sgd":
        return torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=weight_decay, **multi)
    decays = {id(p): p.ndim >= 2 and not any(k in name for k in NO_DECAY_NAMES) for name, p in named}
    groups = [{"params": [p for _, p in named if decays[id(p)]], "weight_decay": weight_decay},
              {"params": [p for _, p in named if not decays[id(p)]], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), **multi)


def make_schedule(optimizer: torch.optim.Optimizer, kind: str, epochs: int, milestones: tuple[int, ...],
                  lr_decay: float, warmup_epochs: int, min_lr: float) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch schedule (train.py steps it after each epoch)."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    if warmup_epochs < 0 or (warmup_epochs and warmup_epochs >= epochs):
        raise ConfigError(f"warmup_epochs must be in [0, epochs), got {warmup_epochs} for {epochs} epochs")
    if kind == "step":
        if warmup_epochs:
            raise ConfigError("warmup_epochs goes with schedule = \"cosine\" (the step schedule has no warm-up)")
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=lr_decay)
    base = optimizer.param_groups[0]["lr"]
    if not 0.0 <= min_lr <= base:
        raise ConfigError(f"min_lr must be in [0, lr], got {min_lr} with lr {base}")

    def factor(epoch: int) -> float:  # lr(epoch) / lr; a plain function, so resume.pth stores no code
        return cosine_factor(epoch, epochs, warmup_epochs, min_lr / base if base else 0.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_factor(epoch: int, epochs: int, warmup_epochs: int, floor: float) -> float:
    """timm's CosineLRScheduler (t_initial = epochs, warmup_t, warmup_lr_init = lr x WARMUP_FACTOR),
    as a multiple of lr: linear from WARMUP_FACTOR to 1 over the warm-up, then the cosine at `epoch`."""
    if epoch < warmup_epochs:
        return WARMUP_FACTOR + epoch * (1.0 - WARMUP_FACTOR) / warmup_epochs
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * epoch / epochs))
