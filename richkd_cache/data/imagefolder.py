"""ImageNet-style trees, ROOT/<split>/<class>/<image>, decoded one file at a time in DataLoader workers.

ROOT is the folder that holds train/ and val/ (not a split folder itself). Class names are the
subfolder names; images may sit in nested folders below their class folder. Hidden files and
folders (".name") are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from richkd_cache.data._base import IMAGENET_MEAN, IMAGENET_STD, ImageDataset
from richkd_cache.data.fingerprint import file_digests
from richkd_cache.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderDataset(ImageDataset):
    """Canonical order: classes sorted by name, then files sorted by path relative to the split folder.

    `whole(i)` decodes image i to RGB; a sample (`ds[i]`) is its clean view (shorter side to `resize`, centre
    crop `image_size`), so batches stack and the models see what an evaluation transform shows.
    Labels index the sorted class folders, so train/ and val/ must hold the same class folders.
    """

    def __init__(self, root: str | None, split: str, image_size: int = 224, resize: int = 256) -> None:
        if root is None:
            raise DataError("imagefolder needs --data-root: a folder with train/ and val/ class subfolders")
        if not 0 < image_size <= resize:
            raise DataError(f"imagefolder needs 0 < image_size <= resize, got image_size {image_size}, resize {resize}")
        base = Path(root) / split
        if not base.is_dir():
            raise DataError(f"image folder {base} not found: expected {root}/{split}/<class>/<image files>")
        self.name, self.split, self.root = "imagefolder", split, str(root)
        self.classes = _class_folders(base)
        _check_same_classes(Path(root), split, self.classes)
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            found = sorted(_image_files(base, base / cls))
            files += found
            labels += [label] * len(found)
        if not files:
            raise DataError(f"no images under {base}: expected {base}/<class>/<image files> ({', '.join(EXTENSIONS)})")
        self.base = base
        self.files = files  # posix paths relative to base: identical on every OS, so fingerprints agree
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size, self.resize = image_size, resize
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def options(self) -> dict:
        return {"image_size": self.image_size, "resize": self.resize}

    @property
    def image_side(self) -> int:
        return self.image_size  # every image is centre-cropped to it

    def __getitem__(self, i: int) -> dict:
        return {"image": self.clean(self.whole(i)), "label": int(self.labels[i]), "index": int(i)}

    def whole(self, i: int) -> torch.Tensor:
        """The whole decoded image (3, H, W) uint8: what random-resized-crop views crop."""
        path = self.base / self.files[i]
        try:
            with Image.open(path) as img:
                # convert() to the image's own mode is a full copy (~0.1-0.2 ms at ImageNet sizes, ~5 % of
                # stage two's per-draw cost): only other modes (L, CMYK, P, ...) are converted
                return TF.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot decode image {path}: {e}; remove or replace the file") from None
        except Image.DecompressionBombError as e:  # PIL refuses to decode over 2x MAX_IMAGE_PIXELS: not an OSError
            raise DataError(f"image {path} is too large to decode safely ({str(e).rstrip('.')}); "
                            "shrink or remove the file") from None

    def clean(self, image: torch.Tensor) -> torch.Tensor:
        """The clean view: shorter side to `resize`, centre crop `image_size` (an evaluation transform)."""
        image = TF.resize(image, self.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(image, [self.image_size, self.image_size]).contiguous()  # (3, S, S) uint8

    def sample_ids(self) -> list[str]:
        """"relative/path:sha256 of the file": the content is the identity, so an image replaced by another
        of the same size is a different sample; moves with the tree (the digests' cost: `file_digests`)."""
        return [f"{f}:{d}" for f, d in zip(self.files, file_digests(self.base, self.files))]


def _class_folders(base: Path) -> list[str]:
    return sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))


def _check_same_classes(root: Path, split: str, classes: list[str]) -> None:
    """Labels index the sorted class folders, so a class missing from one split would shift the
    other split's labels silently: train/ and val/ (where both exist) must hold the same folders."""
    other = "val" if split == "train" else "train"
    if not (root / other).is_dir():
        return
    other_classes = _class_folders(root / other)
    if other_classes == classes:
        return
    only = {split: sorted(set(classes) - set(other_classes)), other: sorted(set(other_classes) - set(classes))}
    shown = "; ".join(f"only in {s}/: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
                      for s, names in only.items() if names)
    raise DataError(f"{root}/train and {root}/val hold different class folders ({shown}): labels are indices of "
                    "the sorted class folders, so both splits need the same ones")


def _image_files(base: Path, folder: Path) -> list[str]:
    """Image files below `folder` as posix paths relative to `base`, skipping hidden entries."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                found.append((Path(dirpath) / name).relative_to(base).as_posix())
    return found
