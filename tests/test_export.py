"""`richkd-cache export`: fused soft labels per (sample, view) as Parquet or npz, checked against the cache
read with zarr and numpy alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from clirun import invoke


@pytest.fixture
def cache(digits_cache: Path) -> Path:
    return digits_cache


def soft_labels_from_zarr(cache: Path, alpha: float, temperature: float, prompt_set: str) -> np.ndarray:
    """eq. 2-5 written out: softmax((alpha z_T + (1 - alpha) tau e W^T) / T), W the mean text embedding."""
    group = zarr.open_group(str(cache), mode="r")
    z_t = group["teacher/logits"][:].astype(np.float64)  # (N, V, C)
    ((name, clip),) = group.attrs["richkd_cache"]["clip_models"].items()  # the one CLIP model
    embeds = group[f"clip/{name}/image_embeds"][:].astype(np.float64)  # (N, 1, D)
    w = group[f"clip/{name}/text/{prompt_set}"][:].astype(np.float64).mean(axis=0)  # (C, D)
    z_c = clip["tau"] * embeds @ w.T
    z = (alpha * z_t + (1 - alpha) * z_c) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).reshape(-1, z.shape[-1])


def test_exported_soft_labels_are_the_fused_targets(cache: Path, tmp_path: Path) -> None:
    parquet, npz = tmp_path / "t.parquet", tmp_path / "t.npz"
    for out in (parquet, npz):
        result = invoke("export", cache, "--out", out, "--alpha", "0.6", "--temperature", "4", "--prompts", "multi")
        assert result.exit_code == 0, result.output
    table = pq.read_table(parquet)
    assert table.num_rows == 1442 and pq.ParquetFile(parquet).num_row_groups == 3  # streamed block by block
    labels = np.stack(table.column("soft_labels").to_numpy(zero_copy_only=False))
    expected = soft_labels_from_zarr(cache, 0.6, 4.0, "multi")
    assert np.abs(labels - expected).max() < 1e-4
    assert table.column("sample").to_pylist() == list(range(1442)) and set(table.column("view").to_pylist()) == {0}
    with np.load(npz) as arrays:
        assert np.array_equal(arrays["soft_labels"], labels) and np.array_equal(arrays["sample"], np.arange(1442))
        assert sorted(arrays.files) == ["sample", "soft_labels", "view"]  # the clean view: a record without fields


def test_export_with_fused_features_and_refusals(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.npz"
    assert invoke("export", cache, "--out", out, "--features").exit_code == 0
    with np.load(out) as arrays:
        assert arrays["features"].shape[0] == 1442 and np.isfinite(arrays["features"]).all()
    result = invoke("export", cache, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert invoke("export", cache, "--out", tmp_path / "x.csv").exit_code == 2
    result = invoke("export", cache, "--out", tmp_path / "k.npz", "--target", "kd", "--features")
    assert result.exit_code == 2 and "richkd" in result.output
