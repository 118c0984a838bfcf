"""Datasets read from their real on-disk formats, canonical order, fingerprint, batched augmentation."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from richkd_cache.data import create_dataset, dataset_fingerprint, list_datasets, normalize
from richkd_cache.views import create_policy
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
    """CIFAR-10's python layout: data_batch_1..5, test_batch (b'labels') and batches.meta."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 3).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def write_image_folder(root: Path) -> Path:
    """root/train/<class>/*.png of different sizes, one nested, plus files that must be skipped."""
    for cls, names, sizes in (("dog", ["b.png", "a.png"], [(40, 30), (20, 50)]), ("cat", ["x/0.png"], [(64, 64)])):
        for k, (name, size) in enumerate(zip(names, sizes)):
            path = root / "train" / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (k * 40, 10, 200)).save(path)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / ".cache" / "thumb.png")
    return root


def test_cifar100_reads_the_pickle_layout(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path)
    train = create_dataset("cifar100", str(root), "train")
    raw = pickle.loads((root / "cifar-100-python" / "train").read_bytes())
    assert len(train) == 20 and train.num_classes == 100 and train.classes[3] == "class_3"
    assert train.labels.dtype == np.int64 and train.labels.tolist() == raw[b"fine_labels"]
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    # row layout: 1024 red values, then green, then blue; pixel (row 2, col 5) of image 4
    r, g, b = (raw[b"data"][4][c * 1024 + 2 * 32 + 5] for c in range(3))
    assert train.images[4, 2, 5].tolist() == [r, g, b]
    sample = train[4]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 32, 32)
    assert sample["image"][:, 2, 5].tolist() == [r, g, b]
    assert sample["label"] == raw[b"fine_labels"][4] and sample["index"] == 4
    assert train.mean == (0.5071, 0.4865, 0.4409) and train.std == (0.2673, 0.2564, 0.2762)


def test_cifar_test_split_is_val_and_root_may_be_the_folder_itself(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path)
    val = create_dataset("cifar100", str(root / "cifar-100-python"), "test")
    raw = pickle.loads((root / "cifar-100-python" / "test").read_bytes())
    assert val.split == "val" and len(val) == 8 and val.labels.tolist() == raw[b"fine_labels"]
    assert np.array_equal(create_dataset("cifar100", str(root), "val").images, val.images)


def test_cifar10_concatenates_five_batches_in_order(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path)
    ds = create_dataset("cifar10", str(root), "train")
    raw = [pickle.loads((root / "cifar-10-batches-py" / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    assert len(ds) == 15 and ds.classes == [f"c{i}" for i in range(10)]
    assert ds.labels.tolist() == [label for batch in raw for label in batch[b"labels"]]
    # sample 7 is row 1 of data_batch_3; blue channel of pixel (31, 0)
    assert ds[7]["image"][2, 31, 0] == raw[2][b"data"][1][2 * 1024 + 31 * 32]
    assert len(create_dataset("cifar10", str(tmp_path), "val")) == 3


def test_missing_cifar_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        create_dataset("cifar100", str(tmp_path), "train")
    message = str(err.value)
    assert f"{tmp_path / 'cifar-100-python'}/{{train,test,meta}}" in message and "--data-root" in message
    with pytest.raises(DataError, match="--data-root"):
        create_dataset("cifar10", None, "train")


@pytest.mark.parametrize(
    "content",
    [
        b"not a pickle",
        pickle.dumps({b"fine_labels": [0]}),  # no b"data"
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}),  # not 3072 wide
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0]}),  # one label short
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}),  # no class 100
    ],
)
def test_corrupt_cifar_file_is_a_data_error(tmp_path: Path, content: bytes) -> None:
    root = write_cifar100(tmp_path)
    (root / "cifar-100-python" / "train").write_bytes(content)
    with pytest.raises(DataError, match="cannot read CIFAR-100 file .*train"):
        create_dataset("cifar100", str(root), "train")


