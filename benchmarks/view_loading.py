"""Stage two's image loading: random-resized-crop views replayed in DataLoader workers vs torchvision's own.

Target: ours >= 0.9x torchvision's images/s. Three ways to load the same images in the same order, through a
DataLoader with the same workers and batch size:

    torchvision   torchvision.datasets.ImageFolder with Compose([RandomResizedCrop(S), RandomHorizontalFlip(),
                  PILToTensor()]): PIL decode, crop + resize and flip on the PIL image, (3, S, S) uint8
    stored        DrawnViews(ImageFolderDataset(...), policy, index, records): each draw replays a view record
                  the cache holds (K drawn per sample with `stored_views` beforehand, one picked per draw)
    fresh         DrawnViews(..., records=None): each draw's view is drawn from the sample's generator

The baseline stops before normalisation, as ours does: all three yield uint8 (3, S, S), and the float
conversion and normalisation happen later, on the training device. torchvision draws its own boxes (the same
distribution, not the same boxes). Images are synthetic JPEGs (quality 90, ImageNet-like sizes: mostly 500 px
on the long side at 4:3 or 3:2, a quarter portrait; textured so that they compress to ~4 bits per pixel and
decode like photographs: ~100 KB each) written to a temporary ImageNet-layout folder, or those of `--root`.
Every file is read once before timing, so all variants read from the page cache.

A pass's images/s runs from the arrival of each worker's first batch (worker start-up and the first decode
excluded) to the last batch's; its CPU ms per image (this process and its workers, over the whole pass) is the
steadier figure on a shared machine, where other users' load slows the wall clock. The variants alternate
round by round (torchvision, stored, fresh, torchvision, ...) so that drift hits all alike. Reported: the
median and the best round's images/s (the best is the round least slowed by others), the median CPU time, and
each as a ratio ours / torchvision's throughput (higher is better for ours).

    python benchmarks/view_loading.py --quick                    # ~10-15 s smoke run: 300 images, 2 rounds
    python benchmarks/view_loading.py                            # 1,000 images, 5 rounds (~40-60 s on 2 cores)
    python benchmarks/view_loading.py --root DIR --images 20000  # a random sample of DIR/train's images
    python benchmarks/view_loading.py --json                     # the result as JSON on the last line

`--root DIR` that does not exist yet is created and filled with the synthetic images (and kept, so that a
second run skips writing them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from richkd_cache.data.imagefolder import ImageFolderDataset
from richkd_cache.data.replay import DrawnViews
from richkd_cache.views import ViewPolicy, create_policy, stored_views

VARIANTS = ("torchvision", "stored", "fresh")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="an ImageNet-layout folder ROOT/<split>/<class>/<image>; "
                   "default: synthetic JPEGs in a temporary folder")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=1000, help="images per pass (synthetic: images written)")
    p.add_argument("--classes", type=int, default=4, help="synthetic: class folders")
    p.add_argument("--size", type=int, default=224, help="the views' side S")
    p.add_argument("--views", type=int, default=10, help="stored views per sample (K), one replayed per draw")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="300 images, 2 rounds: a ~10-15 s smoke run")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.images, args.rounds = 300, 2
    with tempfile.TemporaryDirectory(prefix="view_loading_") as tmp:
        root = Path(args.root or tmp)
        if not (root / args.split).is_dir():
            write_images(root / args.split, args.images, args.classes, args.seed)
        result = run(args, root)
    print_table(result)
    if args.json:
        print(json.dumps(result))


def run(args: argparse.Namespace, root: Path) -> dict:
    ours = ImageFolderDataset(str(root), args.split, image_size=args.size, resize=args.size)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(ours))[: args.images]  # (n,) our sample indices, one pass's draws in order
    if len(order) <= max(1, args.workers) * args.batch_size:
        raise SystemExit(f"{len(order)} images: a pass needs more than one batch per worker to be timed")
    files = [ours.base / ours.files[i] for i in order]
    read_all(files)  # the page cache: every variant reads from memory
    sizes = np.array([header_size(f) for f in files])  # (n, 2) width, height
    policy = create_policy("random-resized-crop", args.size)
    records = cache_records(policy, order, sizes, args)
    loaders = {
        "torchvision": lambda: torchvision_loader(root / args.split, ours, order, args),
        "stored": lambda: loader(DrawnViews(ours, policy, order, records), args),
        "fresh": lambda: loader(DrawnViews(ours, policy, order, None, seed=args.seed), args),
    }
    images_s: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            rate, cost = measure(loaders[name](), args.workers)
            images_s[name].append(rate)
            cpu_ms[name].append(cost)
    median = {name: statistics.median(v) for name, v in images_s.items()}
    best = {name: max(v) for name, v in images_s.items()}
    cpu = {name: statistics.median(v) for name, v in cpu_ms.items()}
    ours = ("stored", "fresh")
    return {
        "images_s": median, "ratio": {name: median[name] / median["torchvision"] for name in ours},
        "images_s_best": best, "ratio_best": {name: best[name] / best["torchvision"] for name in ours},
        "cpu_ms_per_image": cpu, "cpu_ratio": {name: cpu["torchvision"] / cpu[name] for name in ours},
        "rounds": {"images_s": images_s, "cpu_ms_per_image": cpu_ms},
        "images": len(order), "mean_size": [float(v) for v in sizes.mean(0)], "mean_kb": mean_kb(files),
        "root": args.root or "synthetic (temporary)", "size": args.size, "views": args.views,
        "workers": args.workers, "batch_size": args.batch_size, "machine": platform.machine(),
        "cores": multiprocessing.cpu_count(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "pillow": Image.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# ---------------------------------------------------------------- the three loaders


def loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def torchvision_loader(split: Path, ours: ImageFolderDataset, order: np.ndarray,
                       args: argparse.Namespace) -> DataLoader:
    """ImageFolder over the same files, read in the same order (its indices mapped by path: both sort classes,
    but nested folders may list in another order)."""
    tf = transforms.Compose([transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(),
                             transforms.PILToTensor()])  # uint8 (3, S, S), like ours: no normalisation here
    folder = datasets.ImageFolder(str(split), transform=tf)
    position = {Path(path): k for k, (path, _) in enumerate(folder.samples)}
    sampler = [position[ours.base / ours.files[i]] for i in order]
    return DataLoader(folder, batch_size=args.batch_size, num_workers=args.workers, sampler=sampler)


def cache_records(policy: ViewPolicy, order: np.ndarray, sizes: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """What stage two gathers from a cache for one pass: each sample's K stored views drawn as stage one draws
    them (from the whole image's size), one of them picked per draw. (n, nbytes) uint8."""
    rng = np.random.default_rng(args.seed + 1)
    rows = [stored_views(args.views, policy, args.seed, int(i), args.views, int(h), int(w))[rng.integers(args.views)]
            for i, (w, h) in zip(order, sizes)]
    return np.stack(rows)


def measure(batches: DataLoader, workers: int) -> tuple[float, float]:
    """(images/s after each worker's first batch, CPU ms per image over the whole pass). The workers' CPU time
    counts once they are joined, which the loader does when its last batch has been taken."""
    warm = max(1, workers)
    cpu = cpu_seconds()
    images, timed, start = 0, 0, None
    for k, batch in enumerate(batches):
        n = len(batch["label"] if isinstance(batch, dict) else batch[1])
        images += n
        if k == warm - 1:
            start = time.perf_counter()
        elif k >= warm:
            timed += n
    seconds = time.perf_counter() - start
    return timed / seconds, 1e3 * (cpu_seconds() - cpu) / images


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its joined children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------- synthetic images


def write_images(split: Path, n: int, classes: int, seed: int) -> None:
    """n JPEGs (quality 90) in split/class_XX/, written by two processes."""
    tasks = [(split / f"class_{k % classes:02d}" / f"img_{k:06d}.jpg", seed, k) for k in range(n)]
    for c in range(classes):
        (split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool(2) as pool:
        pool.map(write_image, tasks, chunksize=16)


def write_image(task: tuple[Path, int, int]) -> None:
    path, seed, k = task
    rng = np.random.default_rng([seed, k])
    width, height = image_size(rng)
    textured(rng, height, width).save(path, "JPEG", quality=90)


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """ImageNet-like: the long side 500 px for most images, else 300-800; 4:3, 3:2 or square; a quarter portrait."""
    long = 500 if rng.random() < 0.7 else int(rng.integers(300, 801))
    short = round(long / rng.choice([4 / 3, 3 / 2, 1.0], p=[0.6, 0.25, 0.15]))
    return (short, long) if rng.random() < 0.25 else (long, short)


def textured(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Colour blobs at three scales (random cells of 32, 6 and 2 px, bicubic) and a grating: it compresses to
    ~4 bits per pixel at quality 90, like a photograph (pure noise would cost far more to decode)."""
    def blobs(cell: int) -> np.ndarray:  # (height, width, 3) float32, centred on 0
        small = rng.integers(0, 256, (-(-height // cell) + 1, -(-width // cell) + 1, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32) - 128

    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.5)
    x, y = np.arange(width, dtype=np.float32)[None], np.arange(height, dtype=np.float32)[:, None]
    grating = rng.uniform(5, 20) * np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)))  # (height, width)
    image = 128 + 0.6 * blobs(32) + 0.25 * blobs(6) + 0.35 * blobs(2) + grating[..., None]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def read_all(files: list[Path]) -> None:
    for f in files:
        f.read_bytes()


def header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:  # reads the header only
        return image.size


def mean_kb(files: list[Path]) -> float:
    return float(np.mean([f.stat().st_size for f in files]) / 1e3)


# ---------------------------------------------------------------- output


def print_table(result: dict) -> None:
    w, h = result["mean_size"]
    rounds = result["rounds"]
    print(f"{result['images']} images (mean {w:.0f} x {h:.0f} px, {result['mean_kb']:.0f} KB), "
          f"{result['workers']} workers, batch {result['batch_size']}, {result['size']} px views, "
          f"{len(rounds['images_s']['torchvision'])} rounds; ratios: ours over torchvision's throughput")
    print(f"  {'':12s} {'median img/s':>12s} {'ratio':>7s} {'best img/s':>11s} {'ratio':>7s} "
          f"{'CPU ms/img':>11s} {'ratio':>7s}   images/s per round")
    for name in VARIANTS:
        per_round = " ".join(f"{v:.0f}" for v in rounds["images_s"][name])
        print(f"  {name:12s} {result['images_s'][name]:12.1f} {result['ratio'].get(name, 1.0):6.3f}x "
              f"{result['images_s_best'][name]:11.1f} {result['ratio_best'].get(name, 1.0):6.3f}x "
              f"{result['cpu_ms_per_image'][name]:11.3f} {result['cpu_ratio'].get(name, 1.0):6.3f}x   {per_round}")
    print("ours / torchvision (target >= 0.9x): " + ", ".join(
        f"{name} {result['ratio'][name]:.3f}x median, {result['ratio_best'][name]:.3f}x best, "
        f"{result['cpu_ratio'][name]:.3f}x CPU" for name in ("stored", "fresh")))


if __name__ == "__main__":
    main()
