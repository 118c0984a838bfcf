"""CLIP logits from cached embeddings (eq. 2-3), with no CLIP model and no open_clip import."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def clip_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, tau: float,
                renormalize: bool = False) -> torch.Tensor:
    """z_C = tau * e @ W.T with W = mean over prompts of the normalised text embeddings.

    image_embeds: (N, D) L2-normalised; text_embeds: (M, C, D) per-prompt embeddings (each the
    normalised embedding of one template, averaged over the class's names). Because the logit is
    linear in W, tau * e @ mean_m(h_m).T equals mean_m(tau * e @ h_m.T): eq. 3 exactly, at the cost
    of one matrix product. renormalize=True re-normalises W (the CLIP zero-shot notebook's variant,
    which eq. 3 is not). Returns (N, C) float32.
    """
    weights = text_embeds.float().mean(dim=0)  # (C, D)
    if renormalize:
        weights = F.normalize(weights, dim=-1)
    return tau * image_embeds.float() @ weights.to(image_embeds.device).T


def ensemble_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """Several CLIP models' logits (each (.., C), eq. 2-3 at the model's own tau) -> the ensemble's:
    the log of the mean of their probabilities, log((1/K) sum_k softmax(z_k)).

    A mixture of the models' zero-shot distributions, as deep ensembles average predicted probabilities
    (Lakshminarayanan et al., 2017): each model keeps the sharpness its own learned tau gives it, and where
    the models disagree the ensemble stays uncertain instead of multiplying their confidences (which the
    mean of logits, a product of experts, does). One model gives its log-softmax, which differs from its
    logits by a constant per row: eq. 4 and every softmax, argmax and alpha* statistic ignore it, so a
    one-model "ensemble" trains exactly as that model. docs/fusion.md.
    """
    if len(logits) == 1:
        return logits[0]
    log_probs = torch.stack([z.float().log_softmax(dim=-1) for z in logits])  # (K, .., C)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))
