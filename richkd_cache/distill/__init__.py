"""Fusion (eq. 4, 7) and distillation losses (eq. 5, 8, 9), as pure functions of cached tensors."""

from richkd_cache.distill.feature_losses import FEATURE_LOSSES, create_feature_loss, list_feature_losses
from richkd_cache.distill.fusion import (
    TARGETS,
    FeatureMap,
    build_targets,
    fit_feature_map,
    fuse_features,
    fuse_logits,
    logits_from_topk,
    topk_kl,
    topk_log_probs,
)
from richkd_cache.distill.logit_losses import DEFAULTS, LOGIT_LOSSES, get_logit_loss, list_logit_losses
from richkd_cache.distill.objective import DistillObjective, create_objective

__all__ = [
    "DEFAULTS",
    "FEATURE_LOSSES",
    "LOGIT_LOSSES",
    "TARGETS",
    "DistillObjective",
    "FeatureMap",
    "build_targets",
    "create_feature_loss",
    "create_objective",
    "fit_feature_map",
    "fuse_features",
    "fuse_logits",
    "get_logit_loss",
    "list_feature_losses",
    "list_logit_losses",
    "logits_from_topk",
    "topk_kl",
    "topk_log_probs",
]
