"""Targets fused per batch: a batch's gathered compact rows -> what the student is distilled towards.

Stage two never holds float32 targets for every cached row. Each step gathers its B rows in their stored
dtypes (fp16 logits or top-k, fp16 features, fp16 CLIP image embeddings) and turns them into targets here,
on the training device: eq. 2-3 (CLIP's logits from its embeddings and the prompt set's text embeddings),
eq. 4 (with a fixed alpha or an adaptive rule), eq. 7's parts (the fixed joint space for cosine/MSE, raw
parts for CRD), several CLIP models' ensemble, top-k rebuilt into full distributions. What depends on every
row (the joint space's centring and scales, alpha*'s error sums, the ensemble's feature scales) is computed
once, by a streaming pass, and held in `FusionState`. Everything here is a pure function of tensors.

Rows are keyed by the cache's array names: "teacher/logits" (B, C) or "teacher/topk_values" and
"teacher/topk_indices" (B, k), "teacher/features" (B, Ft), and per CLIP model its `embeds` (B, D) and
`features` (B, Fc) arrays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from richkd_cache.clip_logits import clip_logits, ensemble_logits
from richkd_cache.distill.adaptive import confidence_alphas
from richkd_cache.distill.fusion import JointSpace, build_targets, logits_from_topk


@dataclass(frozen=True)
class ClipPart:
    """One CLIP model a target uses: the names of its cached rows, its prompt set and tau (eq. 2-3)."""

    name: str
    embeds: str  # array name of its image embeddings (N, Vc, D)
    features: str  # array name of its pooled features (N, Vc, Fc)
    text: torch.Tensor | None  # (M, C, D) float32 text embeddings of the prompt set; None: no CLIP logits
    tau: float
    feature_scale: float = 1.0  # several models: 1 / root mean squared centred norm of its features (eq. 7)


@dataclass(frozen=True)
class FusionState:
    """Everything a batch's targets need besides its rows; small, and placed on the training device."""

    target: str  # kd | clip | richkd
    num_classes: int
    clips: tuple[ClipPart, ...] = ()
    renormalize: bool = False  # re-normalise the mean text embedding (the CLIP notebook's variant)
    alpha: float | str = 0.7  # eq. 4: a fixed weight or an adaptive rule
    # auto / per-class: alpha* of each class, (C,) float32 (auto: every class the same), from error sums
    # over the trained rows; confidence is computed per row; a fixed alpha needs none
    alpha_table: torch.Tensor | None = None
    space: JointSpace | None = None  # cosine/MSE with the richkd target: the fixed joint feature space
    features: bool = False  # whether the targets include feature parts (a feature loss reads them)

    @property
    def uses_clip_logits(self) -> bool:
        return bool(self.clips) and self.clips[0].text is not None

    def to(self, device: torch.device) -> "FusionState":
        """The state with its tensors on `device` (once per run, not per batch)."""
        clips = tuple(dataclasses.replace(c, text=None if c.text is None else c.text.to(device)) for c in self.clips)
        table = None if self.alpha_table is None else self.alpha_table.to(device)
        space = self.space
        if space is not None:
            space = dataclasses.replace(space, teacher_mean=space.teacher_mean.to(device),
                                        clip_mean=space.clip_mean.to(device))
        return dataclasses.replace(self, clips=clips, alpha_table=table, space=space)


def teacher_rows_logits(rows: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """The teacher's logits (.., C) float32: stored, or a full distribution rebuilt from its top-k."""
    if "teacher/logits" in rows:
        return rows["teacher/logits"].float()
    return logits_from_topk(rows["teacher/topk_values"].float(), rows["teacher/topk_indices"].long(), num_classes)


def clip_rows_logits(state: FusionState, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """CLIP's logits (.., C) float32 (eq. 2-3); several models ensembled; None without a prompt set."""
    if not state.uses_clip_logits:
        return None
    per_model = [clip_logits(rows[c.embeds], c.text, c.tau, renormalize=state.renormalize) for c in state.clips]
    return ensemble_logits(per_model)


def clip_rows_features(state: FusionState, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """f_C of eq. 7 (.., Fc) float32: one model's features, or several side by side, each at its scale."""
    if not state.clips or state.clips[0].features not in rows:
        return None
    if len(state.clips) == 1:
        return rows[state.clips[0].features].float()
    return torch.cat([rows[c.features].float() * c.feature_scale for c in state.clips], dim=-1)


def row_alpha(state: FusionState, z_t: torch.Tensor, z_c: torch.Tensor | None,
              labels: torch.Tensor) -> float | torch.Tensor:
    """eq. 4's alpha for each row: the fixed number, or (B, 1) from the adaptive rule."""
    if not isinstance(state.alpha, str) or state.target != "richkd":
        return state.alpha
    if state.alpha == "confidence":
        return confidence_alphas(z_t, z_c, labels)[:, None]
    return state.alpha_table[labels.long()][:, None]


def fuse_batch(state: FusionState, rows: dict[str, torch.Tensor],
               labels: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """A batch's target logits (B, C) and feature parts {"teacher": (B, Ft), "clip": (B, Fc)} from its rows
    (B, X) and labels (B,): eq. 2-4 and 7. Teacher row b and CLIP row b are the pair the student's
    view b is distilled from (CLIP's clean view, or the same view when the cache stores CLIP per view)."""
    z_t = teacher_rows_logits(rows, state.num_classes) if state.target != "clip" else None
    z_c = clip_rows_logits(state, rows) if state.target != "kd" else None  # eq. 2-3
    wanted = state.features
    built = build_targets(
        state.target, teacher_logits=z_t, clip_logits=z_c,
        teacher_feats=rows["teacher/features"].float() if wanted and "teacher/features" in rows else None,
        clip_feats=clip_rows_features(state, rows) if wanted else None,
        alpha=row_alpha(state, z_t, z_c, labels) if z_t is not None and z_c is not None else state.alpha,
        space=state.space if wanted else None,
    )
    parts = {name: built[f"{name}_features"] for name in ("teacher", "clip") if built.get(f"{name}_features") is not None}
    return built.get("logits"), parts
