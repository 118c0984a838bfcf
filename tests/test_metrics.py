"""Teacher statistics on hand-made logits whose answers are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from richkd_cache.errors import DataError
from richkd_cache.metrics import (
    alpha_sweep,
    confidence_categories,
    errors_to_statistics,
    expected_calibration_error,
    fusion_weight,
    optimal_alpha,
    outcome_changes,
    prediction_errors,
    topk_accuracy,
)


def ranked(label: int, rank: int, num_classes: int = 6) -> list[float]:
    """Logits of one sample in which `label` is the rank-th largest (0: the top-1)."""
    others = [c for c in range(num_classes) if c != label]
    order = others[:rank] + [label] + others[rank:]  # classes from the largest logit down
    logits = [0.0] * num_classes
    for position, c in enumerate(order):
        logits[c] = float(num_classes - position)
    return logits


def test_topk_accuracy_counts_the_label_among_the_k_largest() -> None:
    logits = torch.tensor([ranked(0, 0), ranked(1, 1), ranked(2, 4), ranked(3, 5)])
    labels = torch.tensor([0, 1, 2, 3])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(25.0)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(50.0)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(75.0)
    assert topk_accuracy(logits.numpy(), labels.numpy(), 100) == pytest.approx(100.0)  # k capped at C


def test_confidence_categories_cross_confidence_with_correctness() -> None:
    probs = np.array([
        [0.90, 0.05, 0.05],  # label 0: confident, correct
        [0.60, 0.30, 0.10],  # label 1: confident, wrong
        [0.70, 0.20, 0.10],  # label 2: confident, wrong
        [0.40, 0.35, 0.25],  # label 0: uncertain, correct
        [0.30, 0.45, 0.25],  # label 2: uncertain, wrong
    ])
    counts = confidence_categories(np.log(probs), np.array([0, 1, 2, 0, 2]), threshold=0.5)
    assert counts == {"confident_correct": 1, "confident_wrong": 2, "uncertain_correct": 1, "uncertain_wrong": 1}
    # a top probability of exactly the threshold is confident; the tie goes to the first class
    assert confidence_categories(torch.zeros(1, 2), torch.tensor([0]))["confident_correct"] == 1
    assert confidence_categories(np.log(probs), np.array([0, 1, 2, 0, 2]), threshold=0.95)["confident_correct"] == 0


def test_outcome_changes_follow_table_10() -> None:
    # (label rank before, label rank after) per sample, label 0 everywhere, 6 classes (rank 5: outside the top-5)
    ranks = [(2, 0), (5, 0), (0, 2), (0, 5), (0, 0), (5, 5)]
    before = torch.tensor([ranked(0, r) for r, _ in ranks])
    after = torch.tensor([ranked(0, r) for _, r in ranks])
    changes = outcome_changes(before, after, torch.zeros(len(ranks), dtype=torch.long))
    # wrong before: samples 0, 1, 5; of those right after: 0, 1
    assert changes["wrong_to_correct"] == {"base": 3, "count": 2, "percent": pytest.approx(200 / 3)}
    # outside the top-5 before: 1, 5; right after: 1
    assert changes["outside_top5_to_correct"] == {"base": 2, "count": 1, "percent": pytest.approx(50.0)}
    # right before: 2, 3, 4; wrong after: 2, 3; outside the top-5 after: 3
    assert changes["correct_to_wrong"] == {"base": 3, "count": 2, "percent": pytest.approx(200 / 3)}
    assert changes["correct_to_outside_top5"] == {"base": 3, "count": 1, "percent": pytest.approx(100 / 3)}


def test_outcome_changes_refuse_logits_of_other_shapes() -> None:
    with pytest.raises(DataError, match="shape"):
        outcome_changes(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))


def test_ece_on_a_hand_computed_case() -> None:
    probs = np.array([
        [0.90, 0.05, 0.05],  # conf .9, label 0: right
        [0.10, 0.80, 0.10],  # conf .8, label 0: wrong
        [0.20, 0.10, 0.70],  # conf .7, label 2: right
        [0.60, 0.20, 0.20],  # conf .6, label 0: right
        [0.40, 0.30, 0.30],  # conf .4, label 1: wrong
    ])
    ece, table = expected_calibration_error(probs, np.array([0, 0, 2, 0, 1]), bins=4)
    # bins (0, .25] empty; (.25, .5]: {.4} acc 0 conf .4; (.5, .75]: {.7, .6} acc 1 conf .65; (.75, 1]: {.9, .8} acc .5 conf .85
    # ECE = 1/5 * .4 + 2/5 * .35 + 2/5 * .35 = .36
    assert ece == pytest.approx(0.36)
    assert [row["count"] for row in table] == [0, 1, 2, 2]
    assert table[0]["accuracy"] is None and table[0]["confidence"] is None
    assert table[2]["accuracy"] == pytest.approx(1.0) and table[2]["confidence"] == pytest.approx(0.65)
    assert table[3]["lower"] == pytest.approx(0.75) and table[3]["upper"] == pytest.approx(1.0)


def test_ece_bins_are_closed_on_the_right() -> None:
    _, table = expected_calibration_error(np.array([[0.5, 0.25, 0.25]]), np.array([0]), bins=4)
    assert [row["count"] for row in table] == [0, 1, 0, 0]  # 0.5 lies in (.25, .5], not (.5, .75]


def orthonormal_errors(s_t: float, s_c: float, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors with exactly these population statistics: u, v are zero-mean, unit-variance, orthogonal."""
    u = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    v = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    return s_t * u + 0.3, s_c * (rho * u + math.sqrt(1 - rho**2) * v) - 0.2  # constant biases do not count


