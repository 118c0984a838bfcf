"""Logit distillation losses: pure functions of (student logits, target logits, labels), and the weights
each method is trained with.

The target is the teacher's logits or the fused ones (eq. 4): every method here works with either,
which is how RichKD plugs into DKD, MLKD, LSKD, NormKD and RLD (the paper's Table 4: the fused logits replace
the teacher's inside each method, and each method keeps its own weights). Targets are detached inside,
so gradients reach only the student.

A method's parameters (DEFAULTS) are its loss's keyword arguments plus `ce_weight` (the weight of the
cross-entropy term) and, for methods whose reference scales the whole loss by one number, `weight`
(RichKD's beta, eq. 9, for KD). DKD and RLD weigh their two terms with `alpha` and `beta` instead.
A loss returns one tensor, or (MLKD) a dict of named terms that `weight` multiplies each of.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from richkd_cache.errors import ConfigError

Tensor = torch.Tensor

# The CIFAR-100 reference values of each method, with the file and value they come from.
DEFAULTS: dict[str, dict[str, float]] = {
    # RichKD paper, Sec. 4 "Implementation Details": L = CE + beta * L_logit (eq. 9), beta 3, T 3
    "kd": {
        "ce_weight": 1.0,  # eq. 9: the cross-entropy is not reweighted
        "weight": 3.0,  # beta = 3 (eq. 9)
        "temperature": 3.0,  # T = 3 (eq. 5)
    },
    # megvii-research/mdistiller, mdistiller/engine/cfg.py (CFG.DKD) read by mdistiller/distillers/DKD.py;
    # configs/cifar100/dkd/*.yaml change only BETA for some pairs (6.0, 2.0; see the recipes)
    "dkd": {
        "ce_weight": 1.0,  # CFG.DKD.CE_WEIGHT = 1.0
        "alpha": 1.0,  # CFG.DKD.ALPHA = 1.0 (weight of TCKD)
        "beta": 8.0,  # CFG.DKD.BETA = 8.0 (weight of NCKD)
        "temperature": 4.0,  # CFG.DKD.T = 4.0
        "warmup": 20.0,  # CFG.DKD.WARMUP = 20 (epochs)
    },
    # sunshangquan/logit-standardization-KD: mdistiller/distillers/KD.py with --logit-stand; README's
    # "KD+Ours" command sets --base-temp 2 --kd-weight 9; CE from mdistiller/engine/cfg.py
    "lskd": {
        "ce_weight": 0.1,  # CFG.KD.LOSS.CE_WEIGHT = 0.1 (left unchanged by tools/train.py)
        "weight": 9.0,  # --kd-weight 9 -> CFG.KD.LOSS.KD_WEIGHT
        "temperature": 2.0,  # --base-temp 2 -> CFG.KD.TEMPERATURE
    },
    # gizi1/NormKD: mdistiller/engine/cfg.py (CFG.NormKD) read by mdistiller/distillers/NormKD.py;
    # configs/cifar100/NormKD/*.yaml override none of them
    "normkd": {
        "ce_weight": 0.1,  # CFG.NormKD.LOSS.CE_WEIGHT = 0.1
        "weight": 0.9,  # CFG.NormKD.LOSS.KD_WEIGHT = 0.9
        "t_norm": 2.0,  # CFG.NormKD.TEMPERATURE_NORM = 2.0
    },
    # zju-SWJ/RLD: mdistiller/engine/cfg.py (CFG.RLD) read by mdistiller/distillers/RLD.py;
    # configs/cifar100/rld/*.yaml override none; the README's RLD command adds --same-t
    "rld": {
        "ce_weight": 1.0,  # CFG.RLD.CE_WEIGHT = 1.0
        "alpha": 1.0,  # CFG.RLD.ALPHA = 1.0 (weight of SCD)
        "beta": 8.0,  # CFG.RLD.BETA = 8.0 (weight of MCD)
        "temperature": 4.0,  # CFG.RLD.T = 4.0 (MCD)
        "alpha_temperature": 4.0,  # --same-t: ALPHA_T = T (tools/train.py; cfg.py alone would give 1.0)
        "warmup": 20.0,  # CFG.RLD.WARMUP = 20 (epochs)
    },
    # Jin-Ying/Multi-Level-Logit-Distillation: mdistiller/distillers/KD_ours.py reads CFG.KD from
    # mdistiller/engine/cfg.py; configs/cifar100/ours/*.yaml override none of them
    "mlkd": {
        "ce_weight": 0.1,  # CFG.KD.LOSS.CE_WEIGHT = 0.1, on the weak and the strong view's CE
        "weight": 0.9,  # CFG.KD.LOSS.KD_WEIGHT = 0.9, multiplying every instance, class and batch term
        "temperature": 4.0,  # CFG.KD.TEMPERATURE = 4, the first of the five levels (MLKD_TEMPERATURES)
        "percentile": 50.0,  # np.percentile(confidence, 50): the confidence masks' threshold
    },
}
# MLKD's other prediction levels, written into KD_ours.py next to CFG.KD.TEMPERATURE: 3, 5, 2, 6
MLKD_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
# Losses that also train on a strong view of each image: the batch then carries the student's logits and
# the targets on that view (`student_strong`, `target_strong`), drawn from the strong views a cache stores
STRONG_VIEW_LOSSES = frozenset({"mlkd"})
# parameters that divide or ramp (> 0); every other one is a weight (>= 0)
_POSITIVE = ("temperature", "alpha_temperature", "t_norm", "warmup")
_AT_MOST = {"percentile": 100.0}  # parameters with an upper bound
# applied by the objective (eq. 9), not passed to the loss function
OBJECTIVE_WEIGHTS = ("ce_weight", "weight")


def kd_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float, epoch: int = 1) -> Tensor:
    """eq. 5: T^2 * KL(softmax(z_F/T) || softmax(z_S/T)), averaged over the batch.

    The T^2 factor is applied (Hinton et al.; mdistiller does the same): soft-target gradients scale
    as 1/T^2, so this keeps the term's weight independent of T. `weight` (beta, eq. 9) multiplies it.
    """
    t = temperature
    return t * t * _kl(F.log_softmax(student / t, dim=1), F.softmax(target.detach() / t, dim=1))


def dkd_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float, alpha: float, beta: float,
             warmup: float, epoch: int = 1) -> Tensor:
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


def lskd_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float, epoch: int = 1) -> Tensor:
    """Logit-standardised KD: KD on per-sample z-scores (z - mean) / std of both sides, so the student
    matches the target's logit relations, not its logit range."""
    return kd_loss(_zscore(student), _zscore(target.detach()), labels, temperature=temperature)


