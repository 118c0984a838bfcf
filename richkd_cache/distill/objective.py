"""The whole loss of eq. 9 as one module: CE + beta * L_logit + gamma * L_feat, as named terms.

The trainer sums the terms and logs each. Parameters of this module are the student-side maps of the
feature loss (trained with the student); nothing here touches a teacher or CLIP model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.distill.feature_losses import create_feature_loss
from richkd_cache.distill.fusion import TARGETS
from richkd_cache.distill.logit_losses import DEFAULTS, get_logit_loss
from richkd_cache.errors import ConfigError


class DistillObjective(nn.Module):
    def __init__(self, target: str, logit_loss: str | None, feature_loss: nn.Module | None, *,
                 beta: float, gamma: float, logit_hyper: dict) -> None:
        super().__init__()
        self.target, self.logit_loss_name = target, logit_loss
        self.logit_loss = get_logit_loss(logit_loss) if logit_loss else None
        self.feature_loss = feature_loss
        self.beta, self.gamma, self.logit_hyper = beta, gamma, logit_hyper

    def forward(self, student_logits: torch.Tensor, student_feats: torch.Tensor, labels: torch.Tensor, *,
                target_logits: torch.Tensor | None = None, target_feats: torch.Tensor | None = None,
                index: torch.Tensor | None = None, epoch: int = 0) -> dict[str, torch.Tensor]:
        """epoch counts from 0; warm-ups (DKD, RLD) see it from 1, as in their reference trainers."""
        terms = {"ce": F.cross_entropy(student_logits, labels)}
        if self.logit_loss is not None:
            if target_logits is None:
                raise ConfigError(f"logit loss {self.logit_loss_name} needs target logits")
            loss = self.logit_loss(student_logits, target_logits, labels, epoch=epoch + 1, **self.logit_hyper)
            terms["logit"] = self.beta * loss  # eq. 9
        if self.feature_loss is not None:
            if target_feats is None:
                raise ConfigError("the feature loss needs target features")
            terms["feat"] = self.gamma * self.feature_loss(student_feats, target_feats, index)  # eq. 9
        return terms


def create_objective(target: str, logit_loss: str | None, feature_loss: str | None, *, student_dim: int,
                     target_dim: int | None, num_samples: int | None, beta: float = 3.0, gamma: float = 0.8,
                     temperature: float = 3.0, logit_hyper: dict | None = None) -> DistillObjective:
    """`temperature` is KD's T (eq. 5); other logit losses use their own defaults unless `logit_hyper`."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if target == "ce":
        logit_loss = feature_loss = None
    hyper = dict(DEFAULTS.get(logit_loss, {})) if logit_loss else {}
    if logit_loss == "kd":
        hyper["temperature"] = temperature
    hyper.update(logit_hyper or {})
    feature = None
    if feature_loss:
        if target_dim is None:
            raise ConfigError(f"feature loss {feature_loss} needs target features, which target {target} lacks")
        feature = create_feature_loss(feature_loss, student_dim, target_dim, num_samples)
    return DistillObjective(target, logit_loss, feature, beta=beta, gamma=gamma, logit_hyper=hyper)
