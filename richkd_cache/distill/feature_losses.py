"""Feature distillation losses (eq. 8): the student's pooled feature against a cached target feature.

Each is a small module holding only student-side learned maps, trained with the student. The target
(f_T, or f_F of eq. 7) is fixed per sample and detached, so it cannot collapse towards the student.
forward(student_feats (B, Fs), target_feats (B, Ft), index (B,) sample indices) -> scalar.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.errors import ConfigError


class CosineFeatureLoss(nn.Module):
    """1 - cos(P f_S, f_F), P a learned linear map Fs -> Ft (never assumed to be the identity)."""

    def __init__(self, student_dim: int, target_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, target_dim)

    def forward(self, student: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return (1.0 - F.cosine_similarity(self.proj(student), target.detach(), dim=1)).mean()


class MSEFeatureLoss(nn.Module):
    """FitNet-style: mean squared error between P f_S (P linear + batch norm) and f_F."""

    def __init__(self, student_dim: int, target_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(student_dim, target_dim), nn.BatchNorm1d(target_dim))

    def forward(self, student: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return F.mse_loss(self.proj(student), target.detach())


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian et al.), with memory banks keyed by sample index.

    Student and target features are embedded (linear, L2-normalised, `feat_dim`), then each is
    contrasted against the other side's memory bank: its own sample as the positive, K samples drawn
    uniformly from the whole bank as negatives (CRD's draw when no per-class negative list is given),
    with NCE. Both embedding heads are learned (as in CRD): the negatives, not a fixed
    target, keep them from collapsing. The banks are buffers: they move with .to() and are saved in
    the state_dict, so a resumed run continues with them. The sample index is the cache's row.
    """

    def __init__(self, student_dim: int, target_dim: int, num_samples: int, feat_dim: int = 128,
                 num_negatives: int = 16384, nce_t: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(target_dim, feat_dim)
        self.num_samples, self.k = num_samples, min(num_negatives, num_samples - 1)
        self.nce_t, self.momentum = nce_t, momentum
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("z_s", torch.tensor(-1.0))  # NCE partition constants, set on first use
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_set = False  # avoids reading z back from the device (a sync) on every step
        self.register_load_state_dict_post_hook(_recheck_normalisers)

    def forward(self, student: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            raise ConfigError("CRD needs the sample index of every row of the batch")
        v_s = F.normalize(self.embed_s(student), dim=1)  # (B, D)
        v_t = F.normalize(self.embed_t(target.detach()), dim=1)
        b = len(index)
        idx = torch.randint(0, self.num_samples, (b, self.k + 1), device=index.device)
        idx[:, 0] = index  # column 0: the positive
        out_s = self._scores(self.memory_t[idx], v_s, "z_s")  # student vs target bank, (B, K + 1)
        out_t = self._scores(self.memory_s[idx], v_t, "z_t")
        self._z_set = True  # both normalisers are set now (or were loaded from a state_dict)
        self._update(self.memory_s, index, v_s)
        self._update(self.memory_t, index, v_t)
        return self._nce(out_s) + self._nce(out_t)

    def _scores(self, bank_rows: torch.Tensor, v: torch.Tensor, z_name: str) -> torch.Tensor:
        scores = torch.exp(torch.bmm(bank_rows.detach(), v[:, :, None]).squeeze(2) / self.nce_t)
        z = getattr(self, z_name)
        if not self._z_set and z.item() < 0:  # estimate the normaliser once from the first batch, as CRD does
            z.fill_(scores.mean().item() * self.num_samples)
        return scores / z

    @torch.no_grad()
    def _update(self, bank: torch.Tensor, index: torch.Tensor, v: torch.Tensor) -> None:
        rows = bank[index] * self.momentum + v.detach() * (1 - self.momentum)
        bank[index] = F.normalize(rows, dim=1)

    def _nce(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE with noise distribution 1/N: positive vs K noise samples."""
        m_pn = self.k / self.num_samples
        pos, neg = scores[:, 0], scores[:, 1:]
        log_d1 = torch.log(pos / (pos + m_pn + 1e-7))
        log_d0 = torch.log(m_pn / (neg + m_pn + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def _recheck_normalisers(module: CRDLoss, incompatible_keys: object) -> None:
    """Loaded normalisers may be unset (-1): look at them again on the next step."""
    module._z_set = False


FEATURE_LOSSES = {"cosine": CosineFeatureLoss, "mse": MSEFeatureLoss, "crd": CRDLoss}


def list_feature_losses() -> list[str]:
    return list(FEATURE_LOSSES)


def create_feature_loss(name: str, student_dim: int, target_dim: int, num_samples: int | None = None, **hyper) -> nn.Module:
    if name not in FEATURE_LOSSES:
        raise ConfigError(f"unknown feature loss {name!r}; valid: {', '.join(FEATURE_LOSSES)}")
    if name == "crd":
        if not num_samples or num_samples < 2:
            raise ConfigError("the crd feature loss needs the number of training samples (its memory bank)")
        return CRDLoss(student_dim, target_dim, num_samples, **hyper)
    return FEATURE_LOSSES[name](student_dim, target_dim, **hyper)
