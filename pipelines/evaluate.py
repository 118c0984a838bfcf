"""`richkd-cache evaluate`: a student checkpoint's top-1/top-5 on clean images and under the FGSM
and PGD attacks of the paper's Table 6; with --gradcam, Fig. 7's Grad-CAM maps of several students.

Attacks work in [0, 1] pixel space: the image x / 255 is perturbed within an L_inf ball of radius
epsilon, clamped to [0, 1], and only then normalised for the model. The perturbed images stay float
(no rounding back to uint8: the paper's epsilon 0.001 is below one grey level, 1/255).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from cache_store import CacheError, open_cache
from pipelines import studies
from pipelines.config import resolve_device
from pipelines.train import batches, setup_images
from richkd_cache.data import ImageDataset, create_dataset, normalize
from richkd_cache.errors import ConfigError, DataError, RichKDError
from richkd_cache.files import atomic_path
from richkd_cache.gradcam import grad_cam, render_grid
from richkd_cache.metrics import topk_hits
from richkd_cache.models import load_checkpoint

PGD_STEPS = 10  # Table 6's PGD: 10 steps of epsilon / 4

Forward = Callable[[torch.Tensor], torch.Tensor]  # pixels in [0, 1] (B, 3, H, W) -> logits (B, C)


def run_evaluate(
    checkpoint: str,
    dataset: str | None,
    data_root: str | None,
    split: str = "val",
    attacks: bool = True,
    batch_size: int = 256,
    device: str = "cpu",
    epsilons: tuple[float, ...] = (0.001, 0.005, 0.01),
    corruptions: str | None = None,
    teacher: str | None = None,
    plots: str | None = None,
    gradcam: int = 0,
    beside: tuple[str, ...] = (),
    workers: int = 0,
) -> dict:
    """A JSON-ready report: clean top-1/top-5 (%) and, with attacks, FGSM and PGD at each epsilon;
    optionally CIFAR-C corruptions, accuracy by the teacher's category, the Fig. 4/5 plots, and the
    Fig. 7 Grad-CAM grid of `gradcam` images for this checkpoint and those `beside` it."""
    if attacks and not all(0.0 < eps <= 1.0 for eps in epsilons):
        raise ConfigError(f"attack epsilons are L_inf radii in [0, 1] pixel space, in (0, 1]; got {list(epsilons)}")
    if beside and not gradcam:
        raise ConfigError("several checkpoints are compared only by --gradcam N; evaluate them one at a time")
    if gradcam and not plots:
        raise ConfigError("--gradcam N writes gradcam.png into the --plots DIR folder: pass --plots DIR")
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, map_location=str(dev))
    name, root, options = resolve_dataset(checkpoint, meta, dataset, data_root)
    data = create_dataset(name, root, split, **options)
    if data.num_classes != meta["num_classes"]:
        raise DataError(f"{checkpoint} predicts {meta['num_classes']} classes but {name} has {data.num_classes}")
    check_classes(checkpoint, meta, data, name, root)
    if gradcam > len(data):
        raise ConfigError(f"--gradcam takes 1 to {len(data)} images (the {data.split} split's size), got {gradcam}")
    others = [load_checkpoint(p, num_classes=data.num_classes, map_location=str(dev))[0] for p in beside]
    settings = [(attack, eps) for attack in ATTACKS for eps in epsilons] if attacks else []
    hits = count_hits(model_forward(model, data), data, batch_size, dev, settings, workers)
    n = max(len(data), 1)
    rows = [{"attack": attack, "epsilon": eps, "top1": 100.0 * hits[(attack, eps)][0] / n,
             "top5": 100.0 * hits[(attack, eps)][1] / n} for attack, eps in [("clean", 0.0), *settings]]
    result = {
        "checkpoint": checkpoint,
        "arch": meta["arch"],
        "dataset": name,
        "split": data.split,
        "num_samples": len(data),
        "clean": {"top1": rows[0]["top1"], "top5": rows[0]["top5"]},
        "attacks": rows[1:],
        "pgd_steps": PGD_STEPS,
    }
    if corruptions:
        result["corruptions"] = studies.corruption_accuracy(model, corruptions, data, dev)
    if teacher or plots:
        logits, feats = studies.outputs(model, None, data, dev, workers=workers)
        labels = torch.from_numpy(data.labels)
        if teacher:
            teacher_model, _ = load_checkpoint(teacher, num_classes=data.num_classes, map_location=str(dev))
            teacher_logits, _ = studies.outputs(teacher_model, None, data, dev, workers=workers)
            result["by_teacher_category"] = studies.accuracy_by_teacher_category(logits, teacher_logits, labels)
        if plots:
            result["plots"] = studies.write_plots(logits, feats, labels, Path(plots))
    if gradcam:
        students = dict(zip(column_titles([checkpoint, *beside]), [model, *others]))
        result["gradcam"] = draw_gradcam(students, data, gradcam, dev, Path(plots) / "gradcam.png")
    return result


def draw_gradcam(students: dict[str, torch.nn.Module], data: ImageDataset, count: int, device: torch.device,
                 out: Path) -> dict:
    """Fig. 7: Grad-CAM maps of `count` images drawn at random (seed 0; the paper picks them at random) for
    each student (title -> model) side by side, each map for the image's true class; written atomically."""
    picks = np.random.default_rng(0).choice(len(data), size=count, replace=False)
    _, x, y = next(batches(setup_images(data, device), data, count, torch.from_numpy(picks)))
    x, y = x.to(device), y.to(device)
    maps = [grad_cam(model, normalize(x, data.mean, data.std), y).numpy() for model in students.values()]  # (N, H, W)
    picture = render_grid(x.permute(0, 2, 3, 1).cpu().numpy(), maps, list(students))
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG")
    return {"path": str(out), "images": picks.tolist(), "columns": list(students)}


