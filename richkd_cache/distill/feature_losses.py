"""Feature distillation losses (eq. 8): the student's pooled feature against cached target features.

forward(student (B, Fs), target {"teacher": (B, Ft), "clip": (B, Fc)} (the parts a target carries,
fusion.FEATURE_PARTS), index (B,) dataset sample indices) -> scalar.

Cosine and MSE hold only student-side maps: their target (f_T, f_C, or the fixed fused f_F of
fusion.JointSpace, whose two blocks arrive as the two parts) is detached and cannot move. CRD learns
its target-side embeddings too (as in CRD and the authors' RichKD.py); its negatives keep them from
collapsing.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd_cache.errors import ConfigError

PARTS = ("teacher", "clip")


def stack_parts(target: dict[str, torch.Tensor]) -> torch.Tensor:
    """The target parts side by side, (B, sum of widths), in PARTS order (f_F of JointSpace for richkd)."""
    return torch.cat([target[name].float() for name in PARTS if name in target], dim=1).detach()


class CosineFeatureLoss(nn.Module):
    """1 - cos(P f_S, f), P a learned linear map Fs -> the target's width (never assumed the identity)."""

    def __init__(self, student_dim: int, target_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, target_dim)

    def forward(self, student: torch.Tensor, target: dict[str, torch.Tensor],
                index: torch.Tensor | None = None) -> torch.Tensor:
        return (1.0 - F.cosine_similarity(self.proj(student), stack_parts(target), dim=1)).mean()


