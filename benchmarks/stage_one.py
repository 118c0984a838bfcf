"""Stage-one throughput: bare teacher + CLIP forward vs the full build loop, same data and device, one run.

Target (DESIGN.md section 5): build >= 0.9x forward, i.e. loading, preprocessing, block assembly and
zarr writes hide behind the forward passes. "Forward" runs the two models on batches already in
memory; "build" is the pipeline's own `forward_blocks` (DataLoader, forward, writer thread) into a
fresh cache. The two alternate over the rounds so drift on a shared machine hits both.

The forward's FLOPs per image are counted from the models as the build runs them (the teacher on every
teacher view, CLIP on the clean one) with torch.utils.flop_counter (matmuls, convolutions, attention; 2
FLOPs per multiply-add) on one sample; FLOP/s over the device's dense bf16 peak (--peak-tflops, known for
H100, H200 and A100) is the fraction of peak the bare forward reaches.

    python benchmarks/stage_one.py --quick                        # CPU, a few minutes
    python benchmarks/stage_one.py --device cuda --clip ViT-L/14 --dataset cifar100 --data-root DIR
    python benchmarks/stage_one.py ... --teacher-views all      # the teacher on all 162 views, CLIP clean
    python benchmarks/stage_one.py --device cuda --clip ViT-L/14 --dataset synthetic --num-samples 20000 \
        --rounds 2 --teacher-views all --batch-size 512 --workers 8   # random CIFAR-sized images

The last line printed is JSON with the keys forward_img_s, build_img_s, build_over_forward, flops_per_image
and bf16_peak_fraction.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cache_store.schema import ClipLayout
from pipelines.build import Teacher, build_manifest, cache_layout, forward_blocks, make_forward
from pipelines.config import BuildConfig, resolve_device
from pipelines.progress import Reporter
from cache_store import create_cache
from richkd_cache.clip import load_clip, resolve_clip
from richkd_cache.data import ArrayImageDataset, create_dataset
from richkd_cache.models import create_model
from pipelines.build import BuildViews
from richkd_cache.views import policy_of, teacher_policy


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--clip", default="ViT-B/32")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--teacher-views", default="clean", help="clean, all or K (CLIP stays on the clean view)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-samples", type=int, default=50_000, help="--dataset synthetic: images")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (default: known for H100, H200, A100; none on a CPU)")
    p.add_argument("--quick", action="store_true", help="the digits validation split, 2 rounds, 2 CPU cores")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.split, args.rounds, args.workers, args.batch_size = "val", 2, 1, 128
    device = resolve_device(args.device)
    dataset = (synthetic_cifar(args.num_samples) if args.dataset == "synthetic"
               else create_dataset(args.dataset, args.data_root, args.split))
    model = create_model(args.teacher, dataset.num_classes).to(device).eval()
    teacher = Teacher(model, args.teacher, {"arch": args.teacher, "checkpoint_sha256": "benchmark"})
    clip = load_clip(resolve_clip(args.clip, "random"), device=device)
    size = int(dataset[0]["image"].shape[-1])
    value = teacher_policy(args.teacher_views, size)
    views = BuildViews(value, policy_of(value, size))  # the teacher's views, replayed on the device
    forward = make_forward(teacher, [(bench_clip_layout(clip), clip)], dataset, device, views)
    batches = preload(dataset, args.batch_size)

    forward_s, build_s = [], []
    forward(batches[0])  # warm-up: kernels, allocator
    for _ in range(args.rounds):
        forward_s.append(time_forward(forward, batches, device))
        build_s.append(time_build(args, dataset, teacher, clip, device, views))
    n = len(dataset)
    flops = forward_flops(forward, dataset)
    peak = args.peak_tflops or bf16_peak_tflops(device)
    result = {
        "forward_img_s": n / statistics.median(forward_s),
        "build_img_s": n / statistics.median(build_s),
        "flops_per_image": flops, "peak_tflops": peak,
        "images": n, "teacher_views": views.num_views, "teacher": args.teacher, "clip": args.clip, "batch_size": args.batch_size,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    result["build_over_forward"] = result["build_img_s"] / result["forward_img_s"]
    result["forward_tflops_s"] = result["forward_img_s"] * flops / 1e12
    result["bf16_peak_fraction"] = result["forward_tflops_s"] / peak if peak else None
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"build / forward throughput: {result['build_over_forward']:.3f} (target >= 0.90)")
    print(f"forward: {result['forward_img_s']:.1f} img/s x {flops / 1e9:.2f} GFLOP/img = "
          f"{result['forward_tflops_s']:.3f} TFLOP/s"
          + (f", {100 * result['bf16_peak_fraction']:.1f} % of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""))
    print(json.dumps(result))


def synthetic_cifar(n: int) -> ArrayImageDataset:
    """n random 32x32 uint8 images, 100 classes, CIFAR-100's statistics (the cost of real ones)."""
    rng = np.random.default_rng(0)
    return ArrayImageDataset("synthetic", "train", "-", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                             rng.integers(0, 100, n), [f"c{i}" for i in range(100)],
                             (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def forward_flops(forward, dataset) -> int:
    """FLOPs of one sample through the build's own forward: the teacher on its views, CLIP on the clean one."""
    counter = FlopCounterMode(display=False)
    with counter:
        forward(next(iter(torch.utils.data.DataLoader(dataset, batch_size=1))))
    return counter.get_total_flops()


# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first name that matches
BF16_PEAKS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAKS.items() if key in name), None)


def preload(dataset, batch_size: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return list(loader)


def time_forward(forward, batches: list[dict], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        forward(batch)
    sync(device)
    return time.perf_counter() - t0


def time_build(args, dataset, teacher: Teacher, clip, device: torch.device, views: BuildViews) -> float:
    """The build loop into a fresh local cache (creation and finalising are not timed)."""
    folder = tempfile.mkdtemp(prefix="richkd-bench-")
    try:
        cfg = BuildConfig(dataset=args.dataset, data_root=args.data_root, split=args.split, teacher=args.teacher,
                          teacher_checkpoint="", clip=args.clip, clip_pretrained="random", clip_checkpoint=None,
                          prompts=("single",), out=f"{folder}/bench.zarr", batch_size=args.batch_size,
                          workers=args.workers, teacher_views=args.teacher_views)
        layout = cache_layout(len(dataset), dataset.num_classes, teacher.model.num_features, [clip], None, views)
        writer = create_cache(cfg.out, layout, build_manifest(cfg, dataset, teacher, {BENCH_CLIP: clip}))
        sync(device)
        t0 = time.perf_counter()
        forward_blocks(writer, writer.pending_blocks(), dataset, teacher, [(writer.clips[BENCH_CLIP], clip)], device,
                       args.batch_size, args.workers, Reporter(quiet=True), views=views)
        sync(device)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


BENCH_CLIP = "clip"  # the benchmark's one CLIP model's name in its cache


def bench_clip_layout(clip) -> ClipLayout:
    return ClipLayout(BENCH_CLIP, clip.embed_dim, clip.feature_dim, f"clip/{BENCH_CLIP}", f"clip/{BENCH_CLIP}/written")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
