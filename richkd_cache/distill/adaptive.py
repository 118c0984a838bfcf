"""Adaptive fusion weights: eq. 4's alpha estimated from the cache instead of fixed at 0.7.

The supplement (Sec. 9) derives the weight that minimises the fused teacher's error variance,
    alpha* = (s_c^2 - rho s_t s_c) / (s_t^2 + s_c^2 - 2 rho s_t s_c),
from the standard deviations s_t, s_c of the teacher's and CLIP's errors and their correlation rho, an
error being a softmax probability minus the one-hot label (richkd_cache.metrics.prediction_errors).
The paper fixes alpha for every sample and names adaptive fusion as future work. Three rules here, each a
pure function of cached logits and labels, returning one alpha per row:

- `auto`: alpha* over every row (one weight, estimated instead of chosen).
- `per-class`: alpha* from the rows of each class; a sample gets its class's weight (CLIP is a better
  teacher for some classes than for others, Fig. 1 of the paper).
- `confidence`: per sample, alpha_i = q_t(y_i) / (q_t(y_i) + q_c(y_i)), the share of the probability the two
  teachers give the true class that comes from the teacher: the teacher that is more right about this
  sample gets more weight. Both 0 (neither gives the class any mass) falls back to 0.5.

The statistics are accumulated as sums over chunks of rows, so an estimate over 8.1M cached rows of 100
classes never holds more than one chunk's errors in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from richkd_cache.errors import ConfigError
from richkd_cache.metrics import fusion_weight

ALPHA_RULES = ("auto", "per-class", "confidence")
_CHUNK = 65536  # rows per float64 chunk: 65536 x 100 classes x 8 B = 52 MB


def parse_alpha(text: str | float) -> float | str:
    """eq. 4's fixed weight as a number (its range is checked with every other setting's, in
    pipelines.config), or the name of an adaptive rule."""
    if isinstance(text, str) and text in ALPHA_RULES:
        return text
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha takes a number in [0, 1] or one of {', '.join(ALPHA_RULES)}, not {text!r}") from None


def error_sums(teacher_logits: torch.Tensor, clip_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C, 6) float64 sums per class of the sample: [pairs, sum e_t, sum e_c, sum e_t^2, sum e_c^2, sum e_t e_c],
    every (sample, class) pair one error of the supplement's Sec. 9. Sums of chunks add up."""
    num_classes = teacher_logits.shape[1]
    sums = torch.zeros(num_classes, 6, dtype=torch.float64)
    for start in range(0, len(labels), _CHUNK):
        z_t, z_c = teacher_logits[start : start + _CHUNK], clip_logits[start : start + _CHUNK]
        y = labels[start : start + _CHUNK].long().cpu()
        onehot = F.one_hot(y, num_classes).double()
        e_t = z_t.detach().cpu().double().softmax(1) - onehot  # (n, C)
        e_c = z_c.detach().cpu().double().softmax(1) - onehot
        per_row = torch.stack([torch.full((len(y),), float(num_classes), dtype=torch.float64), e_t.sum(1),
                               e_c.sum(1), e_t.pow(2).sum(1), e_c.pow(2).sum(1), (e_t * e_c).sum(1)], dim=1)
        sums.index_add_(0, y, per_row)
    return sums


def alpha_from_sums(sums: torch.Tensor) -> float:
    """alpha* (clipped to [0, 1]) from one row of `error_sums`, with population statistics as in
    richkd_cache.metrics.errors_to_statistics."""
    n, s_t, s_c, s_tt, s_cc, s_tc = (float(v) for v in sums)
    if n == 0:
        return 0.5
    var_t = max(s_tt / n - (s_t / n) ** 2, 0.0)
    var_c = max(s_cc / n - (s_c / n) ** 2, 0.0)
    cov = s_tc / n - (s_t / n) * (s_c / n)
    sd_t, sd_c = var_t**0.5, var_c**0.5
    rho = cov / (sd_t * sd_c) if sd_t > 0 and sd_c > 0 else 0.0
    return fusion_weight(sd_t, sd_c, rho)


def class_alphas(sums: torch.Tensor) -> torch.Tensor:
    """(C,) alpha* of each class from its rows; a class with no rows gets the global alpha*."""
    overall = alpha_from_sums(sums.sum(0))
    return torch.tensor([alpha_from_sums(row) if row[0] > 0 else overall for row in sums], dtype=torch.float32)


def confidence_alphas(teacher_logits: torch.Tensor, clip_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) alpha_i = q_t(y_i) / (q_t(y_i) + q_c(y_i)), 0.5 where both are 0."""
    y = labels.long().to(teacher_logits.device)[:, None]
    q_t = teacher_logits.float().softmax(1).gather(1, y)[:, 0]
    q_c = clip_logits.float().softmax(1).gather(1, y.to(clip_logits.device))[:, 0].to(q_t.device)
    total = q_t + q_c
    return torch.where(total > 0, q_t / total.clamp_min(1e-30), torch.full_like(total, 0.5))


def row_alphas(rule: str, teacher_logits: torch.Tensor, clip_logits: torch.Tensor, labels: torch.Tensor,
               sums: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) alpha of each row under `rule`; `sums` (from `error_sums`, possibly over more rows than these,
    e.g. the whole cache when these are one streamed window) are computed from these rows when omitted."""
    if rule == "confidence":
        return confidence_alphas(teacher_logits, clip_logits, labels)
    if rule not in ALPHA_RULES:
        raise ConfigError(f"unknown alpha rule {rule!r}; valid: {', '.join(ALPHA_RULES)}")
    sums = error_sums(teacher_logits, clip_logits, labels) if sums is None else sums
    if rule == "auto":
        return torch.full((len(labels),), alpha_from_sums(sums.sum(0)), dtype=torch.float32)
    return class_alphas(sums)[labels.long().cpu()]