def normkd_loss(student: Tensor, target: Tensor, labels: Tensor, *, t_norm: float, epoch: int = 1) -> Tensor:
    """NormKD: a per-sample temperature from each side's own logit spread, T_i = t_norm * std(z_i).

    Each side is divided by its own T_i, as NormKD's code does (the student's spread is not forced to
    the target's); the target's T_i^2 scales its sample's KL (KD's T^2 rule, per sample).
    """
    target = target.detach()
    t_t = t_norm * target.std(dim=1, keepdim=True)  # (B, 1)
    t_s = t_norm * student.std(dim=1, keepdim=True)
    kl = F.kl_div(F.log_softmax(student / t_s, dim=1), F.softmax(target / t_t, dim=1), reduction="none").sum(1)
    return (kl * t_t.squeeze(1) ** 2).mean()


def rld_loss(student: Tensor, target: Tensor, labels: Tensor, *, temperature: float, alpha: float, beta: float,
             alpha_temperature: float, warmup: float, epoch: int = 1) -> Tensor:
    """Refined logit distillation: alpha * SCD + beta * MCD, ramped in over `warmup` epochs.

    SCD (sample confidence, at `alpha_temperature`) matches the student's binary (true class, rest)
    probability to the target's (its top class, rest): confidence without copying a wrong top-1. MCD
    (masked correlation, at `temperature`) matches the distribution over the classes the target ranks
    below the true class, masking every class it ranks at or above it, so a wrong ranking is never taught.
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


def mlkd_loss(student: Tensor, target: Tensor, labels: Tensor, *, student_strong: Tensor, target_strong: Tensor,
              temperature: float, percentile: float, epoch: int = 1) -> dict[str, Tensor]:
    """Multi-level logit distillation (Jin et al., CVPR 2023) on a weak view (student, target: (B, C)) and a
    strong view (student_strong, target_strong: (B, C)) of the same images, as its reference trainer
    computes it (mdistiller/distillers/KD_ours.py), summed over the five temperatures (temperature, 3, 5, 2, 6):

    - "kd", instance level: T^2 KL on the weak view scaled by the confidence share, plus T^2 KL on the strong
      view at the first three temperatures and, as loss_kd_strong there has it, on the weak view at 2 and 6;
    - "cc", class level: the squared difference of the class-correlation matrices P^T P (C, C), over C,
      scaled by the class-confidence share (weak view);
    - "bc", batch level: the same for the input-correlation matrices P P^T (B, B), over B, scaled by the
      confidence share (weak view).

    The confidence shares: KD_ours.py multiplies each batch-mean loss (its kd_loss/cc_loss/bc_loss reduce
    first; the per-sample `reduce=False` is commented out) by a 0/1 mask and takes the mean, so a mask acts as
    the share of samples (classes) whose target confidence max_c p (summed probability sum_b p) on the weak
    view, at T = 1, is at or below its `percentile`-th percentile. Its strong-view cc and bc terms are computed
    but left out of its loss dict, and are left out here.
    """
    weak_t, strong_t = target.detach(), target_strong.detach()
    probs = F.softmax(weak_t, dim=1)  # (B, C) at T = 1, as KD_ours.py
    sample_share = _share_at_or_below(probs.max(dim=1).values, percentile)
    class_share = _share_at_or_below(probs.sum(dim=0), percentile)
    levels = (temperature, *MLKD_TEMPERATURES)
    kd = sum(kd_loss(student, weak_t, labels, temperature=t) * sample_share for t in levels)
    kd = kd + sum(kd_loss(student_strong, strong_t, labels, temperature=t) for t in levels[:3])
    kd = kd + sum(kd_loss(student, weak_t, labels, temperature=t) for t in levels[3:])
    cc = sum(_correlation_gap(student, weak_t, t, dim=0) for t in levels) * class_share
    bc = sum(_correlation_gap(student, weak_t, t, dim=1) for t in levels) * sample_share
    return {"kd": kd, "cc": cc, "bc": bc}


def _share_at_or_below(values: Tensor, percentile: float) -> Tensor:
    """The share of `values` at or below their percentile (linear interpolation, as np.percentile)."""
    threshold = torch.quantile(values.double(), percentile / 100.0).to(values.dtype)
    return (values <= threshold).to(values.dtype).mean()


def _correlation_gap(student: Tensor, target: Tensor, temperature: float, dim: int) -> Tensor:
    """sum of (G_t - G_s)^2 / n for the Gram matrices of the softened predictions: dim 0 correlates
    classes (P^T P, n = C: MLKD's cc_loss), dim 1 samples (P P^T, n = B: its bc_loss)."""
    p_s, p_t = F.softmax(student / temperature, dim=1), F.softmax(target / temperature, dim=1)
    if dim == 0:
        gram_s, gram_t = p_s.T @ p_s, p_t.T @ p_t
    else:
        gram_s, gram_t = p_s @ p_s.T, p_t @ p_t.T
    return ((gram_t - gram_s) ** 2).sum() / student.shape[1 - dim]


def uses_strong_view(name: str | None) -> bool:
    """Whether the method also trains on a strong view of each image (its targets must be cached)."""
    return name in STRONG_VIEW_LOSSES


LOGIT_LOSSES: dict[str, Callable[..., Tensor | dict[str, Tensor]]] = {
    "kd": kd_loss,
    "dkd": dkd_loss,
    "lskd": lskd_loss,
    "normkd": normkd_loss,
    "rld": rld_loss,
    "mlkd": mlkd_loss,
}


def list_logit_losses() -> list[str]:
    return list(LOGIT_LOSSES)


def get_logit_loss(name: str) -> Callable[..., Tensor]:
    if name not in LOGIT_LOSSES:
        raise ConfigError(f"unknown logit loss {name!r}; valid: {', '.join(LOGIT_LOSSES)}")
    return LOGIT_LOSSES[name]


def describe_params(name: str) -> str:
    """`ce_weight=1, alpha=1, ...`: a method's parameters and reference values, for messages."""
    get_logit_loss(name)
    return ", ".join(f"{k}={v:g}" for k, v in DEFAULTS[name].items())


def method_params(name: str, given: Mapping[str, float] | None = None) -> dict[str, float]:
    """The method's reference parameters with the `given` ones replacing them.

    A parameter the method does not have is an error (it would otherwise be silently ignored), and so
    is a weight below 0 or a temperature or warm-up that is not positive.
    """
    get_logit_loss(name)  # an unknown name fails listing the valid ones
    defaults = DEFAULTS[name]
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"logit loss {name} has no parameter {', '.join(unknown)}; its parameters: "
                          f"{describe_params(name)}")
    params = {**defaults, **{k: _number(name, k, v) for k, v in given.items()}}
    for key, value in params.items():
        if not math.isfinite(value) or value < 0 or (key in _POSITIVE and value == 0):
            raise ConfigError(f"logit loss {name}: {key} must be {'> 0' if key in _POSITIVE else '>= 0'}, got {value:g}")
        if value > _AT_MOST.get(key, math.inf):
            raise ConfigError(f"logit loss {name}: {key} must be <= {_AT_MOST[key]:g}, got {value:g}")
    return params


def _number(method: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"logit loss {method}: {key} must be a number, got {value!r}")
    return float(value)


def _kl(log_q: Tensor, p: Tensor) -> Tensor:
    """KL(p || q) summed over classes, mean over the batch; 0 log 0 = 0."""
    return F.kl_div(log_q, p, reduction="none").sum(1).mean()


def _binary(probs: Tensor, mask: Tensor) -> Tensor:
    """(B, C) probabilities -> (B, 2): mass on the masked class, mass on all the others."""
    inside = (probs * mask).sum(1, keepdim=True)
    return torch.cat([inside, (probs * ~mask).sum(1, keepdim=True)], dim=1)


def _zscore(logits: Tensor) -> Tensor:
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + 1e-7)
