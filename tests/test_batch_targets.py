"""Targets fused per batch from gathered rows equal the targets of every cached (sample, view) row computed
at once, restated here in float64 numpy from the stored arrays (eq. 2-4, 7, the supplement's alpha*,
the ensemble, MLKD's strong views, top-k rebuilt), for every method and target a run can ask for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store import open_cache
from clirun import invoke
from pipelines.config import TrainConfig
from stagetwo import Batches

A, B = "richkd-tiny", "richkd-tiny2"
VIEWS, STRONG, TOPK = 3, 2, 4


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher: Path) -> dict[str, Path]:
    """The digits with 3 random teacher views per image and CLIP's clean view: one cache with full logits,
    two CLIP models and 2 strong views, one with the teacher's top-4 only."""
    root = tmp_path_factory.mktemp("parity")
    common = ["build", "--dataset", "digits", "--teacher-checkpoint", teacher, "--clip-pretrained", "random",
              "--prompts", "single,multi", "--teacher-views", str(VIEWS), "--block-rows", "512", "--device", "cpu",
              "--workers", "0", "--quiet"]
    out = {"full": root / "full.zarr", "topk": root / "topk.zarr"}
    result = invoke(*common, "--clip", f"{A},{B}", "--strong-views", str(STRONG), "--out", out["full"])
    assert result.exit_code == 0, result.output
    result = invoke(*common, "--clip", A, "--topk", str(TOPK), "--out", out["topk"])
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- the reference, every row at once


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def teacher_logits(cache, strong: bool = False) -> np.ndarray:
    """(N, V, C): stored, or top-k log-probabilities with the rest spread evenly over the other classes."""
    prefix = "teacher/strong_" if strong else "teacher/"
    c = cache.layout.num_classes
    if not cache.layout.teacher_topk:
        return cache.load(prefix + "logits").astype(np.float64)
    values = cache.load(prefix + "topk_values").astype(np.float64)
    indices = cache.load(prefix + "topk_indices")
    rest = np.maximum(1.0 - np.exp(values).sum(-1, keepdims=True), 1e-8)
    out = np.repeat(np.log(rest / (c - values.shape[-1])), c, axis=-1)
    np.put_along_axis(out, indices.astype(np.int64), values, axis=-1)
    return out


def clip_logits(cache, models: list[str], prompts: str) -> np.ndarray:
    """(N, C), eq. 2-3 per model at its tau; several models: log of the mean of their probabilities."""
    per_model = []
    for name in models:
        e = cache.load(f"clip/{name}/image_embeds")[:, 0].astype(np.float64)
        w = cache.text_embeddings(prompts, name).astype(np.float64).mean(0)
        per_model.append(cache.clip_records[name]["tau"] * e @ w.T)
    if len(per_model) == 1:
        return per_model[0]
    return np.log(np.mean([softmax(z) for z in per_model], axis=0))


def alpha_star(z_t: np.ndarray, z_c: np.ndarray, y: np.ndarray) -> float:
    """The supplement's alpha* from the errors (softmax - one-hot) of every (row, class) pair."""
    onehot = np.eye(z_t.shape[-1])[y]
    e_t, e_c = (softmax(z_t) - onehot).ravel(), (softmax(z_c) - onehot).ravel()
    s_t, s_c = e_t.std(), e_c.std()
    rho = np.mean((e_t - e_t.mean()) * (e_c - e_c.mean())) / (s_t * s_c)
    return float(np.clip((s_c**2 - rho * s_t * s_c) / (s_t**2 + s_c**2 - 2 * rho * s_t * s_c), 0, 1))


def centred_scaled(f: np.ndarray, width: int) -> np.ndarray:
    """Rows (.., F) centred and scaled to mean squared norm `width` over all of them (the joint space)."""
    flat = f.reshape(-1, f.shape[-1])
    centred = f - flat.mean(0)
    return centred * np.sqrt(width / np.mean((centred.reshape(len(flat), -1) ** 2).sum(1)))


