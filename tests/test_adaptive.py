"""Adaptive fusion weights (eq. 4's alpha from the cache), against the supplement's formula written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import richkd_cache.distill.adaptive as adaptive
from richkd_cache.distill import fuse_logits
from richkd_cache.errors import ConfigError


def supplement_alpha(z_t: np.ndarray, z_c: np.ndarray, y: np.ndarray) -> float:
    """Sec. 9: alpha* = (s_c^2 - rho s_t s_c) / (s_t^2 + s_c^2 - 2 rho s_t s_c), errors = softmax - one-hot."""
    def errors(z):
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return (p - np.eye(z.shape[1])[y]).ravel()

    e_t, e_c = errors(z_t), errors(z_c)
    s_t, s_c = e_t.std(), e_c.std()
    rho = np.corrcoef(e_t, e_c)[0, 1]
    alpha = (s_c**2 - rho * s_t * s_c) / (s_t**2 + s_c**2 - 2 * rho * s_t * s_c)
    return float(np.clip(alpha, 0, 1))


@pytest.fixture
def cached_rows():
    """Teacher logits that are good on classes 0-2 and noise on 3-5; CLIP the other way round."""
    g = torch.Generator().manual_seed(0)
    n, c = 600, 6
    y = torch.arange(n) % c
    signal = torch.nn.functional.one_hot(y, c).float() * 4
    good_t = (y < 3).float()[:, None]
    z_t = signal * good_t + torch.randn(n, c, generator=g) * 1.5
    z_c = signal * (1 - good_t) + torch.randn(n, c, generator=g) * 1.5
    return z_t, z_c, y


def test_per_class_alpha_is_the_supplements_formula_on_each_class(cached_rows, monkeypatch) -> None:
    z_t, z_c, y = cached_rows
    monkeypatch.setattr(adaptive, "_CHUNK", 97)  # sums over uneven chunks equal the whole-array statistics
    got = adaptive.class_alphas(adaptive.error_sums(z_t, z_c, y))
    for k in range(6):
        rows = (y == k).numpy()
        expected = supplement_alpha(z_t.numpy()[rows], z_c.numpy()[rows], y.numpy()[rows])
        assert got[k].item() == pytest.approx(expected, abs=1e-5)
    assert got[:3].min() > 0.5 > got[3:].max()  # the teacher is trusted where it is the better one


def test_auto_alpha_is_the_formula_over_every_row(cached_rows) -> None:
    z_t, z_c, y = cached_rows
    alphas = adaptive.row_alphas("auto", z_t, z_c, y)
    assert alphas.shape == (600,) and alphas.unique().numel() == 1
    assert alphas[0].item() == pytest.approx(supplement_alpha(z_t.numpy(), z_c.numpy(), y.numpy()), abs=1e-5)


def test_confidence_alpha_weighs_the_teacher_that_is_more_right(cached_rows) -> None:
    z_t, z_c, y = cached_rows
    alphas = adaptive.row_alphas("confidence", z_t, z_c, y)
    q_t = z_t.softmax(1)[torch.arange(600), y]
    q_c = z_c.softmax(1)[torch.arange(600), y]
    assert torch.allclose(alphas, q_t / (q_t + q_c))
    fused = fuse_logits(z_t, z_c, alphas[:, None])  # eq. 4, one alpha per row
    assert torch.allclose(fused[5], alphas[5] * z_t[5] + (1 - alphas[5]) * z_c[5])
    fused_acc = (fused.argmax(1) == y).float().mean()
    assert fused_acc > max((z_t.argmax(1) == y).float().mean(), (z_c.argmax(1) == y).float().mean())


@pytest.mark.parametrize("text", ["1.5", "-0.1", "sometimes"])
def test_bad_alpha_is_refused(text: str) -> None:
    from pipelines.config import TrainConfig

    with pytest.raises(ConfigError, match="alpha"):
        TrainConfig(student="resnet8", out="-", alpha=adaptive.parse_alpha(text))
    assert adaptive.parse_alpha("0.3") == 0.3 and adaptive.parse_alpha("per-class") == "per-class"


def test_training_targets_use_each_rows_adaptive_alpha() -> None:
    """fuse_batch with --alpha per-class: every (sample, view) row is fused with its class's alpha*, the clean
    CLIP row paired with each teacher view."""
    from richkd_cache.distill.batch import ClipPart, FusionState, fuse_batch

    g = torch.Generator().manual_seed(1)
    n, v, c, d = 40, 3, 4, 8
    y = torch.arange(n) % c
    text = torch.nn.functional.normalize(torch.randn(2, c, d, generator=g), dim=-1)
    z_t = torch.randn(n, v, c, generator=g).half().float()
    embeds = torch.nn.functional.normalize(torch.randn(n, 1, d, generator=g), dim=-1).half()
    z_c = 10.0 * embeds.float() @ text.mean(0).T  # eq. 3
    sums = adaptive.error_sums(z_t.reshape(-1, c), z_c.expand(n, v, c).reshape(-1, c), y.repeat_interleave(v))
    per_class = adaptive.class_alphas(sums)
    state = FusionState("richkd", c, (ClipPart("m", "clip/image_embeds", "clip/features", text, 10.0),),
                        alpha="per-class", alpha_table=per_class)
    rows = {"teacher/logits": z_t.reshape(n * v, c).half(),  # each (sample, view) row with its sample's CLIP row
            "clip/image_embeds": embeds.expand(n, v, d).reshape(n * v, d)}
    logits, parts = fuse_batch(state, rows, y.repeat_interleave(v))
    expected = per_class[y][:, None, None] * z_t + (1 - per_class[y][:, None, None]) * z_c  # eq. 4 per row
    assert torch.allclose(logits, expected.reshape(n * v, c), atol=1e-5) and parts == {}
    assert per_class.unique().numel() > 1  # the rule really varies by class
