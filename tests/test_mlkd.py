"""MLKD's loss against its formulas written out here with numpy loops (mdistiller/distillers/KD_ours.py of
Jin-Ying/Multi-Level-Logit-Distillation), on targets whose confidence masks are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from richkd_cache.distill import create_objective, get_logit_loss
from richkd_cache.errors import ConfigError

B, C = 5, 4
LEVELS = (4.0, 3.0, 5.0, 2.0, 6.0)  # CFG.KD.TEMPERATURE and the four written into KD_ours.py


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kd(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """T^2 * mean over samples of KL(softmax(t/T) || softmax(s/T))."""
    total = 0.0
    for i in range(len(s)):
        p, q = softmax(t[i] / T), softmax(s[i] / T)
        total += sum(p[c] * (math.log(p[c]) - math.log(q[c])) for c in range(len(p)))
    return T * T * total / len(s)


def gram_gap(s: np.ndarray, t: np.ndarray, T: float, over_classes: bool) -> float:
    """sum of squared differences of prediction correlations: class pairs (j, k) over samples divided by C,
    or sample pairs (i, l) over classes divided by B."""
    ps = np.array([softmax(r / T) for r in s])
    pt = np.array([softmax(r / T) for r in t])
    # class pairs correlate columns over the samples; sample pairs are the same on the transposes
    a_s, a_t = (ps, pt) if over_classes else (ps.T, pt.T)
    rows, cols = a_s.shape
    total = 0.0
    for j in range(cols):
        for k in range(cols):
            g_t = sum(a_t[i, j] * a_t[i, k] for i in range(rows))
            g_s = sum(a_s[i, j] * a_s[i, k] for i in range(rows))
            total += (g_t - g_s) ** 2
    return total / cols


def mlkd_by_hand(s_w, t_w, s_s, t_s, sample_share: float, class_share: float) -> dict[str, float]:
    weak = sum(kd(s_w, t_w, T) for T in LEVELS)
    # KD_ours.py's loss_kd_strong: the strong view at 4, 3 and 5, the weak view (unmasked) at 2 and 6
    strong = sum(kd(s_s, t_s, T) for T in LEVELS[:3]) + sum(kd(s_w, t_w, T) for T in LEVELS[3:])
    return {
        "kd": sample_share * weak + strong,
        "cc": class_share * sum(gram_gap(s_w, t_w, T, over_classes=True) for T in LEVELS),
        "bc": sample_share * sum(gram_gap(s_w, t_w, T, over_classes=False) for T in LEVELS),
    }


@pytest.fixture
def views():
    """Weak-view targets with a known confidence order: row i is (i, 0, 0, 0), so sample i's confidence
    grows with i, and classes 1-3 get exactly equal summed probabilities, all below class 0's (about 3.25
    against 0.58 each)."""
    g = torch.Generator().manual_seed(3)
    t_w = torch.zeros(B, C, dtype=torch.float64)
    t_w[:, 0] = torch.arange(B, dtype=torch.float64)
    s_w, s_s, t_s = (torch.randn(B, C, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    return s_w, t_w, s_s, t_s


@pytest.mark.parametrize("percentile, sample_share", [(50.0, 3 / 5), (25.0, 2 / 5)])
def test_mlkd_is_its_reference_formulas(views, percentile: float, sample_share: float) -> None:
    # median of 5 increasing confidences is the 3rd: samples 0-2 are at or below it (3/5); the 25th percentile
    # is the 2nd (2/5). The class sums are [a, b, b, b] with b < a: either percentile is b, 3 of 4 classes.
    s_w, t_w, s_s, t_s = views
    got = get_logit_loss("mlkd")(s_w, t_w, torch.zeros(B, dtype=torch.long), student_strong=s_s, target_strong=t_s,
                                 temperature=4.0, percentile=percentile)
    expected = mlkd_by_hand(*(v.numpy() for v in views), sample_share=sample_share, class_share=3 / 4)
    assert set(got) == {"kd", "cc", "bc"}
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, rel=1e-9), name


def test_mlkd_trains_with_its_reference_weights(views) -> None:
    """CFG.KD: CE weight 0.1 on the CE of both views, 0.9 on every distillation term, T = 4 first."""
    s_w, t_w, s_s, t_s = views
    y = torch.tensor([0, 1, 2, 3, 0])
    objective = create_objective("richkd", "mlkd", None, student_dim=4)
    assert objective.strong_view
    terms = objective(s_w, torch.zeros(B, 4), y, target_logits=t_w, strong_logits=s_s, strong_target_logits=t_s)
    expected = mlkd_by_hand(*(v.numpy() for v in views), sample_share=3 / 5, class_share=3 / 4)
    ce = sum(-math.log(softmax(z[i].numpy())[int(y[i])]) for z in (s_w, s_s) for i in range(B)) / B
    assert terms["ce"].item() == pytest.approx(0.1 * ce, rel=1e-9)
    assert {k: v.item() for k, v in terms.items() if k != "ce"} == pytest.approx(
        {f"logit_{k}": 0.9 * v for k, v in expected.items()}, rel=1e-9)


def test_mlkd_gradients_reach_only_the_student_on_both_views(views) -> None:
    s_w, t_w, s_s, t_s = (v.clone().requires_grad_(True) for v in views)
    objective = create_objective("kd", "mlkd", None, student_dim=4)
    terms = objective(s_w, torch.zeros(B, 4), torch.zeros(B, dtype=torch.long), target_logits=t_w,
                      strong_logits=s_s, strong_target_logits=t_s)
    sum(terms.values()).backward()
    assert s_w.grad is not None and s_s.grad is not None and t_w.grad is None and t_s.grad is None


def test_mlkd_without_a_strong_view_is_a_config_error(views) -> None:
    s_w, t_w, _, _ = views
    objective = create_objective("richkd", "mlkd", None, student_dim=4)
    with pytest.raises(ConfigError, match="mlkd also trains on a strong view"):
        objective(s_w, torch.zeros(B, 4), torch.zeros(B, dtype=torch.long), target_logits=t_w)
    assert not create_objective("richkd", "kd", None, student_dim=4).strong_view
    with pytest.raises(ConfigError, match="percentile must be <= 100"):
        create_objective("richkd", "mlkd", None, student_dim=4, logit_params={"percentile": 150.0})
