"""The whole loss of eq. 9 as one module: CE + beta * L_logit + gamma * L_feat, as named terms.

The logit side carries the chosen method's own weights (logit_losses.DEFAULTS): its CE weight, and its
loss weight (beta = 3 is KD's; DKD and RLD weigh their two terms inside the loss).

The trainer sums the terms and logs each. Parameters of this module are the feature loss's maps
(trained with the student; for CRD also its embeddings of the cached teacher and CLIP features), and its
state_dict holds everything a resumed run needs (CRD's banks, normalisers and draw generator); nothing
here touches a teacher or CLIP model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.distill.feature_losses import create_feature_loss
from richkd_cache.distill.fusion import FEATURE_PARTS, TARGETS
from richkd_cache.distill.logit_losses import OBJECTIVE_WEIGHTS, get_logit_loss, method_params, uses_strong_view
from richkd_cache.errors import ConfigError


class DistillObjective(nn.Module):
    def __init__(self, target: str, logit_loss: str | None, feature_loss: nn.Module | None, *,
                 gamma: float, logit_params: dict[str, float] | None) -> None:
        super().__init__()
        self.target, self.logit_loss_name = target, logit_loss
        self.logit_loss = get_logit_loss(logit_loss) if logit_loss else None
        self.feature_loss = feature_loss
        self.gamma = gamma
        self.logit_params = dict(logit_params or {})  # resolved: every parameter of the method
        # the batch must carry a strong view of each image, the student's logits and the targets on it (MLKD)
        self.strong_view = self.logit_loss is not None and uses_strong_view(logit_loss)

    def step_bytes(self, batch: int) -> int:
        """Working memory a step of the losses needs beyond the student's (CRD's negatives; 0 for the others)."""
        step_bytes = getattr(self.feature_loss, "step_bytes", None)
        return step_bytes(batch) if step_bytes is not None else 0

    def forward(self, student_logits: torch.Tensor, student_feats: torch.Tensor, labels: torch.Tensor, *,
                target_logits: torch.Tensor | None = None, target_feats: dict[str, torch.Tensor] | None = None,
                index: torch.Tensor | None = None, epoch: int = 0, strong_logits: torch.Tensor | None = None,
                strong_target_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """epoch counts from 0; warm-ups (DKD, RLD) see it from 1, as in their reference trainers.

        target_feats: the target's feature parts, {"teacher": (B, Ft), "clip": (B, Fc)} (FEATURE_PARTS).
        strong_logits, strong_target_logits: the student's logits and the targets (B, C) on the strong view,
        given when `strong_view` is set; the cross-entropy then covers both views (MLKD's loss_ce, KD_ours.py).
        """
        params = self.logit_params
        views = [student_logits] if strong_logits is None else [student_logits, strong_logits]
        terms = {"ce": params.get("ce_weight", 1.0) * sum(F.cross_entropy(z, labels) for z in views)}  # eq. 9
        if self.logit_loss is not None:
            if target_logits is None:
                raise ConfigError(f"logit loss {self.logit_loss_name} needs target logits")
            own = {k: v for k, v in params.items() if k not in OBJECTIVE_WEIGHTS}
            if self.strong_view:
                if strong_logits is None or strong_target_logits is None:
                    raise ConfigError(f"logit loss {self.logit_loss_name} also trains on a strong view of each image, "
                                      "which this batch lacks")
                own.update(student_strong=strong_logits, target_strong=strong_target_logits)
            loss = self.logit_loss(student_logits, target_logits, labels, epoch=epoch + 1, **own)
            weight = params.get("weight", 1.0)  # eq. 9: beta for KD
            if isinstance(loss, dict):  # named terms (MLKD's instance, class and batch levels), each weighted
                terms.update({f"logit_{name}": weight * value for name, value in loss.items()})
            else:
                terms["logit"] = weight * loss
        if self.feature_loss is not None:
            if not target_feats:
                raise ConfigError("the feature loss needs target features")
            terms["feat"] = self.gamma * self.feature_loss(student_feats, target_feats, index)  # eq. 9
        return terms


def create_objective(target: str, logit_loss: str | None, feature_loss: str | None, *, student_dim: int,
                     teacher_dim: int | None = None, clip_dim: int | None = None, lam: float = 0.7,
                     labels: torch.Tensor | None = None, trained: torch.Tensor | None = None, seed: int = 0,
                     gamma: float = 0.8, logit_params: dict[str, float] | None = None) -> DistillObjective:
    """`logit_params` replace the logit loss's reference values by name (see logit_losses.method_params).

    The feature loss sees the target's parts (FEATURE_PARTS): teacher_dim and clip_dim are their widths.
    CRD also needs `labels` (N,) and the sample indices `trained` (its bank and negatives), `lam` to fuse
    after embedding (eq. 7) and `seed` for its own draws.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if target == "ce":
        logit_loss = feature_loss = None
    params = method_params(logit_loss, logit_params) if logit_loss else None
    feature = None
    if feature_loss:
        dims = {"teacher": teacher_dim, "clip": clip_dim}
        missing = [name for name in FEATURE_PARTS[target] if not dims[name]]
        if missing:
            raise ConfigError(f"feature loss {feature_loss} needs {' and '.join(missing)} features, which target "
                              f"{target} lacks")
        kept = {f"{name}_dim": dims[name] if name in FEATURE_PARTS[target] else None for name in dims}
        feature = create_feature_loss(feature_loss, student_dim, **kept, labels=labels, trained=trained, lam=lam,
                                      seed=seed)
    return DistillObjective(target, logit_loss, feature, gamma=gamma, logit_params=params)
