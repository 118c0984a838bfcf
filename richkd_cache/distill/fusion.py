"""Fused targets: eq. 4 for logits, eq. 7 for features, computed from cached tensors only.

Feature fusion (eq. 7) adds a teacher feature (Ft wide) and a CLIP feature (Fc wide) that live in
different spaces; the paper fixes the dimensions "through a linear layer". Which map is used decides
what survives. A map from CLIP into the teacher's space fitted by regression keeps only the part of f_C
that predicts f_T, so a signal that only CLIP carries is lost. Two fusions keep it:

- CRD (the authors' code, RichKD.py): a learned linear map per teacher into CRD's 128-d embedding,
  each L2-normalised, fused there and normalised again. The maps train with CRD; its negatives keep
  them from collapsing. That lives in feature_losses.CRDLoss: its targets are the raw f_T and f_C.
- cosine and MSE have no negatives, so a learned target side could collapse onto the student. Their
  target is fixed: a joint space both features are mapped into without any fitting between them,
  f_F = [sqrt(lambda) a_T (f_T - mu_T), sqrt(1 - lambda) a_C (f_C - mu_C)]      (JointSpace)
  i.e. each feature centred and scaled to a common energy, stacked. Inner products and squared
  distances of f_F are lambda times the teacher's plus (1 - lambda) times CLIP's (eq. 7 on the
  geometry of the two spaces), and every direction of either feature is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from richkd_cache.errors import ConfigError, DataError

TARGETS = ("ce", "kd", "clip", "richkd")
# Which cached features each target distils towards (eq. 8): the teacher's, CLIP's, or both fused (eq. 7).
FEATURE_PARTS = {"ce": (), "kd": ("teacher",), "clip": ("clip",), "richkd": ("teacher", "clip")}

_CHUNK_ROWS = 1 << 16  # rows per chunk of a fit: 65536 x 1024 float32 is 256 MB at most


@dataclass(frozen=True)
class JointSpace:
    """The fixed fused feature space of cosine and MSE targets (eq. 7 by blocks, see the module doc).

    teacher_mean (Ft,) and clip_mean (Fc,) centre each feature; the scales make each block's mean
    squared norm the joint width Ft + Fc, so the stacked target has mean square 1 per element and the
    blocks carry lambda and 1 - lambda of its energy. Nothing here is learned: the target cannot move.
    """

    teacher_mean: torch.Tensor
    teacher_scale: float
    clip_mean: torch.Tensor
    clip_scale: float
    lam: float

    def teacher_part(self, teacher_feats: torch.Tensor) -> torch.Tensor:
        """(.., Ft) -> the first block of f_F, (.., Ft) float32."""
        mean = self.teacher_mean.to(teacher_feats.device)
        return (teacher_feats.float() - mean) * (math.sqrt(self.lam) * self.teacher_scale)

    def clip_part(self, clip_feats: torch.Tensor) -> torch.Tensor:
        """(.., Fc) -> the second block of f_F, (.., Fc) float32."""
        mean = self.clip_mean.to(clip_feats.device)
        return (clip_feats.float() - mean) * (math.sqrt(1.0 - self.lam) * self.clip_scale)

    def __call__(self, teacher_feats: torch.Tensor, clip_feats: torch.Tensor) -> torch.Tensor:
        """f_F (.., Ft + Fc) of eq. 7."""
        return torch.cat([self.teacher_part(teacher_feats), self.clip_part(clip_feats)], dim=-1)


def fuse_logits(teacher_logits: torch.Tensor, clip_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """eq. 4: z_F = alpha z_T + (1 - alpha) z_C, on (.., C)."""
    return alpha * teacher_logits + (1.0 - alpha) * clip_logits


def fit_joint_space(teacher_feats: np.ndarray | torch.Tensor, clip_feats: np.ndarray | torch.Tensor,
                    lam: float, chunk_rows: int = _CHUNK_ROWS) -> JointSpace:
    """The centring and scales of JointSpace from cached rows, (.., Ft) and (.., Fc) of any float dtype.

    The two sides may have different row counts (teacher rows per view, CLIP rows per sample). Rows are
    read chunk by chunk in float32; only (F,) sums are kept in float64, so 8.1M x 1024 fp16 rows need
    one chunk of working memory, never a float64 copy of all rows.
    """
    return joint_space_from_moments(feature_moments(teacher_feats, "teacher", chunk_rows),
                                    feature_moments(clip_feats, "CLIP", chunk_rows), lam)


def joint_space_from_moments(teacher: tuple[torch.Tensor, float], clip: tuple[torch.Tensor, float],
                             lam: float) -> JointSpace:
    """JointSpace from each side's (mean (F,), mean squared centred norm), as `feature_moments` gives them."""
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"lambda (eq. 7) must lie in [0, 1], got {lam}")
    (t_mean, t_energy), (c_mean, c_energy) = teacher, clip
    width = len(t_mean) + len(c_mean)
    return JointSpace(t_mean, math.sqrt(width / t_energy), c_mean, math.sqrt(width / c_energy), lam)


