"""CIFAR-10 and CIFAR-100 from their standard python-pickle files (no download: bring the files).

Each batch file is a pickle of a dict with b"data", (N, 3072) uint8 rows holding the 1024 red, then
1024 green, then 1024 blue values of a 32x32 image, and a list of N integer labels.

A pickle can name any importable function and call it while it loads, so these files (often copied
from mirrors) are read with an unpickler that rebuilds plain data and numpy arrays and refuses
every other name before anything is called.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from richkd_cache.data._base import ArrayImageDataset
from richkd_cache.errors import DataError

SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _Layout:
    name: str
    pretty: str
    folder: str  # the folder the official tarball unpacks to
    files: dict[str, list[str]]  # split -> batch files, concatenated in this order
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = _Layout(
    "cifar10", "CIFAR-10", "cifar-10-batches-py",
    {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]},
    "batches.meta", b"labels", b"label_names", 10,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = _Layout(
    "cifar100", "CIFAR-100", "cifar-100-python",
    {"train": ["train"], "val": ["test"]},
    "meta", b"fine_labels", b"fine_label_names", 100,
    # mdistiller's values: the normalisation its published CIFAR-100 teachers were trained with
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
)


def load_cifar10(root: str | None, split: str) -> ArrayImageDataset:
    return _load(CIFAR10, root, split)


def load_cifar100(root: str | None, split: str) -> ArrayImageDataset:
    return _load(CIFAR100, root, split)


def _load(layout: _Layout, root: str | None, split: str) -> ArrayImageDataset:
    base = _find_folder(layout, root)
    batches = [_read_batch(layout, base / f) for f in layout.files[split]]
    images = np.concatenate([b[0] for b in batches])  # (N, 32, 32, 3) uint8
    labels = np.concatenate([b[1] for b in batches])  # (N,) int64
    return ArrayImageDataset(layout.name, split, str(root), images, labels, _read_classes(layout, base),
                             layout.mean, layout.std)


def _find_folder(layout: _Layout, root: str | None) -> Path:
    """Accept ROOT containing the unpacked folder (torchvision's layout) or ROOT being that folder."""
    files = [*layout.files["train"], *layout.files["val"], layout.meta]
    if root is None:
        raise DataError(f"{layout.pretty} needs --data-root: the folder holding {layout.folder}/")
    for base in (Path(root) / layout.folder, Path(root)):
        if all((base / f).is_file() for f in files):
            return base
    raise DataError(
        f"{layout.pretty} not found under {root}: expected {Path(root) / layout.folder}/{{{','.join(files)}}} "
        f"(the python version from {SOURCE}); pass --data-root"
    )


def _read_batch(layout: _Layout, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images (N, 32, 32, 3) uint8 and labels (N,) int64, checked."""
    batch = _unpickle(path, layout)
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        _corrupt(path, layout, f"expected a dict with b'data' and {layout.label_key!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        _corrupt(path, layout, f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        _corrupt(path, layout, f"{len(data)} images but labels of shape {labels.shape} ({labels.dtype})")
    if len(labels) and not 0 <= labels.min() <= labels.max() < layout.num_classes:
        _corrupt(path, layout, f"labels outside 0..{layout.num_classes - 1}")
    # each row is channel-major (3, 32, 32); HWC is what stage two puts on the device
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _read_classes(layout: _Layout, base: Path) -> list[str]:
    path = base / layout.meta
    meta = _unpickle(path, layout)
    names = meta.get(layout.names_key) if isinstance(meta, dict) else None
    if names is None or len(names) != layout.num_classes:
        _corrupt(path, layout, f"expected {layout.num_classes} class names under {layout.names_key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _unpickle(path: Path, layout: _Layout) -> object:
    try:
        with open(path, "rb") as f:
            return _PlainDataUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated download, wrong file: one line, not a traceback
        _corrupt(path, layout, f"{e.__class__.__name__}: {e}")


def _rebuild_dtype(spec: object, align: bool = False, copy: bool = False) -> np.dtype:
    """numpy.dtype as a pickle calls it, for numeric dtypes only: an object dtype would let the
    array's state carry arbitrary Python objects."""
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refused dtype {dtype} (CIFAR files hold numeric arrays only)")
    return dtype


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 writes bytes at pickle protocol 2 as _codecs.encode(text, "latin1"); no other codec."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r} (only latin1 rebuilds bytes)")
    return text.encode("latin1")


# Every name an official CIFAR pickle (numpy at protocol 2) or a re-saved one (protocols 4-5) refers to.
# ndarray.__reduce__ names numpy's _reconstruct (numpy.core before numpy 2, numpy._core since), and
# __reduce_ex__(5) names _frombuffer; asking numpy for them keeps this table right on either version.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]
_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _rebuild_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _latin1_bytes,
}


class _PlainDataUnpickler(pickle.Unpickler):
    """Dicts, lists, tuples, str/bytes, numbers and numeric numpy arrays; any other global is refused
    before it is imported, so a tampered file cannot run code (pickle's own opcodes build the rest)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR file never contains (refused: loading it could run code)"
            )
        return _ALLOWED[(module, name)]


def _corrupt(path: Path, layout: _Layout, why: str) -> NoReturn:
    raise DataError(f"cannot read {layout.pretty} file {path}: {why}; re-download the python version from {SOURCE}")