def column_titles(checkpoints: list[str]) -> list[str]:
    """The run folder of each checkpoint (runs/kd/best.pth -> "kd"); folder/file where folders repeat."""
    titles = [Path(p).parent.name or Path(p).stem for p in checkpoints]
    if len(set(titles)) < len(titles):
        titles = [f"{Path(p).parent.name}/{Path(p).stem}".lstrip("/") for p in checkpoints]
    if len(set(titles)) < len(titles):
        titles = [f"{i + 1}: {t}" for i, t in enumerate(titles)]  # the same file twice
    return titles


def check_classes(checkpoint: str, meta: dict, data: ImageDataset, name: str, root: str | None) -> None:
    """Refuse data whose classes are not the ones the student learnt (as train refuses a cache built from
    other data): the same count of other classes would give a meaningless accuracy. The classes are those
    of the cache it was trained from, else of the dataset its config.json records."""
    trained = trained_classes(checkpoint, meta, name, root)
    if trained is None or list(trained[1]) == list(data.classes):
        return
    where, classes = trained
    first = next(i for i, (a, b) in enumerate(zip(classes, data.classes)) if a != b)
    raise DataError(f"{checkpoint} was trained on the classes of {where}, not those of {name} at {data.root}: "
                    f"class {first} is {classes[first]!r} there, {data.classes[first]!r} here")


