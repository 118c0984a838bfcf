"""ImageNet-style trees: ROOT/<split>/<class>/<image>, decoded in DataLoader workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF

from richkd_cache.data._base import IMAGENET_MEAN, IMAGENET_STD, ImageDataset
from richkd_cache.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderDataset(ImageDataset):
    """Canonical order: classes sorted by name, then files sorted by relative path.

    Each image is decoded to RGB and given the clean-view geometry (shorter side to `resize`, centre
    crop `image_size`), so batches stack and the teachers see what an evaluation transform shows.
    """

    def __init__(self, root: str | None, split: str, image_size: int = 224, resize: int = 256) -> None:
        if root is None:
            raise DataError("imagefolder needs --data-root: a folder with train/ and val/ class subfolders")
        base = Path(root) / split
        if not base.is_dir():
            raise DataError(f"image folder {base} not found: expected {root}/{split}/<class>/<image files>")
        self.name, self.split, self.root = "imagefolder", split, str(root)
        self.classes = sorted(d.name for d in base.iterdir() if d.is_dir())
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            found = sorted(p for p in (base / cls).rglob("*") if p.suffix.lower() in EXTENSIONS)
            files += [str(p.relative_to(base)) for p in found]
            labels += [label] * len(found)
        if not files:
            raise DataError(f"no images under {base}: expected {base}/<class>/<image files> ({', '.join(EXTENSIONS)})")
        self.base, self.files = base, files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size, self.resize = image_size, resize
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.base / self.files[i]) as img:
            image = TF.pil_to_tensor(img.convert("RGB"))  # (3, H, W) uint8
        image = TF.resize(image, self.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, [self.image_size, self.image_size])
        return {"image": image.contiguous(), "label": int(self.labels[i]), "index": int(i)}

    def sample_ids(self) -> list[str]:
        return [f"{f}:{os.path.getsize(self.base / f)}" for f in self.files]

