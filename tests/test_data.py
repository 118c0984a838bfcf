"""Datasets read from their real on-disk formats, canonical order, fingerprint, batched augmentation."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from richkd_cache.data import create_dataset, dataset_fingerprint, random_crop_flip
from richkd_cache.errors import DataError


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 8, seed: int = 0) -> Path:
    """CIFAR-100's python layout: pickles with b'data' (N, 3072) uint8 rows, b'fine_labels', and meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": rng.integers(0, 100, n).tolist(), b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def write_cifar10(root: Path) -> Path:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 3).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def test_cifar100_reads_the_pickle_layout(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path)
    train = create_dataset("cifar100", str(root), "train")
    raw = pickle.loads((root / "cifar-100-python" / "train").read_bytes())
    assert len(train) == 20 and train.num_classes == 100 and train.classes[3] == "class_3"
    # row layout: 1024 red values, then green, then blue; pixel (row 2, col 5) of image 4
    r, g, b = (raw[b"data"][4][c * 1024 + 2 * 32 + 5] for c in range(3))
    sample = train[4]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 32, 32)
    assert sample["image"][:, 2, 5].tolist() == [r, g, b]
    assert sample["label"] == raw[b"fine_labels"][4] and sample["index"] == 4
    assert len(create_dataset("cifar100", str(root / "cifar-100-python"), "test")) == 8


def test_cifar10_reads_five_batches(tmp_path: Path) -> None:
    ds = create_dataset("cifar10", str(write_cifar10(tmp_path)), "train")
    assert len(ds) == 15 and ds.classes[0] == "c0"
    assert len(create_dataset("cifar10", str(tmp_path), "val")) == 3


def test_missing_cifar_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-100-python"):
        create_dataset("cifar100", str(tmp_path), "train")


def test_corrupt_cifar_file_is_a_data_error(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path)
    (root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        create_dataset("cifar100", str(root), "train")


def test_image_folder_order_labels_and_ids(tmp_path: Path) -> None:
    for cls, sizes in (("dog", [(40, 30), (20, 50)]), ("cat", [(64, 64)])):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for k, size in enumerate(sizes):
            Image.new("RGB", size, (k * 40, 10, 200)).save(tmp_path / "train" / cls / f"{k}.png")
    ds = create_dataset("imagefolder", str(tmp_path), "train", image_size=24, resize=28)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 1]
    assert ds[1]["image"].shape == (3, 24, 24) and ds[1]["label"] == 1
    ids = ds.sample_ids()
    assert ids[0] == f"cat/0.png:{(tmp_path / 'train/cat/0.png').stat().st_size}"
    with pytest.raises(DataError, match="val"):
        create_dataset("imagefolder", str(tmp_path), "val")


def test_digits_is_a_stratified_split_of_real_data() -> None:
    train, val = create_dataset("digits", None, "train"), create_dataset("digits", None, "val")
    assert len(train) + len(val) == 1797 and train.num_classes == 10 and train.classes[0] == "zero"
    assert np.bincount(val.labels).min() >= 30  # every class in validation
    assert abs(len(val) / 1797 - 0.2) < 0.01  # a fixed fifth of each class
    assert train[0]["image"].shape == (3, 32, 32) and train[0]["image"].dtype == torch.uint8


def test_fingerprint_is_stable_and_moves_with_the_data(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path / "a")
    base = dataset_fingerprint(create_dataset("cifar100", str(root), "train"))
    shutil.copytree(root, tmp_path / "b")  # the same files elsewhere: same fingerprint
    assert dataset_fingerprint(create_dataset("cifar100", str(tmp_path / "b"), "train")) == base
    ds = create_dataset("cifar100", str(root), "train")
    ds.labels[0] = (ds.labels[0] + 1) % 100
    assert dataset_fingerprint(ds) != base
    ds = create_dataset("cifar100", str(root), "train")
    ds.images[3, 0, 0, 0] ^= 1
    assert dataset_fingerprint(ds) != base
    ds = create_dataset("cifar100", str(root), "train")
    ds.images, ds.labels = ds.images[::-1].copy(), ds.labels[::-1].copy()
    assert dataset_fingerprint(ds) != base


def test_random_crop_flip_is_a_crop_and_flip_of_the_padded_image() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    again = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape and torch.equal(out, again)
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(16):
        candidates = [padded[i, :, t : t + 8, l : l + 8] for t in range(5) for l in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError, match="cifar100"):
        create_dataset("cifar1000", None, "train")
