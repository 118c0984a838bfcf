"""CLIP logits from cached embeddings (eq. 2-3), with no CLIP model and no open_clip import."""

from __future__ import annotations

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