def trained_classes(checkpoint: str, meta: dict, name: str, root: str | None) -> tuple[str, list[str]] | None:
    """(where from, class names) the student was trained on; None when nothing on this machine says, or
    when it was trained on the very dataset (`name` at `root`) being evaluated."""
    config_path = Path(checkpoint).with_name("config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    cache = meta.get("cache") or config.get("cache")
    if cache:
        try:
            return f"its cache {cache}", open_cache(cache, require_complete=False).manifest["dataset"]["classes"]
        except (CacheError, KeyError):
            pass
    if config.get("dataset") and (config["dataset"], config.get("data_root")) != (name, root):
        options = {k: config[k] for k in ("image_size", "resize") if config.get(k) is not None}
        try:
            recorded = create_dataset(config["dataset"], config.get("data_root"), "val", **options)
        except (RichKDError, OSError):
            return None  # the recorded data is not on this machine: only the class count can be checked
        return f"{config['dataset']} at {recorded.root}", recorded.classes
    return None


def resolve_dataset(checkpoint: str, meta: dict, dataset: str | None,
                    data_root: str | None) -> tuple[str, str | None, dict]:
    """The dataset named by the user, else the one the run recorded: the config.json beside the
    checkpoint, or the manifest of the cache it was trained from (whose root is then a default). The
    run's dataset opens with the run's options (imagefolder's image size): a student is evaluated on
    images of the size it was trained on."""
    config_path = Path(checkpoint).with_name("config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    given = {k: config[k] for k in ("image_size", "resize") if config.get(k) is not None}
    recorded = {"name": config["dataset"], "root": config.get("data_root")} if config.get("dataset") else None
    cache = meta.get("cache") or config.get("cache")
    if recorded is None and cache:
        try:
            recorded = open_cache(cache, require_complete=False).manifest["dataset"]
        except CacheError as e:
            if not dataset:
                raise ConfigError(f"{checkpoint} was trained from cache {cache}, which cannot be read ({e}); "
                                  "pass --dataset NAME (and --data-root DIR)") from None
    if dataset and (recorded is None or dataset != recorded["name"]):
        return dataset, data_root, {}
    if recorded is None:
        raise ConfigError(f"{checkpoint} does not record its dataset: pass --dataset NAME (and --data-root DIR)")
    return recorded["name"], data_root or recorded.get("root"), {**(recorded.get("options") or {}), **given}


def model_forward(model: torch.nn.Module, data: ImageDataset) -> Forward:
    """The model as a function of [0, 1] pixels: normalisation is part of what the attack differentiates."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        logits, _ = model((pixels - mean.to(pixels.device)) / std.to(pixels.device))
        return logits

    return forward


def count_hits(forward: Forward, data: ImageDataset, batch_size: int, device: torch.device,
               settings: list[tuple[str, float]], workers: int = 0) -> dict[tuple[str, float], tuple[int, int]]:
    """(attack, epsilon) -> (top-1 hits, top-5 hits) over the split; ("clean", 0.0) is always there.
    Every batch is attacked in every setting before the next is read: one pass over the data, image files
    decoded by `workers` DataLoader workers."""
    hits = {setting: (0, 0) for setting in [("clean", 0.0), *settings]}
    order = torch.arange(len(data))
    for _, x, y in batches(setup_images(data, device), data, batch_size, order, workers):
        pixels, y = x.to(device).float() / 255.0, y.to(device)  # (B, 3, H, W) in [0, 1]
        for attack, eps in hits:
            adversarial = pixels if attack == "clean" else ATTACKS[attack](forward, pixels, y, eps)
            with torch.no_grad():
                logits = forward(adversarial)
            top1, top5 = hits[(attack, eps)]
            hits[(attack, eps)] = (top1 + int(topk_hits(logits, y, 1).sum()), top5 + int(topk_hits(logits, y, 5).sum()))
    return hits


# ---------------------------------------------------------------- attacks


def input_gradient(forward: Forward, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE / d pixels (B, 3, H, W); the model's weights get no gradient."""
    pixels = pixels.detach().requires_grad_(True)
    loss = F.cross_entropy(forward(pixels), labels, reduction="sum")  # sum: one sample's step ignores the batch size
    return torch.autograd.grad(loss, pixels)[0]


def fgsm(forward: Forward, pixels: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM (Goodfellow et al., 2015; Table 6): one step of eps along the gradient's sign, in [0, 1]."""
    step = eps * input_gradient(forward, pixels, labels).sign()
    return (pixels + step).clamp(0.0, 1.0).detach()


def pgd(forward: Forward, pixels: torch.Tensor, labels: torch.Tensor, eps: float,
        steps: int = PGD_STEPS, step_size: float | None = None) -> torch.Tensor:
    """PGD (Madry et al., 2018; Table 6): `steps` sign-gradient steps of eps / 4, each projected back
    into the L_inf ball of radius eps around the clean image and into [0, 1]. It starts at the clean
    image (no random start), so an evaluation is reproducible."""
    step_size = eps / 4 if step_size is None else step_size
    low, high = (pixels - eps).clamp(0.0, 1.0), (pixels + eps).clamp(0.0, 1.0)
    adversarial = pixels.detach()
    for _ in range(steps):
        adversarial = adversarial + step_size * input_gradient(forward, adversarial, labels).sign()
        adversarial = torch.max(torch.min(adversarial, high), low).detach()
    return adversarial


ATTACKS: dict[str, Callable[[Forward, torch.Tensor, torch.Tensor, float], torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd}


# ---------------------------------------------------------------- console


def render_evaluation(result: dict, console: Console) -> None:
    console.print(f"[bold]{result['checkpoint']}[/bold]  {result['arch']} on {result['dataset']} / {result['split']} "
                  f"({result['num_samples']} images)")
    attacked = bool(result["attacks"])  # --no-attacks: clean images only, and the title says nothing of attacks
    title = "top-1 / top-5 (%)"
    if attacked:
        title += f"; attacks in [0, 1] pixel space, PGD {result['pgd_steps']} steps of eps/4"
    table = Table(title=title)
    for col in ("images", "epsilon", "top-1", "top-5") if attacked else ("images", "top-1", "top-5"):
        table.add_column(col, justify="right")
    clean = [f"{result['clean']['top1']:.2f}", f"{result['clean']['top5']:.2f}"]
    table.add_row("clean", "-", *clean) if attacked else table.add_row("clean", *clean)
    for row in result["attacks"]:
        table.add_row(row["attack"].upper(), f"{row['epsilon']:g}", f"{row['top1']:.2f}", f"{row['top5']:.2f}")
    console.print(table)
    if result.get("corruptions"):
        corr = Table(title="top-1 (%) under common corruptions, by severity")
        corr.add_column("corruption")
        for s in range(1, studies.SEVERITIES + 1):
            corr.add_column(str(s), justify="right")
        names = sorted({r["corruption"] for r in result["corruptions"]})
        for name in names:
            cells = [f"{r['top1']:.2f}" for r in result["corruptions"] if r["corruption"] == name]
            corr.add_row(name, *cells)
        console.print(corr)
    if result.get("by_teacher_category"):
        cat = Table(title="student top-1 (%) by the teacher's category (Table 9)")
        for col in ("teacher", "images", "student top-1"):
            cat.add_column(col, justify="right")
        for r in result["by_teacher_category"]:
            cat.add_row(r["teacher"], str(r["images"]), "-" if r["student_top1"] is None else f"{r['student_top1']:.2f}")
        console.print(cat)
    for path in result.get("plots", []):
        console.print(f"plot: {path}")
    if result.get("gradcam"):
        cam = result["gradcam"]
        console.print(f"Grad-CAM (Fig. 7) of {len(cam['images'])} images, columns {', '.join(cam['columns'])}: {cam['path']}")