class MSEFeatureLoss(nn.Module):
    """FitNet-style: mean squared error between P f_S (P linear + batch norm) and the target."""

    def __init__(self, student_dim: int, target_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(student_dim, target_dim), nn.BatchNorm1d(target_dim))

    def forward(self, student: torch.Tensor, target: dict[str, torch.Tensor],
                index: torch.Tensor | None = None) -> torch.Tensor:
        return F.mse_loss(self.proj(student), stack_parts(target))


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian et al.) over the fused teacher (eq. 7 after embedding).

    Embeddings: the student's linear + L2 norm (feat_dim 128, mdistiller's CFG.CRD.FEAT.DIM); each target
    part's own linear + L2 norm, fused as normalize(lam e_T + (1 - lam) e_C) (RichKD.py; one part: its
    embedding alone). Each side is scored against the other side's memory bank: column 0 the anchor's own
    row ("exact" mode), then K negatives drawn without replacement from samples of *other* classes
    (mdistiller's CIFAR100InstanceSample), with NCE (noise 1/P; K 16384, T 0.07, momentum 0.5: mdistiller
    CFG.CRD.NCE).

    The banks hold one row per trained sample (P = len(trained)): only samples trained on are updated
    and only they are drawn. K is capped at the smallest other-class pool so every draw can be without
    replacement (CIFAR-100: 49,500 >= 16,384, the reference's case). The draws use the module's own
    generator, whose state is saved in the state_dict (extra state), so a resumed run draws exactly what
    a straight one would.
    """

    def __init__(self, student_dim: int, teacher_dim: int | None, clip_dim: int | None, labels: torch.Tensor,
                 trained: torch.Tensor | None = None, *, lam: float = 0.7, feat_dim: int = 128,
                 num_negatives: int = 16384, nce_t: float = 0.07, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if teacher_dim is None and clip_dim is None:
            raise ConfigError("CRD needs target features: the teacher's, CLIP's or both")
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(teacher_dim, feat_dim) if teacher_dim else None
        self.embed_c = nn.Linear(clip_dim, feat_dim) if clip_dim else None
        self.lam, self.nce_t, self.momentum, self.seed = lam, nce_t, momentum, seed
        rows, row_class = _bank_rows(labels, trained)
        self.register_buffer("row_of", rows, persistent=False)  # (N,) dataset index -> bank row, -1: not trained
        self.register_buffer("row_class", row_class, persistent=False)  # (P,) class of each bank row
        self.num_rows = len(row_class)
        self.k = min(num_negatives, self.num_rows - int(torch.bincount(row_class).max()))
        if self.k < 1:
            raise ConfigError("CRD needs training samples of at least two classes (its negatives are other classes)")
        bound = 1.0 / math.sqrt(feat_dim / 3)  # CRD's initial bank, uniform in +-bound
        self.register_buffer("memory_s", torch.rand(self.num_rows, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(self.num_rows, feat_dim) * 2 * bound - bound)
        self.register_buffer("z_s", torch.tensor(-1.0))  # NCE partition constants, set on first use
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_set = False  # avoids reading z back from the device (a sync) on every step
        self._generator: torch.Generator | None = None
        self._saved_draws: dict | None = None  # generator state loaded from a state_dict, applied on first use
        self.register_load_state_dict_post_hook(_recheck_normalisers)

    def forward(self, student: torch.Tensor, target: dict[str, torch.Tensor],
                index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            raise ConfigError("CRD needs the sample index of every row of the batch")
        v_s = F.normalize(self.embed_s(student), dim=1)  # (B, D)
        v_t = self.target_embedding(target)  # (B, D)
        rows = self.contrast_rows(index)  # (B, K + 1)
        out_s = self._scores(self.memory_t[rows], v_s, "z_s")  # the student against the target bank
        out_t = self._scores(self.memory_s[rows], v_t, "z_t")
        self._z_set = True  # both normalisers are set now (or were loaded from a state_dict)
        self._update(self.memory_s, rows[:, 0], v_s)
        self._update(self.memory_t, rows[:, 0], v_t)
        return self._nce(out_s) + self._nce(out_t)

    def step_bytes(self, batch: int) -> int:
        """Working memory of one step at `batch` rows: the random keys over every bank row (B, P) float32,
        the negatives' indices (B, K) int64, and on each side the gathered bank rows (B, K + 1, D) float32,
        kept for the backward pass, and their scores' gradient (as large)."""
        dim = self.memory_s.shape[1]
        return batch * (4 * self.num_rows + 8 * self.k + 2 * 2 * 4 * (self.k + 1) * dim)

    def target_embedding(self, target: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fused teacher's embedding (B, D): eq. 7 after embedding, normalised (RichKD.py)."""
        parts = []
        for name, embed in (("teacher", self.embed_t), ("clip", self.embed_c)):
            if embed is not None:
                if name not in target:
                    raise ConfigError(f"CRD was built for {name} features, but the target has none")
                parts.append(F.normalize(embed(target[name].detach().float()), dim=1))
        if len(parts) == 1:
            return parts[0]
        return F.normalize(self.lam * parts[0] + (1.0 - self.lam) * parts[1], dim=1)

    def contrast_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Bank rows (B, K + 1): the anchors' own, then K distinct rows of other classes per anchor.

        Random keys (B, P) with the anchor's class pushed past every other, the K smallest taken: a
        uniform draw without replacement from the other classes (np.random.choice(replace=False)).
        """
        anchors = self.row_of[index.to(self.row_of.device)]  # (B,)
        keys = torch.rand(len(anchors), self.num_rows, generator=self._draws(), device=self.row_of.device)
        keys.masked_fill_(self.row_class[None, :] == self.row_class[anchors][:, None], 2.0)
        negatives = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
        return torch.cat([anchors[:, None], negatives], dim=1)

    def _draws(self) -> torch.Generator:
        """The generator of the negative draws, on the banks' device (seeded, or as loaded)."""
        device = self.row_of.device
        if self._generator is None or self._generator.device != device:
            self._generator = self._new_generator(device, self._saved_draws)
        self._saved_draws = None  # from here on the generator's own state is the one to save
        return self._generator

    def _new_generator(self, device: torch.device, saved: dict | None) -> torch.Generator:
        generator = torch.Generator(device=device)
        if saved is None:
            generator.manual_seed(self.seed)
        elif saved["device"] == device.type:
            generator.set_state(saved["state"])
        else:  # saved on another kind of device, whose generator state does not fit: a seed derived from it
            digest = hashlib.sha256(saved["state"].numpy().tobytes()).digest()
            generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return generator

    def get_extra_state(self) -> dict:
        """The draws' generator state (uint8) and the device kind it belongs to: saved with the banks."""
        if self._generator is None:
            return self._saved_draws or {"device": "", "state": torch.zeros(0, dtype=torch.uint8)}
        return {"device": self._generator.device.type, "state": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the draws; a malformed state (an untrusted file) fails here, inside load_state_dict."""
        tensor = state.get("state") if isinstance(state, dict) else None
        if not (torch.is_tensor(tensor) and tensor.dtype == torch.uint8 and tensor.ndim == 1
                and isinstance(state.get("device"), str)):
            raise ValueError("CRD's saved draw state is not a device name and a uint8 generator state")
        self._saved_draws = {"device": state["device"], "state": tensor.cpu()} if state["device"] else None
        self._generator = self._new_generator(self.row_of.device, self._saved_draws)  # a state that does not fit fails now

    def _scores(self, bank_rows: torch.Tensor, v: torch.Tensor, z_name: str) -> torch.Tensor:
        scores = torch.exp(torch.bmm(bank_rows.detach(), v[:, :, None]).squeeze(2) / self.nce_t)
        z = getattr(self, z_name)
        if not self._z_set and z.item() < 0:  # estimated once from the first batch, as CRD does
            z.fill_(scores.mean().item() * self.num_rows)
        return scores / z

    @torch.no_grad()
    def _update(self, bank: torch.Tensor, rows: torch.Tensor, v: torch.Tensor) -> None:
        updated = bank[rows] * self.momentum + v.detach() * (1 - self.momentum)
        bank[rows] = F.normalize(updated, dim=1)

    def _nce(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE with noise distribution 1/P: the positive vs K noise samples."""
        m_pn = self.k / self.num_rows
        pos, neg = scores[:, 0], scores[:, 1:]
        log_d1 = torch.log(pos / (pos + m_pn + 1e-7))
        log_d0 = torch.log(m_pn / (neg + m_pn + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def _bank_rows(labels: torch.Tensor, trained: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) dataset index -> bank row (-1 for samples not trained on) and (P,) the class of each row."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    trained = torch.arange(len(labels)) if trained is None else torch.as_tensor(trained, dtype=torch.long).unique()
    if len(trained) == 0 or trained.min() < 0 or trained.max() >= len(labels):
        raise ConfigError(f"CRD's trained samples must be indices of the {len(labels)} labelled samples")
    rows = torch.full((len(labels),), -1, dtype=torch.long)
    rows[trained] = torch.arange(len(trained))
    return rows, labels[trained]


def _recheck_normalisers(module: CRDLoss, incompatible_keys: object) -> None:
    """Loaded normalisers may be unset (-1): look at them again on the next step."""
    module._z_set = False


FEATURE_LOSSES = {"cosine": CosineFeatureLoss, "mse": MSEFeatureLoss, "crd": CRDLoss}


def list_feature_losses() -> list[str]:
    return list(FEATURE_LOSSES)


def create_feature_loss(name: str, student_dim: int, teacher_dim: int | None = None, clip_dim: int | None = None,
                        *, labels: torch.Tensor | None = None, trained: torch.Tensor | None = None,
                        lam: float = 0.7, seed: int = 0, **hyper) -> nn.Module:
    """A feature loss by name. teacher_dim / clip_dim: the widths of the target parts (None: absent).

    crd needs `labels` (N,) of every sample (its negatives are other classes) and `trained`, the sample
    indices trained on (its memory bank; default all); `lam` fuses the parts (eq. 7), `seed` its draws.
    """
    if name not in FEATURE_LOSSES:
        raise ConfigError(f"unknown feature loss {name!r}; valid: {', '.join(FEATURE_LOSSES)}")
    if name == "crd":
        if labels is None:
            raise ConfigError("the crd feature loss needs the training labels (its negatives are other classes)")
        return CRDLoss(student_dim, teacher_dim, clip_dim, labels, trained, lam=lam, seed=seed, **hyper)
    width = (teacher_dim or 0) + (clip_dim or 0)
    if width == 0:
        raise ConfigError(f"the {name} feature loss needs target features")
    return FEATURE_LOSSES[name](student_dim, width, **hyper)
