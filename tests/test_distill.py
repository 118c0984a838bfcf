"""Fusion and losses against formulas written out independently here (explicit loops, numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from richkd_cache.distill import (
    build_targets,
    create_feature_loss,
    create_objective,
    fit_joint_space,
    fuse_logits,
    get_logit_loss,
    method_params,
)
from richkd_cache.errors import ConfigError

B, C = 6, 7


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


def kd_by_hand(s, t, y, T: float) -> float:
    return float(np.mean([kl(softmax(t[i].numpy() / T), softmax(s[i].numpy() / T)) for i in range(B)]) * T * T)


def dkd_by_hand(s, t, y, T: float, a: float, b: float) -> float:
    total = 0.0
    for i in range(B):
        ps, pt = softmax(s[i].numpy() / T), softmax(t[i].numpy() / T)
        k = int(y[i])
        tckd = kl(np.array([pt[k], 1 - pt[k]]), np.array([ps[k], 1 - ps[k]]))
        others = [j for j in range(C) if j != k]
        nckd = kl(softmax(t[i].numpy()[others] / T), softmax(s[i].numpy()[others] / T))
        total += (a * tckd + b * nckd) * T * T
    return total / B


def lskd_by_hand(s, t, y, T: float) -> float:
    def z(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / (v.std(ddof=1) + 1e-7)

    return float(np.mean([kl(softmax(z(t[i].numpy()) / T), softmax(z(s[i].numpy()) / T)) for i in range(B)]) * T * T)


def normkd_by_hand(s, t, y, tn: float) -> float:
    total = 0.0
    for i in range(B):
        tt, ts = tn * t[i].numpy().std(ddof=1), tn * s[i].numpy().std(ddof=1)
        total += kl(softmax(t[i].numpy() / tt), softmax(s[i].numpy() / ts)) * tt * tt
    return total / B


def rld_by_hand(s, t, y, T: float, a: float, b: float, at: float) -> float:
    total = 0.0
    for i in range(B):
        k, top = int(y[i]), int(t[i].argmax())
        ps, pt = softmax(s[i].numpy() / at), softmax(t[i].numpy() / at)
        scd = kl(np.array([pt[top], 1 - pt[top]]), np.array([ps[k], 1 - ps[k]])) * at * at
        kept = [j for j in range(C) if t[i, j] < t[i, k]]  # classes the target ranks below the true one
        mcd = kl(softmax(t[i].numpy()[kept] / T), softmax(s[i].numpy()[kept] / T)) * T * T if kept else 0.0
        total += a * scd + b * mcd
    return total / B


# Each method's CIFAR-100 weights as its public code trains it: (CE weight, its distillation term by hand).
REFERENCE = {
    "kd": (1.0, lambda s, t, y: 3.0 * kd_by_hand(s, t, y, T=3.0)),  # RichKD paper: beta 3, T 3
    "dkd": (1.0, lambda s, t, y: dkd_by_hand(s, t, y, T=4.0, a=1.0, b=8.0)),  # mdistiller CFG.DKD
    "lskd": (0.1, lambda s, t, y: 9.0 * lskd_by_hand(s, t, y, T=2.0)),  # --kd-weight 9 --base-temp 2
    "normkd": (0.1, lambda s, t, y: 0.9 * normkd_by_hand(s, t, y, tn=2.0)),  # CFG.NormKD
    "rld": (1.0, lambda s, t, y: rld_by_hand(s, t, y, T=4.0, a=1.0, b=8.0, at=4.0)),  # CFG.RLD with --same-t
}


def test_kd_is_t_squared_kl(batch) -> None:
    s, t, y = batch
    assert get_logit_loss("kd")(s, t, y, temperature=3.0).item() == pytest.approx(kd_by_hand(s, t, y, 3.0), rel=1e-6)


def test_lskd_is_kd_on_zscores(batch) -> None:
    s, t, y = batch
    expected = lskd_by_hand(s, t, y, T=2.0)
    assert get_logit_loss("lskd")(s, t, y, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    # invariant to shifting and scaling either side's logits
    assert get_logit_loss("lskd")(s * 5 + 2, t, y, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", list(REFERENCE))
def test_each_method_trains_with_its_reference_weights(batch, method: str) -> None:
    s, t, y = batch
    objective = create_objective("richkd", method, None, student_dim=4)
    terms = objective(s, torch.zeros(B, 4), y, target_logits=t, epoch=30)  # past the warm-ups
    ce_weight, distill = REFERENCE[method]
    ce = float(np.mean([-math.log(softmax(s[i].numpy())[int(y[i])]) for i in range(B)]))
    assert terms["ce"].item() == pytest.approx(ce_weight * ce, rel=1e-6)
    assert terms["logit"].item() == pytest.approx(distill(s, t, y), rel=1e-5)


@pytest.mark.parametrize("method", ["dkd", "rld"])
def test_dkd_and_rld_ramp_in_over_twenty_epochs(batch, method: str) -> None:
    s, t, y = batch
    objective = create_objective("richkd", method, None, student_dim=4)
    full = objective(s, torch.zeros(B, 4), y, target_logits=t, epoch=19)["logit"].item()  # the trainer's epoch 20
    assert objective(s, torch.zeros(B, 4), y, target_logits=t, epoch=4)["logit"].item() == pytest.approx(full * 5 / 20)


def test_given_parameters_replace_the_reference_ones(batch) -> None:
    s, t, y = batch
    objective = create_objective("richkd", "dkd", None, student_dim=4,
                                 logit_params={"beta": 6.0, "temperature": 2.0})
    terms = objective(s, torch.zeros(B, 4), y, target_logits=t, epoch=30)
    assert terms["logit"].item() == pytest.approx(dkd_by_hand(s, t, y, T=2.0, a=1.0, b=6.0), rel=1e-5)
    assert objective.logit_params == {"ce_weight": 1.0, "alpha": 1.0, "beta": 6.0, "temperature": 2.0, "warmup": 20.0}


def test_a_parameter_the_method_does_not_have_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"dkd has no parameter weight; its parameters: ce_weight=1, alpha=1"):
        method_params("dkd", {"weight": 3.0})
    with pytest.raises(ConfigError, match="normkd has no parameter temperature.*t_norm=2"):
        method_params("normkd", {"temperature": 4.0})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        method_params("kd", {"temperature": 0.0})
    with pytest.raises(ConfigError, match="ce_weight must be >= 0"):
        method_params("lskd", {"ce_weight": -1.0})


def test_logit_fusion_is_eq4() -> None:
    zt, zc = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(fuse_logits(zt, zc, 0.7), 0.7 * zt + 0.3 * zc)


def test_targets_by_name() -> None:
    zt, zc, ft, fc = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 5)
    space = fit_joint_space(torch.randn(20, 2), torch.randn(20, 5), lam=0.2)
    assert build_targets("ce") == {}
    kd = build_targets("kd", teacher_logits=zt, teacher_feats=ft)
    assert kd["logits"] is zt and kd["teacher_features"] is ft and "clip_features" not in kd
    clip = build_targets("clip", clip_logits=zc, clip_feats=fc)
    assert clip["logits"] is zc and clip["clip_features"] is fc and "teacher_features" not in clip
    rich = build_targets("richkd", teacher_logits=zt, clip_logits=zc, teacher_feats=ft, clip_feats=fc,
                         alpha=0.6, space=space)
    assert torch.allclose(rich["logits"], 0.6 * zt + 0.4 * zc)
    assert torch.allclose(torch.cat([rich["teacher_features"], rich["clip_features"]], 1), space(ft, fc))
    raw = build_targets("richkd", teacher_logits=zt, clip_logits=zc, teacher_feats=ft, clip_feats=fc)
    assert raw["teacher_features"] is ft and raw["clip_features"] is fc  # CRD fuses after its embeddings
    with pytest.raises(ConfigError, match="richkd"):
        build_targets("fused")


@pytest.mark.parametrize("feature_loss", ["cosine", "mse", "crd"])
@pytest.mark.parametrize("logit_loss", ["kd", "dkd", "lskd", "normkd", "rld"])
def test_gradients_reach_only_the_student_and_its_maps(logit_loss: str, feature_loss: str) -> None:
    labels = torch.arange(32) % C
    objective = create_objective("richkd", logit_loss, feature_loss, student_dim=8, teacher_dim=5, clip_dim=6,
                                 labels=labels, gamma=0.8)
    s_logits = torch.randn(B, C, requires_grad=True)
    s_feats = torch.randn(B, 8, requires_grad=True)
    t_logits = torch.randn(B, C, requires_grad=True)
    t_feats = {"teacher": torch.randn(B, 5, requires_grad=True), "clip": torch.randn(B, 6, requires_grad=True)}
    terms = objective(s_logits, s_feats, labels[:B], target_logits=t_logits,
                      target_feats=t_feats, index=torch.arange(B), epoch=30)
    assert set(terms) == {"ce", "logit", "feat"}
    sum(terms.values()).backward()
    assert s_logits.grad is not None and s_feats.grad is not None
    assert t_logits.grad is None and all(t.grad is None for t in t_feats.values())
    assert all(p.grad is not None for p in objective.parameters())


def test_weights_multiply_the_terms(batch) -> None:
    s, t, y = (v.float() if v.is_floating_point() else v for v in batch)
    one = create_objective("kd", "kd", None, student_dim=4, logit_params={"weight": 1.0})
    three = create_objective("kd", "kd", None, student_dim=4)  # KD's reference weight, beta = 3
    f = torch.zeros(B, 4)
    assert three(s, f, y, target_logits=t)["logit"].item() == pytest.approx(3 * one(s, f, y, target_logits=t)["logit"].item())
    assert set(create_objective("ce", "kd", "cosine", student_dim=4, teacher_dim=3)(s, f, y)) == {"ce"}


def test_crd_memory_updates_only_the_batch_rows() -> None:
    crd = create_feature_loss("crd", 8, 5, labels=torch.arange(20) % 4, num_negatives=10)
    before_s, before_t = crd.memory_s.clone(), crd.memory_t.clone()
    index = torch.tensor([3, 7, 11])
    loss = crd(torch.randn(3, 8), {"teacher": torch.randn(3, 5)}, index)
    assert torch.isfinite(loss)
    changed = ((crd.memory_s != before_s).any(1) | (crd.memory_t != before_t).any(1)).nonzero().flatten()
    assert changed.tolist() == [3, 7, 11]
    assert "memory_s" in crd.state_dict()  # saved for --resume


def test_bad_names_and_missing_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="kd, dkd"):
        get_logit_loss("kdd")
    with pytest.raises(ConfigError, match="cosine"):
        create_feature_loss("l2", 4, 4)
    with pytest.raises(ConfigError, match="training labels"):
        create_feature_loss("crd", 4, 4)
    with pytest.raises(ConfigError, match="two classes"):
        create_feature_loss("crd", 4, 4, labels=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ConfigError, match="trained samples"):
        create_feature_loss("crd", 4, 4, labels=torch.arange(10) % 2, trained=torch.tensor([3, 10]))
    with pytest.raises(ConfigError, match="teacher features, which target kd lacks"):
        create_objective("kd", "kd", "cosine", student_dim=4, clip_dim=5)
    with pytest.raises(ConfigError, match="teacher and clip features"):
        create_objective("richkd", "kd", "crd", student_dim=4, labels=torch.arange(10) % 2)


def test_crd_resumes_with_its_memory_normalisers_and_draws() -> None:
    labels = torch.arange(20) % 4
    crd = create_feature_loss("crd", 8, 5, labels=labels, num_negatives=10)
    s, t, index = torch.randn(4, 8), {"teacher": torch.randn(4, 5)}, torch.tensor([0, 5, 9, 19])
    crd(s, t, index)
    z_first = crd.z_s.item()
    assert z_first > 0
    crd(s, t, index)
    assert crd.z_s.item() == z_first  # estimated once, from the first batch
    resumed = create_feature_loss("crd", 8, 5, labels=labels, num_negatives=10, seed=7)
    resumed.load_state_dict(crd.state_dict())
    torch.manual_seed(1)  # the global generator plays no part in CRD's draws
    expected = crd(s, t, index)
    torch.manual_seed(2)
    assert resumed(s, t, index).item() == expected.item()
    assert resumed.z_t.item() == crd.z_t.item()
    fresh = create_feature_loss("crd", 8, 5, labels=labels, num_negatives=10)
    crd.load_state_dict(fresh.state_dict())  # back to unset normalisers: they are estimated again
    assert torch.isfinite(crd(s, t, index)) and crd.z_s.item() > 0


@pytest.mark.parametrize("draws", [{"device": "cpu", "state": torch.zeros(7, dtype=torch.uint8)},
                                   {"device": "cpu", "state": torch.zeros(7)}, "not a state"])
def test_crd_refuses_a_malformed_saved_draw_state_on_load(draws) -> None:
    crd = create_feature_loss("crd", 8, 5, labels=torch.arange(20) % 4, num_negatives=10)
    state = crd.state_dict()
    state["_extra_state"] = draws
    with pytest.raises((ValueError, RuntimeError)):  # the pipeline reports either as a damaged resume file
        crd.load_state_dict(state)
