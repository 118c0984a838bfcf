"""The paper's other evaluations of a trained student, beside `evaluate`'s accuracy and attacks:

- common corruptions from CIFAR-10-C / CIFAR-100-C files (`<corruption>.npy`: the test set 5 times,
  severities 1..5 in order, uint8 (5 N, 32, 32, 3); `labels.npy` beside them), top-1 per severity;
- the student's accuracy by the teacher's category on the same images (confident/uncertain x
  correct/wrong, the paper's Table 9);
- the inter-class correlation matrix of the student's logits (Fig. 5) and a t-SNE of its pooled
  features (Fig. 4), as PNG plots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.train import batches, setup_images
from richkd_cache.data import ImageDataset, normalize
from richkd_cache.errors import DataError

SEVERITIES = 5


@torch.no_grad()
def outputs(model: torch.nn.Module, images: np.ndarray | None, data: ImageDataset, device: torch.device,
            batch_size: int = 256, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), pooled features (N, F)) on the CPU, for the dataset or for given HWC uint8 images;
    image files are decoded by `workers` DataLoader workers."""
    model.eval()
    logits, feats = [], []
    if images is not None:
        chunks = (torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size].transpose(0, 3, 1, 2)))
                  for i in range(0, len(images), batch_size))
    else:
        chunks = (x for _, x, _ in batches(setup_images(data, device), data, batch_size, torch.arange(len(data)),
                                           workers))
    for x in chunks:
        z, f = model(normalize(x.to(device), data.mean, data.std))
        logits.append(z.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(logits), torch.cat(feats)


def corruption_accuracy(model: torch.nn.Module, folder: str, data: ImageDataset, device: torch.device) -> list[dict]:
    """Top-1 (%) per corruption file and severity 1..5."""
    root = Path(folder)
    labels_file = root / "labels.npy"
    if not labels_file.is_file():
        raise DataError(f"{folder} is not a CIFAR-C folder: expected labels.npy beside the <corruption>.npy files")
    labels = load_corruption_labels(labels_file, data.num_classes)
    rows = []
    for file in sorted(p for p in root.glob("*.npy") if p.name != "labels.npy"):
        images = load_npy(file)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DataError(f"{file} holds {images.dtype} {images.shape}, not CIFAR-C's uint8 images (5 N, H, W, 3)")
        if len(images) != len(labels) or len(images) % SEVERITIES:
            raise DataError(f"{file}: {len(images)} images for {len(labels)} labels (expected 5 severities of equal size)")
        n = len(images) // SEVERITIES
        for s in range(SEVERITIES):
            logits, _ = outputs(model, images[s * n : (s + 1) * n], data, device)
            top1 = 100.0 * (logits.argmax(1) == labels[s * n : (s + 1) * n]).float().mean().item()
            rows.append({"corruption": file.stem, "severity": s + 1, "top1": top1})
    if not rows:
        raise DataError(f"no <corruption>.npy files in {folder}")
    return rows


def load_npy(file: Path) -> np.ndarray:
    """A .npy array, memory-mapped; never pickled objects (allow_pickle stays off), damage in one line."""
    try:
        return np.load(file, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{file} is not a readable .npy array ({e})") from None


def load_corruption_labels(file: Path, num_classes: int) -> torch.Tensor:
    """labels.npy: (5 N,) integer classes of the dataset, 0..C-1."""
    labels = load_npy(file)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{file} holds {labels.dtype} {labels.shape}, not CIFAR-C's integer labels (5 N,)")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DataError(f"{file} holds labels outside 0..{num_classes - 1}, the classes of the evaluated dataset")
    return torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: the memory map is read-only


def accuracy_by_teacher_category(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                                 threshold: float = 0.5) -> list[dict]:
    """Table 9: for each category of the teacher's prediction, how many images and the student's top-1 on them."""
    confidence, guess = teacher_logits.softmax(1).max(1)
    student_right = student_logits.argmax(1) == labels
    rows = []
    for confident in (True, False):
        for correct in (True, False):
            members = ((confidence >= threshold) == confident) & ((guess == labels) == correct)
            count = int(members.sum())
            rows.append({"teacher": f"{'confident' if confident else 'uncertain'} {'correct' if correct else 'wrong'}",
                         "images": count,
                         "student_top1": 100.0 * float(student_right[members].float().mean()) if count else None})
    return rows


def class_correlation(logits: torch.Tensor) -> np.ndarray:
    """(C, C) Pearson correlation between classes' logits over the images (Fig. 5)."""
    return np.corrcoef(logits.numpy().T)


def write_plots(logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, out: Path,
                max_points: int = 2000, seed: int = 0) -> list[str]:
    """correlation.png (Fig. 5) and tsne.png (Fig. 4, at most `max_points` images)."""
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    out.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(class_correlation(logits), cmap="coolwarm", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax)
    ax.set_title("inter-class correlation of the student's logits")
    fig.savefig(out / "correlation.png", dpi=120, bbox_inches="tight")

    pick = np.random.default_rng(seed).permutation(len(feats))[:max_points]
    points = TSNE(n_components=2, init="pca", random_state=seed,
                  perplexity=min(30.0, max(2.0, (len(pick) - 1) / 3))).fit_transform(feats[pick].numpy())
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    ax.scatter(points[:, 0], points[:, 1], c=labels[pick].numpy(), cmap="tab20", s=4)
    ax.set_title("t-SNE of the student's pooled features")
    ax.set_xticks([]), ax.set_yticks([])
    fig.savefig(out / "tsne.png", dpi=120, bbox_inches="tight")
    return [str(out / "correlation.png"), str(out / "tsne.png")]