def reference(cache, cfg: TrainConfig, models: list[str]) -> dict[str, np.ndarray]:
    """Every row's targets: logits (N, V, C), feature parts (N, V, F), strong logits (N, K, C)."""
    z_t = teacher_logits(cache)
    y = cache.load("labels").astype(np.int64)
    n, v, c = z_t.shape
    z_c = clip_logits(cache, models, cfg.prompts or "multi")[:, None] if models else None
    if cfg.resolved_target == "kd":
        out = {"logits": z_t}
    else:
        yy = np.repeat(y, v)
        if cfg.alpha == "auto":
            alpha = alpha_star(z_t.reshape(-1, c), np.repeat(z_c[:, 0], v, 0), yy)
        elif cfg.alpha == "per-class":
            per_class = np.array([alpha_star(z_t[y == k].reshape(-1, c), np.repeat(z_c[y == k, 0], v, 0),
                                             np.full((y == k).sum() * v, k)) for k in range(c)])
            alpha = per_class[y][:, None, None]
        else:
            alpha = cfg.alpha
        out = {"logits": alpha * z_t + (1 - alpha) * z_c, "alpha": alpha}  # eq. 4
    if cfg.feature_loss:
        f_t = cache.load("teacher/features").astype(np.float64)
        feats = [cache.load(f"clip/{m}/features")[:, 0].astype(np.float64) for m in models]
        if len(feats) > 1:  # each model's block at unit centred energy
            feats = [f / np.sqrt(np.mean(((f - f.mean(0)) ** 2).sum(1))) for f in feats]
        f_c = np.concatenate(feats, axis=1)[:, None].repeat(v, 1)
        if cfg.feature_loss in ("cosine", "mse"):  # the joint space (eq. 7): lambda and 1 - lambda of the energy
            width = f_t.shape[-1] + f_c.shape[-1]
            f_t = np.sqrt(cfg.lam) * centred_scaled(f_t, width)
            f_c = np.sqrt(1 - cfg.lam) * centred_scaled(f_c[:, :1], width).repeat(v, 1)
        out.update(teacher=f_t, clip=f_c)
    if cfg.method == "mlkd":
        s_t = teacher_logits(cache, strong=True)
        alpha = out["alpha"] if np.ndim(out["alpha"]) == 0 else out["alpha"][:, :1]
        out["strong"] = alpha * s_t + (1 - alpha) * z_c
    return out


# ---------------------------------------------------------------- per batch, as training gathers them


CASES = {
    "kd": dict(target="kd", feature_loss=None),
    "richkd-L": dict(feature_loss=None, clip_model=A),
    "richkd-LF-crd": dict(feature_loss="crd", clip_model=A),
    "richkd-LF-cosine": dict(feature_loss="cosine", clip_model=A),
    "dkd": dict(method="dkd", feature_loss=None, clip_model=A),
    "mlkd": dict(method="mlkd", feature_loss=None, clip_model=A),
    "alpha-auto": dict(alpha="auto", feature_loss=None, clip_model=A),
    "alpha-per-class": dict(alpha="per-class", feature_loss=None, clip_model=A),
    "ensemble": dict(clip_model=f"{A}+{B}", feature_loss="cosine", prompts="single"),
    "topk": dict(feature_loss="mse", cache="topk"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_targets_fused_per_batch_equal_every_rows_targets_at_once(caches: dict[str, Path], case: str) -> None:
    settings = dict(CASES[case])
    path = caches[settings.pop("cache", "full")]
    cfg = TrainConfig(student="resnet8", out="-", cache=str(path), **settings)
    cache = open_cache(str(path))
    models = [] if cfg.resolved_target == "kd" else (cfg.clip_model or A).split("+")
    expected = reference(cache, cfg, models)
    n = cache.layout.num_samples
    # every (sample, view) row, in shuffled batches of 256, each with a strong view drawn
    rng = np.random.default_rng(0)
    order = rng.permutation(n * VIEWS)
    samples, views = order // VIEWS, order % VIEWS
    strong = rng.integers(0, STRONG, len(order)) if cfg.method == "mlkd" else None
    batches = Batches(cfg)
    for start in range(0, len(order), 256):
        s, v = samples[start : start + 256], views[start : start + 256]
        k = None if strong is None else strong[start : start + 256]
        logits, parts, strong_logits = batches(s, v, k)
        assert np.allclose(logits.numpy(), expected["logits"][s, v], atol=2e-4, rtol=1e-4), case
        assert set(parts) == ({"teacher", "clip"} if cfg.feature_loss else set())
        for name in parts:
            assert np.allclose(parts[name].numpy(), expected[name][s, v], atol=2e-4, rtol=1e-4), (case, name)
        if k is not None:
            assert np.allclose(strong_logits.numpy(), expected["strong"][s, k], atol=2e-4, rtol=1e-4), case
    if cfg.alpha in ("auto", "per-class"):  # the rule is really at work: alpha* is not the fixed 0.7
        assert not np.allclose(expected["alpha"], 0.7, atol=1e-3)


def test_rows_resident_on_the_cache_device_gather_what_the_mapped_rows_do(caches: dict[str, Path]) -> None:
    """`--cache-device cuda` copies the mapped rows into device memory chunk by chunk and gathers there; the
    same code path, resident on this CPU, gathers the very rows the memory map gives."""
    from pipelines.targets import CachedRows

    cfg = TrainConfig(student="resnet8", out="-", cache=str(caches["full"]), method="mlkd", feature_loss="crd",
                      clip_model=A)
    mapped = Batches(cfg).source.rows
    resident = CachedRows(mapped.plan, mapped.arrays, torch.device("cpu"), resident=True)
    assert all(isinstance(a, torch.Tensor) for a in resident.arrays.values())
    generator = torch.Generator().manual_seed(0)
    draws = mapped.draw(torch.arange(100), generator)
    for got, want in zip(resident.gather(draws), mapped.gather(draws)):
        assert got.keys() == want.keys() and len(got) > 0
        assert all(torch.equal(got[n], want[n]) for n in got)
