"""Stage-two step time: plain cross-entropy vs cached RichKD (L+F) vs online RichKD, in one run.

Targets (DESIGN.md section 5): cached <= 1.10x CE, online >= 5x cached. All three use the same student,
batch, augmentation and optimiser, and the cached step is the trainer's own `train_step`; the online step
runs the teacher and CLIP on the augmented batch first, as training without a cache must. Steps are
interleaved round by round so drift on a shared machine hits all three alike; medians are reported.

    python benchmarks/stage_two.py --quick            # CPU, a few minutes (CLIP ViT-B/32, random weights)
    python benchmarks/stage_two.py --device cuda --clip ViT-L/14

The last line printed is JSON: {"ce_step_s", "cached_step_s", "online_step_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from pipelines.build import Teacher
from pipelines.config import TrainConfig
from pipelines.online import OnlineTargets
from pipelines.targets import Fusion, Targets, augment
from pipelines.train import train_step
from richkd_cache.clip import load_clip, resolve_clip
from richkd_cache.clip_logits import clip_logits
from richkd_cache.data import normalize
from richkd_cache.distill import create_objective, fit_joint_space, fuse_logits
from richkd_cache.models import create_model
from richkd_cache.views import view_params

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--clip", default="ViT-B/32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=2048, help="rows of the in-memory cache")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per method per round (online: a fifth)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--views", default="clean", help="clean, or all: the cache holds CIFAR's 162 views and the "
                   "cached step replays one per sample (CE keeps its random crop and flip)")
    p.add_argument("--quick", action="store_true", help="3 rounds of few steps: a few minutes on 2 CPU cores")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:  # the cache's size does not change a step's cost; computing it does
        args.rounds, args.steps, args.num_samples = 3, 4, 256
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, c = args.num_samples, args.num_classes
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, c, (n,), device=device)
    teacher = create_model(args.teacher, c).to(device).eval()
    clip = load_clip(resolve_clip(args.clip, "random", None), device=str(device))
    text = torch.nn.functional.normalize(torch.randn(18, c, clip.embed_dim, device=device), dim=-1)

    # The cache, as stage two holds it: targets for every row, computed once (eq. 2-4, 7).
    cached = precompute_targets(images, teacher, clip, text)
    generator = torch.Generator(device=device).manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw images: each step augments them the way its trainer would."""
        index = torch.randint(0, n, (args.batch_size,), generator=generator, device=device)
        return index, images[index], labels[index]

    plain = Targets(None, None)
    distilled = with_views(cached, args.views, n, device)
    runners = {
        "ce": make_cached_step("ce", args.student, c, plain, n, device, batch, generator),
        "cached": make_cached_step("richkd", args.student, c, distilled, n, device, batch, generator),
        "online": make_online_step(args.student, c, teacher, clip, text, cached, n, device, batch, generator),
    }
    times = measure(runners, args.rounds, args.steps, device)
    result = {
        "ce_step_s": statistics.median(times["ce"]),
        "cached_step_s": statistics.median(times["cached"]),
        "online_step_s": statistics.median(times["online"]),
    }
    result["cached_over_ce"] = result["cached_step_s"] / result["ce_step_s"]
    result["online_over_cached"] = result["online_step_s"] / result["cached_step_s"]
    result.update(teacher=args.teacher, student=args.student, clip=args.clip, batch_size=args.batch_size,
                  views=args.views,
                  device=str(device), machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=torch.get_num_threads())
    print(f"cached / CE step: {result['cached_over_ce']:.3f}x (target <= 1.10)")
    print(f"online / cached step: {result['online_over_cached']:.1f}x (target >= 5)")
    print(json.dumps(result))


