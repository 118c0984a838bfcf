"""Statistics of teachers and their fusion, from logits alone (no model): accuracy, the confidence
categories of Fig. 1a, the outcome changes of the supplement's Table 10, calibration (ECE), and the
supplement's optimal fusion weight alpha* (Sec. 9).

Every function takes torch tensors or numpy arrays: logits (N, C) float, labels (N,) integer class
indices. Accuracies are percentages, like everywhere else in richkd-cache; ECE is a fraction in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from richkd_cache.distill.fusion import fuse_logits
from richkd_cache.errors import DataError

ArrayLike = torch.Tensor | np.ndarray


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, k: int = 1) -> float:
    """Top-k accuracy (%): the label is among the k largest logits. k is capped at the class count."""
    hits = topk_hits(logits, labels, k)
    return _percent(hits.sum().item(), len(hits))


def topk_hits(logits: ArrayLike, labels: ArrayLike, k: int = 1) -> torch.Tensor:
    """(N,) bool on the CPU: the label is among the min(k, C) largest logits."""
    z, y = _logits_labels(logits, labels)
    top = z.topk(min(k, z.shape[1]), dim=1).indices  # (N, k)
    return (top == y[:, None]).any(dim=1)


def confidence_categories(logits: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> dict[str, int]:
    """Counts of Fig. 1a's four categories: confident (max softmax probability >= threshold) or
    uncertain, crossed with correct or wrong top-1."""
    z, y = _logits_labels(logits, labels)
    confidence, prediction = z.softmax(dim=1).max(dim=1)  # (N,), (N,)
    confident = confidence >= threshold
    correct = prediction == y
    return {
        "confident_correct": int((confident & correct).sum()),
        "confident_wrong": int((confident & ~correct).sum()),
        "uncertain_correct": int((~confident & correct).sum()),
        "uncertain_wrong": int((~confident & ~correct).sum()),
    }


def outcome_changes(before_logits: ArrayLike, after_logits: ArrayLike, labels: ArrayLike) -> dict[str, dict]:
    """The supplement's Table 10: how often a change of targets (teacher -> fusion) fixes or breaks a
    prediction. Each condition has its `base` (the samples that qualify), `count` and `percent` of base:

    wrong_to_correct            top-1 wrong before, right after
    outside_top5_to_correct     label outside the top-5 before, top-1 right after
    correct_to_wrong            top-1 right before, wrong after
    correct_to_outside_top5     top-1 right before, label outside the top-5 after
    """
    z0, y = _logits_labels(before_logits, labels)
    z1, _ = _logits_labels(after_logits, labels)
    if z0.shape != z1.shape:
        raise DataError(f"before and after logits differ in shape: {tuple(z0.shape)} vs {tuple(z1.shape)}")
    right0, right1 = topk_hits(z0, y, 1), topk_hits(z1, y, 1)
    top5_0, top5_1 = topk_hits(z0, y, 5), topk_hits(z1, y, 5)
    conditions = {
        "wrong_to_correct": (~right0, right1),
        "outside_top5_to_correct": (~top5_0, right1),
        "correct_to_wrong": (right0, ~right1),
        "correct_to_outside_top5": (right0, ~top5_1),
    }
    changes = {}
    for name, (base, outcome) in conditions.items():
        n_base, n = int(base.sum()), int((base & outcome).sum())
        changes[name] = {"base": n_base, "count": n, "percent": _percent(n, n_base)}
    return changes


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> tuple[float, list[dict]]:
    """Equal-width ECE (Guo et al., 2017): sum over bins of |B|/N * |accuracy(B) - confidence(B)|.

    A sample falls in bin (lower, upper] by its top-1 probability (the first bin also holds 0). Returns
    the ECE as a fraction and one row per bin: lower, upper, count, and the bin's accuracy and mean
    confidence as fractions (None for an empty bin). probs: (N, C) rows summing to 1.
    """
    p, y = _logits_labels(probs, labels)
    if bins < 1:
        raise DataError(f"ECE needs at least one bin, got {bins}")
    confidence, prediction = p.max(dim=1)
    correct = (prediction == y).double()
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    # right=False: a confidence equal to an inner edge belongs to the bin below it, (lower, upper]
    which = torch.bucketize(confidence, edges[1:-1], right=False)  # (N,) in 0..bins-1
    ece, table = 0.0, []
    for b in range(bins):
        member = which == b
        count = int(member.sum())
        row = {"lower": edges[b].item(), "upper": edges[b + 1].item(), "count": count,
               "accuracy": None, "confidence": None}
        if count:
            row["accuracy"] = correct[member].mean().item()
            row["confidence"] = confidence[member].mean().item()
            ece += count / len(y) * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return ece, table


def prediction_errors(logits: ArrayLike, labels: ArrayLike) -> torch.Tensor:
    """The supplement's errors f_i(x) - f*(x) (Sec. 9): softmax probabilities minus the one-hot label,
    every class of every sample one scalar prediction, (N * C,) float64.

    Why probabilities: the supplement lets f* be "an indicator for the correct class", which only
    probabilities are comparable to, and it fuses probabilities the same way (q_f = alpha q_t + (1 - alpha)
    q_c); raw logits of two models have unrelated scales, so their errors would weigh the teachers by
    scale rather than by reliability.
    """
    z, y = _logits_labels(logits, labels)
    onehot = torch.nn.functional.one_hot(y, z.shape[1]).double()
    return (z.softmax(dim=1) - onehot).reshape(-1)


def error_statistics(teacher_logits: ArrayLike, clip_logits: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """s_t, s_c (standard deviations of the two teachers' errors), rho (their correlation, 0 when an
    error does not vary) and cov = rho s_t s_c, over the errors of `prediction_errors`."""
    e_t = prediction_errors(teacher_logits, labels)
    e_c = prediction_errors(clip_logits, labels)
    return errors_to_statistics(e_t, e_c)


def errors_to_statistics(e_t: torch.Tensor, e_c: torch.Tensor) -> dict[str, float]:
    """Population (ddof 0) statistics of two paired error vectors; eps_i = e_i - mean(e_i) is the
    zero-mean error of Sec. 9, the mean being the bias b_i."""
    e_t, e_c = e_t.double().reshape(-1), e_c.double().reshape(-1)
    d_t, d_c = e_t - e_t.mean(), e_c - e_c.mean()
    s_t, s_c = d_t.pow(2).mean().sqrt().item(), d_c.pow(2).mean().sqrt().item()
    cov = (d_t * d_c).mean().item()
    rho = cov / (s_t * s_c) if s_t > 0 and s_c > 0 else 0.0
    return {"s_t": s_t, "s_c": s_c, "rho": rho, "cov": cov}


def fusion_weight(s_t: float, s_c: float, rho: float) -> float:
    """The supplement's alpha* = (s_c^2 - rho s_t s_c) / (s_t^2 + s_c^2 - 2 rho s_t s_c), clipped to [0, 1].

    It minimises the variance of the fused error alpha eps_t + (1 - alpha) eps_c (the bias term of the
    supplement's MSE is left out, as in its formula). The denominator is Var(eps_t - eps_c): when it is
    0 the errors are identical, every alpha is as good, and 0.5 is returned.
    """
    cov = rho * s_t * s_c
    denominator = s_t**2 + s_c**2 - 2.0 * cov
    if denominator <= 1e-12 * (s_t**2 + s_c**2):  # also 0 <= 0 when neither error varies
        return 0.5
    return float(min(max((s_c**2 - cov) / denominator, 0.0), 1.0))


def optimal_alpha(teacher_logits: ArrayLike, clip_logits: ArrayLike, labels: ArrayLike) -> float:
    """The supplement's estimate of the best fusion weight (Sec. 9, alpha*) for eq. 4's alpha.

    Reading of the supplement: each teacher's prediction is f_i = f* + b_i + eps_i; here f_i is its
    softmax probability of each class, f* the one-hot label, so the error of every (sample, class)
    pair is one draw (see `prediction_errors`). s_t, s_c are the standard deviations of the teacher's
    and CLIP's errors and rho their correlation over all N * C pairs; alpha* follows from
    `fusion_weight`, clipped to [0, 1]. alpha weighs the teacher, as in eq. 4.

    In this space the mean error is exactly 0 (every row of the probabilities and of the one-hot sums
    to 1), so the supplement's bias term vanishes and the unclipped alpha* is exactly the weight that
    minimises the Brier score of the probability fusion q_f = alpha q_t + (1 - alpha) q_c. It is an
    estimate for eq. 4, which fuses logits, not probabilities.
    """
    stats = error_statistics(teacher_logits, clip_logits, labels)
    return fusion_weight(stats["s_t"], stats["s_c"], stats["rho"])


def alpha_sweep(teacher_logits: ArrayLike, clip_logits: ArrayLike, labels: ArrayLike,
                alphas: Iterable[float]) -> list[tuple[float, float]]:
    """Top-1 (%) of the fused logits (eq. 4) at each alpha: [(alpha, top1), ...] in the given order."""
    z_t, y = _logits_labels(teacher_logits, labels)
    z_c, _ = _logits_labels(clip_logits, labels)
    return [(float(a), topk_accuracy(fuse_logits(z_t, z_c, float(a)), y, 1)) for a in alphas]


def _logits_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float64 and (N,) int64 CPU tensors, with their shapes checked against each other."""
    z = torch.as_tensor(logits).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long()
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise DataError(f"expected logits (N, C) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise DataError(f"labels must be class indices in 0..{z.shape[1] - 1}, found {int(y.min())}..{int(y.max())}")
    return z, y


def _percent(count: float, total: int) -> float:
    return 100.0 * count / total if total else 0.0
