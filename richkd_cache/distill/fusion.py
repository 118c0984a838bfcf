"""Fused targets: eq. 4 for logits, eq. 7 for features, computed from cached tensors only.

Feature fusion needs CLIP's feature (Fc wide) in the teacher's feature space (Ft wide). That map is
NOT learned with the student: if the target side were trained jointly, an MSE or cosine loss to it
could be driven to zero by collapsing the target (both maps -> 0, or to a constant direction). Instead
the CLIP -> teacher map is fitted once, in closed form, by ridge regression of f_T on f_C over the
cached training rows. It is fixed during training, so f_F (eq. 7) is a fixed target per sample; only
the student's projector (Fs -> Ft, in feature_losses.py) is learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from richkd_cache.errors import ConfigError, DataError

TARGETS = ("ce", "kd", "clip", "richkd")


@dataclass(frozen=True)
class FeatureMap:
    """f_C (.., Fc) -> f_C @ weight + bias (.., Ft); weight (Fc, Ft), bias (Ft,), float32."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, clip_feats: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(clip_feats.device), self.bias.to(clip_feats.device)
        return clip_feats.float() @ w + b


def fuse_logits(teacher_logits: torch.Tensor, clip_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """eq. 4: z_F = alpha z_T + (1 - alpha) z_C, on (.., C)."""
    return alpha * teacher_logits + (1.0 - alpha) * clip_logits


def fit_feature_map(clip_feats: torch.Tensor, teacher_feats: torch.Tensor, ridge: float = 1e-3) -> FeatureMap:
    """Least squares f_T ~ f_C W + b over N cached rows, (N, Fc) and (N, Ft); solved in float64.

    The ridge is relative (scaled by the mean eigenvalue of the centred Gram matrix) so the fit does
    not depend on the features' overall scale.
    """
    if clip_feats.ndim != 2 or teacher_feats.ndim != 2 or len(clip_feats) != len(teacher_feats):
        raise DataError(
            f"the feature map needs (N, Fc) CLIP and (N, Ft) teacher features of the same rows, got "
            f"{tuple(clip_feats.shape)} and {tuple(teacher_feats.shape)}; rebuild the cache"
        )
    x = clip_feats.double()
    y = teacher_feats.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc  # (Fc, Fc)
    scale = torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    weight = torch.linalg.solve(gram + ridge * scale.clamp_min(1e-12) * eye, xc.T @ yc)  # (Fc, Ft)
    bias = y_mean - x_mean @ weight
    return FeatureMap(weight.float(), bias.float())


def fuse_features(teacher_feats: torch.Tensor, clip_feats: torch.Tensor, lam: float, fmap: FeatureMap) -> torch.Tensor:
    """eq. 7: f_F = lambda f_T + (1 - lambda) M(f_C), with M the fixed map into the teacher's space."""
    return lam * teacher_feats.float() + (1.0 - lam) * fmap(clip_feats)


def build_targets(
    target: str,
    *,
    teacher_logits: torch.Tensor | None = None,
    clip_logits: torch.Tensor | None = None,
    teacher_feats: torch.Tensor | None = None,
    clip_feats: torch.Tensor | None = None,
    alpha: float = 0.7,
    lam: float = 0.7,
    fmap: FeatureMap | None = None,
) -> dict[str, torch.Tensor]:
    """The logits and features a student is distilled towards, by target name.

    ce: none; kd: the teacher's; clip: CLIP's (features mapped into the teacher's space);
    richkd: the fusion of both (eq. 4 and 7).
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if target == "ce":
        return {}
    if target == "kd":
        return {"logits": teacher_logits, "features": teacher_feats}
    if fmap is None:
        raise ConfigError(f"target {target} needs the CLIP-to-teacher feature map")
    if target == "clip":
        return {"logits": clip_logits, "features": fmap(clip_feats)}
    return {
        "logits": fuse_logits(teacher_logits, clip_logits, alpha),
        "features": fuse_features(teacher_feats, clip_feats, lam, fmap),
    }


def topk_log_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(.., C) logits -> the k largest log-probabilities (.., k) and their class indices (.., k)."""
    return torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)


def logits_from_topk(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rebuild a full distribution from top-k log-probabilities: the k stored classes keep theirs and the
    remaining mass is spread evenly over the other classes (as FKD and dataset reinforcement do).

    Returns log-probabilities (.., C), usable as the teacher's logits: eq. 4 and the softmax in eq. 5
    do not change when a constant is added to a sample's logits.
    """
    k = values.shape[-1]
    rest = (1.0 - values.float().exp().sum(-1, keepdim=True)).clamp_min(1e-8)
    fill = torch.log(rest / max(num_classes - k, 1))
    out = fill.expand(*values.shape[:-1], num_classes).clone()
    return out.scatter(-1, indices.long(), values.float())


def topk_kl(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, KL(p || p_topk) in nats: what storing only the top k costs the teacher's distribution."""
    values, indices = topk_log_probs(logits, k)
    full = torch.log_softmax(logits.float(), dim=-1)
    rebuilt = logits_from_topk(values, indices, logits.shape[-1])
    return (full.exp() * (full - rebuilt)).sum(-1)