@pytest.mark.parametrize(
    ("s_t", "s_c", "rho", "expected"),
    [
        (1.0, 2.0, 0.0, 0.8),  # 4 / (1 + 4)
        (1.0, 2.0, 0.25, 0.875),  # (4 - .5) / (1 + 4 - 1)
        (2.0, 1.0, -0.5, 2 / 7),  # cov = -1: (1 + 1) / (4 + 1 + 2)
        (2.0, 1.0, 0.9, 0.0),  # (1 - 1.8) / (4 + 1 - 3.6) < 0: clipped, CLIP alone
    ],
)
def test_alpha_star_from_errors_with_known_statistics(s_t: float, s_c: float, rho: float, expected: float) -> None:
    e_t, e_c = orthonormal_errors(s_t, s_c, rho)
    stats = errors_to_statistics(e_t, e_c)
    assert (stats["s_t"], stats["s_c"], stats["rho"]) == pytest.approx((s_t, s_c, rho))
    assert fusion_weight(stats["s_t"], stats["s_c"], stats["rho"]) == pytest.approx(expected)


def test_alpha_star_of_identical_errors_is_half() -> None:
    assert fusion_weight(1.0, 1.0, 1.0) == 0.5
    assert fusion_weight(0.0, 0.0, 0.0) == 0.5


def test_alpha_star_minimises_the_fused_error_variance() -> None:
    g = torch.Generator().manual_seed(1)
    e_t = torch.randn(500, generator=g, dtype=torch.float64)
    e_c = 0.5 * e_t + 1.5 * torch.randn(500, generator=g, dtype=torch.float64)
    stats = errors_to_statistics(e_t, e_c)
    alpha = fusion_weight(stats["s_t"], stats["s_c"], stats["rho"])
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    variances = torch.stack([(a * e_t + (1 - a) * e_c).var() for a in grid])
    assert alpha == pytest.approx(grid[variances.argmin()].item(), abs=2e-4)


def test_optimal_alpha_on_logits_minimises_the_brier_score_of_fused_probabilities() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (300,), generator=g)
    signal = 2.0 * torch.nn.functional.one_hot(labels, 5).double()
    z_t = signal + torch.randn(300, 5, generator=g, dtype=torch.float64)
    z_c = 0.5 * signal + 0.7 * torch.randn(300, 5, generator=g, dtype=torch.float64)
    assert prediction_errors(z_t, labels).mean().item() == pytest.approx(0.0, abs=1e-12)  # no bias in this space
    alpha = optimal_alpha(z_t, z_c, labels)
    onehot = torch.nn.functional.one_hot(labels, 5).double()
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    brier = torch.stack([((a * z_t.softmax(1) + (1 - a) * z_c.softmax(1) - onehot) ** 2).mean() for a in grid])
    assert alpha == pytest.approx(grid[brier.argmin()].item(), abs=2e-4)


def test_optimal_alpha_leans_to_the_reliable_teacher() -> None:
    labels = torch.arange(4) % 3
    sure = 50.0 * torch.nn.functional.one_hot(labels, 3).double()  # errors ~ 0
    noisy = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.3]])
    assert optimal_alpha(sure, noisy, labels) == pytest.approx(1.0)
    assert optimal_alpha(noisy, sure, labels) == pytest.approx(0.0)


def test_alpha_sweep_fuses_with_eq_4() -> None:
    labels = torch.tensor([0, 0, 1])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # right on 0 and 2
    clip = torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 1.0]])  # right on 1 and 2
    # alpha .5: [1, .5], [1.5, .5], [0, 2]: all right
    sweep = alpha_sweep(teacher, clip, labels, [0.0, 0.5, 1.0])
    assert [a for a, _ in sweep] == [0.0, 0.5, 1.0]
    assert [acc for _, acc in sweep] == pytest.approx([200 / 3, 100.0, 200 / 3])


def test_shape_and_label_mistakes_are_data_errors() -> None:
    with pytest.raises(DataError, match=r"\(N, C\)"):
        topk_accuracy(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="class indices"):
        confidence_categories(torch.zeros(2, 2), torch.tensor([0, 2]))
