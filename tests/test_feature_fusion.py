"""Fused features (eq. 7) and CRD over them: what the target keeps, what CRD draws, its loss and resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from richkd_cache.distill import create_feature_loss, create_objective, fit_joint_space

N, FT, FC = 1200, 12, 20


def r_squared(features: np.ndarray, signal: np.ndarray) -> float:
    """R^2 of the best affine prediction of `signal` (n,) from `features` (n, F), by least squares."""
    x = np.hstack([features, np.ones((len(features), 1))])
    coef, *_ = np.linalg.lstsq(x, signal, rcond=None)
    residual = signal - x @ coef
    return 1.0 - float(residual.var() / signal.var())


@pytest.fixture
def clip_only() -> dict[str, np.ndarray]:
    """f_T, and f_C = a rotation of [a linear image of f_T, a signal s independent of f_T, noise]."""
    rng = np.random.default_rng(0)
    f_t = rng.normal(size=(N, FT)) * rng.uniform(0.5, 3.0, size=FT) + 2.0
    s = rng.normal(size=N)
    shared = f_t @ rng.normal(size=(FT, FC - 4))
    mixed = np.hstack([shared, s[:, None] * 1.5, rng.normal(size=(N, 3)) * 0.5])
    rotation, _ = np.linalg.qr(rng.normal(size=(FC, FC)))
    return {"teacher": f_t.astype(np.float32), "clip": (mixed @ rotation + 0.5).astype(np.float32), "signal": s}


def test_clip_only_signal_is_kept_by_the_fixed_fused_target(clip_only) -> None:
    f_t, f_c, s = clip_only["teacher"], clip_only["clip"], clip_only["signal"]
    assert r_squared(f_t, s) < 0.02  # absent from the teacher
    space = fit_joint_space(f_t, f_c, lam=0.7)
    fused = space(torch.from_numpy(f_t), torch.from_numpy(f_c)).numpy()
    assert fused.shape == (N, FT + FC)
    assert r_squared(fused, s) >= 0.9
    # a map of CLIP into the teacher's space fitted by regression keeps only what predicts f_T
    x = np.hstack([f_c, np.ones((N, 1))])
    mapped = x @ np.linalg.lstsq(x, f_t, rcond=None)[0]
    assert r_squared(0.7 * f_t + 0.3 * mapped, s) < 0.05


class ChunkLog(np.ndarray):
    """An fp16 array that records how many rows each slice of it takes (what a fit converts at once)."""

    taken: list[int] = []

    def __getitem__(self, key):
        part = super().__getitem__(key)
        if isinstance(key, slice):
            ChunkLog.taken.append(len(part))
        return part


def test_joint_space_splits_the_energy_by_lambda_in_chunks_without_float64_rows(clip_only) -> None:
    f_t, f_c = clip_only["teacher"], clip_only["clip"]
    views = np.repeat(f_t[:, None], 3, axis=1).astype(np.float16).view(ChunkLog)  # (N, V, Ft) as cached
    ChunkLog.taken = []
    space = fit_joint_space(views, f_c.astype(np.float16), lam=0.7, chunk_rows=97)  # CLIP: one row per sample
    assert max(ChunkLog.taken) == 97 and sum(ChunkLog.taken) == 2 * 3 * N  # two passes, chunk by chunk
    views = np.asarray(views)
    t64, c64 = views.reshape(-1, FT).astype(np.float64), f_c.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(space.teacher_mean.numpy(), t64.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(space.clip_mean.numpy(), c64.mean(0), rtol=1e-5, atol=1e-5)
    t_block = space.teacher_part(torch.from_numpy(t64)).double()
    c_block = space.clip_part(torch.from_numpy(c64)).double()
    t_energy, c_energy = t_block.square().sum(1).mean().item(), c_block.square().sum(1).mean().item()
    assert t_energy / (t_energy + c_energy) == pytest.approx(0.7, rel=1e-4)  # eq. 7's weights, as energy
    assert (t_energy + c_energy) / (FT + FC) == pytest.approx(1.0, rel=1e-4)  # unit mean square per element
    assert all(v.dtype == torch.float32 for v in (space.teacher_mean, space.clip_mean))


def train_crd(crd, student: torch.Tensor, target: dict[str, torch.Tensor], steps: int) -> None:
    """A few epochs of CRD alone (its maps only) on fixed features, batches of 64 in a fixed order."""
    optimizer = torch.optim.SGD(crd.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(student), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        index = order[(step * 64) % len(order):][:64]
        loss = crd(student[index], {k: v[index] for k, v in target.items()}, index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_crd_fused_embedding_keeps_a_clip_only_signal(clip_only) -> None:
    f_t, f_c, s = (torch.from_numpy(clip_only[k]).float() for k in ("teacher", "clip", "signal"))
    labels = torch.arange(N) % 10
    student = torch.cat([f_t, s[:, None], torch.randn(N, 4)], 1)  # a student that learned both teachers
    fused = create_feature_loss("crd", student.shape[1], FT, FC, labels=labels, lam=0.7, feat_dim=64,
                                num_negatives=256)
    teacher_only = create_feature_loss("crd", student.shape[1], FT, None, labels=labels, feat_dim=64,
                                       num_negatives=256)
    for crd in (fused, teacher_only):
        train_crd(crd, student, {"teacher": f_t, "clip": f_c}, steps=20)  # about one epoch
    with torch.no_grad():
        kept = fused.target_embedding({"teacher": f_t, "clip": f_c}).numpy()
        lost = teacher_only.target_embedding({"teacher": f_t}).numpy()
    assert r_squared(kept, s.numpy()) >= 0.9
    assert r_squared(lost, s.numpy()) < 0.1  # the check can fail: without CLIP the signal is absent


def test_crd_negatives_are_other_classes_of_trained_samples_only() -> None:
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10 + [3] * 5)
    trained = torch.cat([torch.arange(0, 65, 2), torch.tensor([61])])  # a subset, as --fraction makes
    crd = create_feature_loss("crd", 4, 3, labels=labels, trained=trained, num_negatives=15)
    in_bank = torch.unique(trained)
    assert crd.memory_s.shape[0] == crd.memory_t.shape[0] == len(in_bank)
    dataset_index = torch.full((len(in_bank),), -1)
    dataset_index[crd.row_of[in_bank]] = in_bank  # bank row -> dataset index
    seen = set()
    for _ in range(40):
        index = in_bank[torch.randperm(len(in_bank))[:8]]
        rows = crd.contrast_rows(index)
        assert rows.shape == (8, 1 + crd.k)
        drawn = dataset_index[rows]
        assert torch.equal(drawn[:, 0], index)  # "exact": the anchor itself is the positive
        negatives = drawn[:, 1:]
        assert (labels[negatives] != labels[index][:, None]).all()  # never the anchor's class
        assert all(len(set(row.tolist())) == crd.k for row in negatives)  # without replacement
        seen.update(negatives.flatten().tolist())
    assert seen <= set(in_bank.tolist())  # untrained samples are never negatives
    assert seen == set(in_bank.tolist())  # and every trained sample can be one


def test_crd_loss_equals_an_independent_formula() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(40) % 5
    crd = create_feature_loss("crd", 6, 4, 7, labels=labels, lam=0.6, feat_dim=8, num_negatives=12,
                              nce_t=0.1, momentum=0.5)
    student, t, c = torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 7, generator=g)
    index = torch.tensor([2, 9, 13, 27, 38])
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in crd.state_dict().items()}
    rows = crd.contrast_rows(index).numpy()
    crd.load_state_dict(saved)  # the same draw again: the generator state is part of the state_dict
    loss = crd(student, {"teacher": t, "clip": c}, index).item()

    def embed(layer: str, x: torch.Tensor) -> np.ndarray:
        w, b = saved[f"{layer}.weight"].double().numpy(), saved[f"{layer}.bias"].double().numpy()
        y = x.double().numpy() @ w.T + b
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    v_s = embed("embed_s", student)
    mix = 0.6 * embed("embed_t", t) + 0.4 * embed("embed_c", c)
    v_t = mix / np.linalg.norm(mix, axis=1, keepdims=True)
    bank_s, bank_t = saved["memory_s"].double().numpy(), saved["memory_t"].double().numpy()
    num_rows, k = 40, 12
    total = 0.0
    for v, bank in ((v_s, bank_t), (v_t, bank_s)):
        scores = np.array([[math.exp(bank[r] @ v[i] / 0.1) for r in rows[i]] for i in range(5)])
        scores /= scores.mean() * num_rows  # Z from the first batch
        noise = k / num_rows
        side = 0.0
        for i in range(5):
            side += math.log(scores[i, 0] / (scores[i, 0] + noise + 1e-7))
            side += sum(math.log(noise / (x + noise + 1e-7)) for x in scores[i, 1:])
        total += -side / 5
    assert loss == pytest.approx(total, rel=1e-4)


def test_crd_objective_resumes_bit_identically() -> None:
    """3 epochs straight == 1 epoch, save to bytes (weights_only load), new objects, 2 epochs."""
    g = torch.Generator().manual_seed(5)
    n = 48
    labels = torch.arange(n) % 4
    images, t_feats, c_feats = (torch.randn(n, d, generator=g) for d in (10, 5, 7))
    trained = torch.arange(0, n, 3)

    def make(seed: int):
        torch.manual_seed(seed)  # a resumed process starts from other global random state
        student = torch.nn.Linear(10, 6)
        objective = create_objective("richkd", "kd", "crd", student_dim=6, teacher_dim=5, clip_dim=7,
                                     labels=labels, trained=trained, seed=11)
        optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.1, momentum=0.9)
        return student, objective, optimizer

    def epoch(student, objective, optimizer, e: int) -> None:
        order = trained[torch.randperm(len(trained), generator=torch.Generator().manual_seed(e))]
        for index in order.split(4):
            feats = student(images[index])
            terms = objective(feats[:, :4], feats, labels[index], target_logits=t_feats[index, :4],
                              target_feats={"teacher": t_feats[index], "clip": c_feats[index]}, index=index)
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()

    straight = make(0)
    for e in range(3):
        epoch(*straight, e)
    first = make(0)
    epoch(*first, 0)
    buffer = io.BytesIO()
    torch.save({"student": first[0].state_dict(), "objective": first[1].state_dict(),
                "optimizer": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make(123)
    for module, key in zip(resumed, ("student", "objective", "optimizer")):
        module.load_state_dict(saved[key])
    for e in (1, 2):
        epoch(*resumed, e)
    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight[1].feature_loss.memory_t, resumed[1].feature_loss.memory_t)