def scaled_concat_moments(moments: list[tuple[torch.Tensor, float]], scales: list[float]) -> tuple[torch.Tensor, float]:
    """The moments of several features side by side, each multiplied by its scale: the means concatenate
    and the centred energies add (blocks are orthogonal coordinates), without forming the concatenation."""
    mean = torch.cat([m * s for (m, _), s in zip(moments, scales)])
    return mean, sum(e * s * s for (_, e), s in zip(moments, scales))


def feature_moments(rows: np.ndarray | torch.Tensor, side: str,
                    chunk_rows: int = _CHUNK_ROWS) -> tuple[torch.Tensor, float]:
    """Mean (F,) float32 and mean squared norm about it of the rows (.., F), read chunk by chunk in float32
    (a memory-mapped array is streamed, never copied whole)."""
    return _centre_and_energy(rows, chunk_rows, side)


def centred_energy(rows: np.ndarray | torch.Tensor, side: str, chunk_rows: int = _CHUNK_ROWS) -> float:
    """Mean squared norm of the rows (.., F) about their mean, read chunk by chunk in float32."""
    return _centre_and_energy(rows, chunk_rows, side)[1]


def _centre_and_energy(rows: np.ndarray | torch.Tensor, chunk_rows: int, side: str) -> tuple[torch.Tensor, float]:
    """Mean (F,) float32 and mean squared norm of the centred rows, in two chunked passes (the second
    centres before squaring: no E[x^2] - E[x]^2 cancellation)."""
    numel = rows.size if isinstance(rows, np.ndarray) else rows.numel()
    if rows.ndim < 2 or numel == 0:
        raise DataError(f"the {side} features are empty or have no feature axis: {tuple(rows.shape)}; rebuild the cache")
    flat = rows.reshape(-1, rows.shape[-1])
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    for chunk in _chunks(flat, chunk_rows):
        total += chunk.sum(0).double()
    mean = (total / len(flat)).float()
    energy = 0.0
    for chunk in _chunks(flat, chunk_rows):
        energy += float((chunk - mean).square().sum(dtype=torch.float64))
    if not math.isfinite(energy):
        raise DataError(f"the {side} features hold NaN or infinite values; verify or rebuild the cache")
    return mean, max(energy / len(flat), 1e-12)


def _chunks(rows: np.ndarray | torch.Tensor, chunk_rows: int) -> Iterator[torch.Tensor]:
    """(n, F) -> float32 CPU tensors of at most chunk_rows rows (only one chunk converted at a time)."""
    for start in range(0, len(rows), chunk_rows):
        part = rows[start : start + chunk_rows]
        part = torch.from_numpy(np.array(part, dtype=np.float32)) if isinstance(part, np.ndarray) else part
        yield part.detach().to("cpu", torch.float32)


def build_targets(
    target: str,
    *,
    teacher_logits: torch.Tensor | None = None,
    clip_logits: torch.Tensor | None = None,
    teacher_feats: torch.Tensor | None = None,
    clip_feats: torch.Tensor | None = None,
    alpha: float = 0.7,
    space: JointSpace | None = None,
) -> dict[str, torch.Tensor]:
    """The logits and features a student is distilled towards, by target name.

    ce: none; kd: the teacher's; clip: CLIP's; richkd: the fusion of both. Features come as parts,
    "teacher_features" and/or "clip_features" (FEATURE_PARTS): raw, or, when `space` is given (the
    richkd target of cosine and MSE), the two blocks of the fixed fused feature f_F (eq. 7). Without a
    space the richkd parts stay raw for a loss that fuses them itself (CRD, after its embeddings).
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if target == "ce":
        return {}
    if target == "kd":
        return {"logits": teacher_logits, "teacher_features": teacher_feats}
    if target == "clip":
        return {"logits": clip_logits, "clip_features": clip_feats}
    fused = {"logits": fuse_logits(teacher_logits, clip_logits, alpha)}  # eq. 4
    if space is None:
        return {**fused, "teacher_features": teacher_feats, "clip_features": clip_feats}
    return {**fused, "teacher_features": space.teacher_part(teacher_feats), "clip_features": space.clip_part(clip_feats)}


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