def test_image_folder_order_labels_and_ids(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    ds = create_dataset("imagefolder", str(tmp_path), "train", image_size=24, resize=28)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.files == ["cat/x/0.png", "dog/a.png", "dog/b.png"]
    assert ds[1]["image"].shape == (3, 24, 24) and ds[1]["image"].dtype == torch.uint8
    assert ds[2]["label"] == 1 and ds[2]["index"] == 2
    digest = hashlib.sha256((tmp_path / "train/cat/x/0.png").read_bytes()).hexdigest()
    assert ds.sample_ids()[0] == f"cat/x/0.png:{digest}"
    assert ds.mean == (0.485, 0.456, 0.406)


def test_image_folder_clean_view_is_resize_then_centre_crop(tmp_path: Path) -> None:
    # 90x30, thirds red | green | blue: shorter side 30 -> 15 gives 45x15, the centre 15x15 is the green third
    stripes = np.zeros((30, 90, 3), np.uint8)
    stripes[:, :30, 0], stripes[:, 30:60, 1], stripes[:, 60:, 2] = 255, 255, 255
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(stripes).save(tmp_path / "train" / "a" / "wide.png")
    image = create_dataset("imagefolder", str(tmp_path), "train", image_size=15, resize=15)[0]["image"]
    assert image.shape == (3, 15, 15)
    assert (image[1, :, 1:-1] == 255).all() and (image[[0, 2], :, 1:-1] == 0).all()


def test_image_folder_refusals(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    with pytest.raises(DataError, match="val"):
        create_dataset("imagefolder", str(tmp_path), "val")
    with pytest.raises(DataError, match="unknown split 'test'"):
        create_dataset("imagefolder", str(tmp_path), "test")
    with pytest.raises(DataError, match="image_size"):
        create_dataset("imagefolder", str(tmp_path), "train", image_size=64, resize=32)
    with pytest.raises(DataError, match="does not take option.*crop.*valid: image_size, resize"):
        create_dataset("imagefolder", str(tmp_path), "train", crop=3)
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images under"):
        create_dataset("imagefolder", str(tmp_path / "empty"), "train")
    (tmp_path / "train" / "cat" / "x" / "0.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match="cannot decode image .*0.png"):
        create_dataset("imagefolder", str(tmp_path), "train")[0]


def test_digits_is_a_stratified_split_of_real_data() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, val = create_dataset("digits", None, "train"), create_dataset("digits", None, "val")
    assert len(train) + len(val) == 1797 and train.num_classes == 10 and train.classes[0] == "zero"
    assert val.classes[9] == "nine"
    assert np.bincount(val.labels).tolist() == (np.bincount(raw.target) // 5).tolist()  # a fifth of each class
    assert not set(train.sample_ids()) & set(val.sample_ids())
    assert sorted(train.labels.tolist() + val.labels.tolist()) == sorted(raw.target.tolist())
    image = train[0]["image"]  # sklearn's first digit, upsampled 4x and scaled 0..16 -> 0..255
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and train[0]["label"] == raw.target[0]
    assert image[0, 4 * 3 + 1, 4 * 5 + 2] == round(raw.images[0, 3, 5] * 255 / 16)
    assert torch.equal(image[0], image[2])


def test_fingerprint_is_stable_and_moves_with_the_data(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path / "a")
    base = dataset_fingerprint(create_dataset("cifar100", str(root), "train"))
    assert dataset_fingerprint(create_dataset("cifar100", str(root), "train")) == base
    shutil.copytree(root, tmp_path / "b")  # the same files elsewhere: same fingerprint
    assert dataset_fingerprint(create_dataset("cifar100", str(tmp_path / "b"), "train")) == base
    changed = []
    ds = create_dataset("cifar100", str(root), "train")
    ds.labels[0] = (ds.labels[0] + 1) % 100
    changed.append(ds)
    ds = create_dataset("cifar100", str(root), "train")
    ds.images[3, 0, 0, 0] ^= 1
    changed.append(ds)
    ds = create_dataset("cifar100", str(root), "train")
    ds.images, ds.labels = ds.images[[1, 0, *range(2, 20)]], ds.labels[[1, 0, *range(2, 20)]]
    changed.append(ds)
    ds = create_dataset("cifar100", str(root), "train")
    ds.images, ds.labels = ds.images[:-1], ds.labels[:-1]
    changed.append(ds)
    assert all(dataset_fingerprint(d) != base for d in changed)


def test_image_folder_fingerprint_survives_a_move_but_not_an_edit(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "a")
    base = dataset_fingerprint(create_dataset("imagefolder", str(tmp_path / "a"), "train"))
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert dataset_fingerprint(create_dataset("imagefolder", str(tmp_path / "b"), "train")) == base
    Image.new("RGB", (41, 30)).save(tmp_path / "b" / "train" / "dog" / "b.png")
    assert dataset_fingerprint(create_dataset("imagefolder", str(tmp_path / "b"), "train")) != base


def test_image_folder_fingerprint_sees_other_content_of_the_same_size(tmp_path: Path) -> None:
    # BMP files are uncompressed: another picture of the same dimensions has exactly the same size
    path = tmp_path / "train" / "a" / "0.bmp"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    size, base = path.stat().st_size, dataset_fingerprint(create_dataset("imagefolder", str(tmp_path), "train"))
    Image.new("RGB", (8, 8), (10, 200, 10)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the edit comes a second later
    assert path.stat().st_size == size
    assert dataset_fingerprint(create_dataset("imagefolder", str(tmp_path), "train")) != base


def test_image_folder_digests_are_computed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from richkd_cache.data import fingerprint

    write_image_folder(tmp_path)
    base = dataset_fingerprint(create_dataset("imagefolder", str(tmp_path), "train"))
    read = []
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: read.append(path) or "x")
    assert dataset_fingerprint(create_dataset("imagefolder", str(tmp_path), "train")) == base and read == []
    edited = tmp_path / "train" / "dog" / "a.png"
    Image.new("RGB", (21, 50)).save(edited)
    dataset_fingerprint(create_dataset("imagefolder", str(tmp_path), "train"))
    assert read == [edited]  # only the changed file is read again


def test_image_folder_train_and_val_must_hold_the_same_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / cls / "v.png")
    assert create_dataset("imagefolder", str(tmp_path), "val").classes == ["cat", "dog"]
    shutil.rmtree(tmp_path / "val" / "cat")
    (tmp_path / "val" / "cow").mkdir()
    for split in ("train", "val"):
        only_in = r"only in \w+/: \w+ \(1\)"
        with pytest.raises(DataError, match=rf"different class folders \({only_in}; {only_in}\)") as err:
            create_dataset("imagefolder", str(tmp_path), split)
        assert "cat" in str(err.value) and "cow" in str(err.value)


def test_normalize_follows_the_images_device_and_formula() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(images, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert out.dtype == torch.float32 and out.device == images.device
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 2.0]))


def test_random_crop_flip_is_a_crop_and_flip_of_the_padded_image() -> None:
    """The crop-flip policy drawn fresh (a run without stored views): an 8 px image pads by 1 * 8 // 32 -> 1;
    at 16 px by 2."""
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    policy = create_policy("crop-flip", 16)

    def random_crop_flip(seed: int) -> torch.Tensor:
        return policy.replay(images, policy.draw(torch.Generator().manual_seed(seed), len(images)))

    out, again, other = random_crop_flip(0), random_crop_flip(0), random_crop_flip(1)
    assert out.dtype == torch.uint8 and out.shape == images.shape and torch.equal(out, again)
    assert not torch.equal(out, other)
    padded = F.pad(images, (2, 2, 2, 2))
    chosen = set()
    for i in range(64):
        matches = [(t, l, f) for t in range(5) for l in range(5) for f in (False, True)
                   if torch.equal(out[i], padded[i, :, t : t + 16, l : l + 16].flip(-1) if f else
                                  padded[i, :, t : t + 16, l : l + 16])]
        assert matches, f"sample {i} is no crop/flip of its padded input"
        chosen.add(matches[0])
    # the draws cover every offset and both flips, as RandomCrop + RandomHorizontalFlip do
    assert {t for t, _, _ in chosen} == set(range(5)) and {l for _, l, _ in chosen} == set(range(5))
    assert {f for _, _, f in chosen} == {False, True}


def test_registry_lists_and_rejects_names() -> None:
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder"]
    with pytest.raises(DataError, match="did you mean cifar100.*valid: cifar10, cifar100, digits, imagefolder"):
        create_dataset("cifar1000", None, "train")
    with pytest.raises(DataError, match="unknown split 'holdout' for digits; valid: train, val"):
        create_dataset("digits", None, "holdout")


class _CreatesFile:
    """What a tampered pickle can hide: a reduce that calls a function (here one creating a file) on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("tampered", ["train", "meta"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path: Path, tampered: str,
                                                                   protocol: int) -> None:
    root = write_cifar100(tmp_path / "data")
    file = root / "cifar-100-python" / tampered
    content = pickle.loads(file.read_bytes())
    content[b"extra"] = _CreatesFile(tmp_path / "marker")
    file.write_bytes(pickle.dumps(content, protocol=protocol))
    with pytest.raises(DataError, match=f"cannot read CIFAR-100 file .*{tampered}: .*io.open.*refused") as err:
        create_dataset("cifar100", str(root), "train")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_any_protocol_load_with_the_plain_data_reader(tmp_path: Path, protocol: int) -> None:
    root = write_cifar100(tmp_path)
    folder = root / "cifar-100-python"
    raw = pickle.loads((folder / "train").read_bytes())
    for name in ("train", "meta"):
        (folder / name).write_bytes(pickle.dumps(pickle.loads((folder / name).read_bytes()), protocol=protocol))
    ds = create_dataset("cifar100", str(root), "train")
    assert ds.labels.tolist() == raw[b"fine_labels"] and ds.classes[99] == "class_99"
    assert ds.images[4, 2, 5, 0] == raw[b"data"][4][2 * 32 + 5]


def test_cifar_pickle_with_object_arrays_is_refused(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path)
    batch = {b"data": np.array([[1, 2]], dtype=object), b"fine_labels": [0]}
    (root / "cifar-100-python" / "train").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="refused dtype object"):
        create_dataset("cifar100", str(root), "train")
