"""Logit distillation losses: pure functions of (student logits, target logits, labels).

The target is the teacher's logits or the fused ones (eq. 4): every method here works with either,
which is how RichKD plugs into DKD, LSKD, NormKD and RLD (the paper's Table 4). Targets are detached
inside, so gradients reach only the student. Defaults are the CIFAR-100 values of each method's paper
and official code, kept in DEFAULTS so they live in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from richkd_cache.errors import ConfigError

Tensor = torch.Tensor

DEFAULTS: dict[str, dict[str, float]] = {
    "kd": {"temperature": 3.0},  # RichKD's T (eq. 5)
    "dkd": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20},
    "lskd": {"temperature": 2.0},
    "normkd": {"t_norm": 1.5},
    "rld": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "alpha_temperature": 1.0, "warmup": 20},
}


def kd_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float = 3.0, epoch: int = 1) -> Tensor:
    """eq. 5: T^2 * KL(softmax(z_F/T) || softmax(z_S/T)), averaged over the batch.

    The T^2 factor is applied (Hinton et al.; mdistiller does the same): soft-target gradients scale
    as 1/T^2, so this keeps the term's weight independent of T. beta in eq. 9 multiplies this term.
    """
    t = temperature
    return t * t * _kl(F.log_softmax(student / t, dim=1), F.softmax(target.detach() / t, dim=1))


def dkd_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float = 4.0, alpha: float = 1.0,
             beta: float = 8.0, warmup: int = 20, epoch: int = 1) -> Tensor:
    """Decoupled KD: alpha * TCKD + beta * NCKD, ramped in over `warmup` epochs (min(epoch / warmup, 1)).

    TCKD matches the binary (target class, all others) split of the probabilities; NCKD matches the
    distribution among the non-target classes alone. beta 8 reweights NCKD, which plain KD suppresses
    by the teacher's confidence (KD = TCKD + (1 - p_t) NCKD).
    """
    t = temperature
    target = target.detach()
    gt = F.one_hot(labels, student.shape[1]).bool()
    p_s, p_t = F.softmax(student / t, dim=1), F.softmax(target / t, dim=1)
    bin_s, bin_t = _binary(p_s, gt), _binary(p_t, gt)
    tckd = _kl(torch.log(bin_s.clamp_min(1e-12)), bin_t) * t * t
    # the target class is pushed to -inf (a large negative shift) to leave only the others
    nckd = _kl(F.log_softmax(student / t - 1000.0 * gt, dim=1), F.softmax(target / t - 1000.0 * gt, dim=1)) * t * t
    return min(epoch / warmup, 1.0) * (alpha * tckd + beta * nckd)


def lskd_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float = 2.0, epoch: int = 1) -> Tensor:
    """Logit-standardised KD: KD on per-sample z-scores (z - mean) / std of both sides, so the student
    matches the target's logit relations, not its logit range."""
    return kd_loss(_zscore(student), _zscore(target.detach()), labels, temperature=temperature)


def normkd_loss(student: Tensor, target: Tensor, labels: Tensor, *, t_norm: float = 1.5, epoch: int = 1) -> Tensor:
    """NormKD: a per-sample temperature from each side's own logit spread, T_i = t_norm * std(z_i).

    Each side is divided by its own T_i, as NormKD's code does (the student's spread is not forced to
    the target's); the target's T_i^2 scales its sample's KL (KD's T^2 rule, per sample). t_norm 1.5
    is NormKD's CIFAR-100 value.
    """
    target = target.detach()
    t_t = t_norm * target.std(dim=1, keepdim=True)  # (B, 1)
    t_s = t_norm * student.std(dim=1, keepdim=True)
    kl = F.kl_div(F.log_softmax(student / t_s, dim=1), F.softmax(target / t_t, dim=1), reduction="none").sum(1)
    return (kl * t_t.squeeze(1) ** 2).mean()


def rld_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float = 4.0, alpha: float = 1.0,
             beta: float = 8.0, alpha_temperature: float = 1.0, warmup: int = 20, epoch: int = 1) -> Tensor:
    """Refined logit distillation: sample confidence distillation (SCD) + masked correlation (MCD).

    SCD matches the student's binary (true class, rest) probability to the target's (its top class,
    rest): confidence without copying a wrong top-1. MCD matches the distribution over the classes the
    target ranks below the true class, masking every class it ranks at or above it, so a wrong
    target ranking is never taught.
    """
    target = target.detach()
    s_true = F.one_hot(labels, student.shape[1]).bool()
    t_top = F.one_hot(target.argmax(dim=1), student.shape[1]).bool()
    a = alpha_temperature
    bin_s = _binary(F.softmax(student / a, dim=1), s_true)
    bin_t = _binary(F.softmax(target / a, dim=1), t_top)
    scd = _kl(torch.log(bin_s.clamp_min(1e-12)), bin_t) * a * a
    mask = target >= target.gather(1, labels[:, None])  # classes ranked at or above the true one
    t = temperature
    mcd = _kl(F.log_softmax((student / t).masked_fill(mask, -1e9), dim=1),
              F.softmax((target / t).masked_fill(mask, -1e9), dim=1)) * t * t
    return min(epoch / warmup, 1.0) * (alpha * scd + beta * mcd)


LOGIT_LOSSES: dict[str, Callable[..., Tensor]] = {
    "kd": kd_loss,
    "dkd": dkd_loss,
    "lskd": lskd_loss,
    "normkd": normkd_loss,
    "rld": rld_loss,
}


def list_logit_losses() -> list[str]:
    return list(LOGIT_LOSSES)


def get_logit_loss(name: str) -> Callable[..., Tensor]:
    if name not in LOGIT_LOSSES:
        raise ConfigError(f"unknown logit loss {name!r}; valid: {', '.join(LOGIT_LOSSES)}")
    return LOGIT_LOSSES[name]


def _kl(log_q: Tensor, p: Tensor) -> Tensor:
    """KL(p || q) summed over classes, mean over the batch; 0 log 0 = 0."""
    return F.kl_div(log_q, p, reduction="none").sum(1).mean()


def _binary(probs: Tensor, mask: Tensor) -> Tensor:
    """(B, C) probabilities -> (B, 2): mass on the masked class, mass on all the others."""
    inside = (probs * mask).sum(1, keepdim=True)
    return torch.cat([inside, (probs * ~mask).sum(1, keepdim=True)], dim=1)


def _zscore(logits: Tensor) -> Tensor:
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + 1e-7)
