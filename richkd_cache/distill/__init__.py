"""Fusion (eq. 4, 7) and distillation losses (eq. 5, 8, 9), as pure functions of cached tensors."""

from richkd_cache.distill.feature_losses import FEATURE_LOSSES, CRDLoss, create_feature_loss, list_feature_losses
from richkd_cache.distill.fusion import (
    FEATURE_PARTS,
    TARGETS,
    JointSpace,
    build_targets,
    fit_joint_space,
    fuse_logits,
    logits_from_topk,
    topk_kl,
    topk_log_probs,
)
from richkd_cache.distill.logit_losses import (
    DEFAULTS,
    LOGIT_LOSSES,
    describe_params,
    get_logit_loss,
    list_logit_losses,
    method_params,
    uses_strong_view,
)
from richkd_cache.distill.objective import DistillObjective, create_objective

__all__ = [
    "CRDLoss",
    "DEFAULTS",
    "FEATURE_LOSSES",
    "FEATURE_PARTS",
    "LOGIT_LOSSES",
    "TARGETS",
    "DistillObjective",
    "JointSpace",
    "build_targets",
    "create_feature_loss",
    "create_objective",
    "describe_params",
    "fit_joint_space",
    "fuse_logits",
    "get_logit_loss",
    "list_feature_losses",
    "list_logit_losses",
    "logits_from_topk",
    "method_params",
    "topk_kl",
    "topk_log_probs",
    "uses_strong_view",
]