@torch.no_grad()
def precompute_targets(images, teacher, clip, text) -> dict:
    t_logits, t_feats, c_embeds, c_feats = [], [], [], []
    for start in range(0, len(images), 256):
        x = images[start : start + 256]
        logits, feats = teacher(normalize(x, CIFAR_MEAN, CIFAR_STD))
        embeds, cf = clip.encode_images(x)
        t_logits.append(logits), t_feats.append(feats), c_embeds.append(embeds), c_feats.append(cf)
    t_logits, t_feats, c_embeds, c_feats = map(torch.cat, (t_logits, t_feats, c_embeds, c_feats))
    space = fit_joint_space(t_feats, c_feats, 0.7)
    z_c = clip_logits(c_embeds, text, clip.tau)
    return {
        "space": space,
        "logits": fuse_logits(t_logits, z_c, 0.7),  # eq. 4
        "features": {"teacher": space.teacher_part(t_feats), "clip": space.clip_part(c_feats)},  # eq. 7
    }


def with_views(cached: dict, views: str, n: int, device) -> Targets:
    """The trainer's targets: one row per sample, or per (sample, view) with the views' parameters."""
    if views == "clean":
        return Targets(cached["logits"], cached["features"])
    params = torch.from_numpy(view_params("all", n, 32)).to(device)  # (N, 162, 5)
    v = params.shape[1]
    features = {name: part.repeat_interleave(v, 0) for name, part in cached["features"].items()}
    return Targets(cached["logits"].repeat_interleave(v, 0), features, params)


def make_cached_step(target, student_name, c, targets: Targets, n, device, batch, generator) -> Callable[[], None]:
    """The trainer's own augment + lookup + train_step: CE (no targets), or targets gathered from the cache."""
    student = create_model(student_name, c).to(device).train()
    feats = targets.features or {}
    dims = {"teacher": feats["teacher"].shape[1], "clip": feats["clip"].shape[1]} if feats else {}
    return trainer_step(target, student, dims, targets, device, batch, generator)


def make_online_step(student_name, c, teacher, clip, text, cached, n, device, batch, generator) -> Callable[[], None]:
    """Without a cache: `train --online`'s target source runs the teacher on every augmented batch and CLIP
    on its clean images, then the same loss and step."""
    student = create_model(student_name, c).to(device).train()
    feats = cached["features"]
    cfg = TrainConfig(student=student_name, out="-", cache="-", feature_loss="cosine")
    online = OnlineTargets(
        logits=None, features=None, cfg=cfg, fusion=Fusion(text.cpu(), clip.tau, cached["space"], c),
        teacher=Teacher(teacher, "teacher", {}), clip=clip,
        dataset=SimpleNamespace(mean=CIFAR_MEAN, std=CIFAR_STD),
    )
    dims = {"teacher": feats["teacher"].shape[1], "clip": feats["clip"].shape[1]}
    return trainer_step("richkd", student, dims, online, device, batch, generator)


def trainer_step(target, student, dims, targets: Targets, device, batch, generator) -> Callable[[], None]:
    """One step of the trainer's loop (pipelines/train.py: augment, lookup, normalise, train_step)."""
    distilled = target != "ce"
    objective = create_objective(
        target, "kd" if distilled else None, "cosine" if distilled else None, student_dim=student.num_features,
        teacher_dim=dims.get("teacher"), clip_dim=dims.get("clip"),
    ).to(device)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(objective.parameters()), lr=0.05, momentum=0.9)

    def step() -> None:
        index, x, y = batch()
        pixels, rows = augment(x, index, targets, generator)
        target_logits, target_feats = targets.lookup(rows, device, clean=x, pixels=pixels)
        train_step(student, objective, optimizer, normalize(pixels, CIFAR_MEAN, CIFAR_STD), y, index,
                   target_logits, target_feats, 0)

    return step


def measure(runners: dict[str, Callable[[], None]], rounds: int, steps: int, device) -> dict[str, list[float]]:
    for run in runners.values():  # warm-up: allocator, kernels, caches
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(max(1, steps // 5) if name == "online" else steps):
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
