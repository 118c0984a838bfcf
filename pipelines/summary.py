"""`richkd-cache info`: what a cache holds, what it cost, and how good its targets are."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cache_store import open_cache
from cache_store.schema import ArraySpec, CacheLayout, ClipLayout, is_strong, model_views
from cache_store.verify import checksum_summary
from pipelines.cached import clean_view, has_clean_views
from richkd_cache.clip_logits import clip_logits, ensemble_logits
from richkd_cache.distill import fuse_logits
from richkd_cache.errors import ConfigError
from richkd_cache.metrics import topk_accuracy
from richkd_cache.prompts import default_prompt_set

IMAGENET_1K_TRAIN = 1_281_167  # ImageNet-1k's training images (ILSVRC-2012)
IMAGENET_1K_CLASSES = 1000
# Datasets whose caches are priced at ImageNet-1k's size (image folders: ImageNet and its kind); a CIFAR
# or digits cache is priced at its own size, which is what its user stores
IMAGENET_SCALE = ("imagefolder",)
# Bytes per sample-view of other stores of teacher targets, as their authors report them:
REFERENCES = {
    "TinyViT (top-10 sparse logits + augmentation)": 44,  # Wu et al., ECCV 2022, Sec. 3.1
    "ml-dr (reinforced ImageNet)": 65,  # Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023
}


def cache_summary(url: str, alpha: float) -> dict:
    """A JSON-ready summary; accuracies are computed from the cached arrays, so they are exact."""
    reader = open_cache(url, require_complete=False)
    manifest = reader.manifest
    written = reader.written_mask()
    summary = {
        "url": url,
        "status": manifest.get("status"),
        "format_version": manifest.get("format_version"),
        "blocks_written": int(written.sum()),
        "blocks_total": int(written.size),
        "dataset": {k: manifest["dataset"].get(k) for k in ("name", "split", "num_samples", "num_classes", "fingerprint")},
        "views": {**teacher_views(manifest), **strong_views(manifest)},
        "teacher": {k: manifest["teacher"].get(k)
                    for k in ("arch", "checkpoint_sha256", "accuracy", "topk_kl_mean", "topk_kl_rows")},
        "teacher_topk": reader.layout.teacher_topk,
        "clip_models": {name: clip_model_summary(reader, name) for name in reader.clips},
        "arrays": reader.array_info(),
        "bytes_per_sample_view": reader.bytes_per_sample_view(),
        "storage": storage(reader.layout, reader.clips, manifest["dataset"].get("name")),
        "chunk_checksums": checksum_summary(reader),
        "alpha": alpha,
        "prompt_sets": [],
    }
    if manifest.get("status") == "complete" and has_clean_views(reader):
        complete = reader.complete_clip_models()
        summary["prompt_sets"] = [{"clip_model": m, **row} for m in complete for row in prompt_set_accuracy(reader, alpha, m)]
        if len(complete) > 1:
            summary["prompt_sets"] += [{"clip_model": "ensemble", **row}
                                       for row in prompt_set_accuracy(reader, alpha, *complete)]
    return summary


def teacher_views(manifest: dict) -> dict[str, dict]:
    """Each model's views (model_views), the teacher's with the view policy its records follow (`augment`)."""
    views = model_views(manifest)
    views["teacher"]["augment"] = (manifest.get("views") or {}).get("augment")
    return views


def strong_views(manifest: dict) -> dict[str, dict]:
    """{"strong": its policy, K and seed} for a cache storing strong views (the teacher's rows on them), else {}."""
    strong = (manifest.get("views") or {}).get("strong")
    return {"strong": {k: strong.get(k) for k in ("policy", "num_views", "seed")}} if strong else {}


def storage(layout: CacheLayout, clips: dict[str, ClipLayout], dataset: str | None = None) -> dict:
    """What one sample-view costs in this cache, the whole cache at its own size and, for an image-folder
    dataset (`IMAGENET_SCALE`), at ImageNet-1k's size beside other stores of ImageNet teacher targets.

    Bytes per sample-view, as written (uncompressed; fp16 rows barely compress, so an upper bound):
        B = sum over the sample-axis arrays of (bytes one sample takes in the array) / V
    with V the teacher's views per sample: the teacher's logits (C x 2 B, or top-k: k x (2 + 2) B) and
    features (Ft x 2 B) and the view's packed record (8 B for a random-resized crop) are per view; CLIP's
    rows (clean view: (D + Fc) x 2 B) and the label (4 B) are per sample, so spread over its V views.
    `view_arrays_bytes` counts the per-view arrays alone (what TinyViT's and ml-dr's figures count: a view's
    teacher outputs and augmentation). ImageNet-1k at this layout: 1,281,167 x V x B, full logits counted at
    its 1,000 classes (top-k rows do not depend on C).
    """
    views = layout.num_views
    specs = {**layout.sample_arrays(), **{n: s for c in clips.values() for n, s in c.sample_arrays(layout).items()}}
    parts = {name: per_sample_bytes(spec) / views for name, spec in specs.items()}  # every CLIP model's too
    per_view = sum(parts.values())
    result = {
        "views": views,
        "bytes_per_sample_view": per_view,
        "view_arrays_bytes": sum(per_sample_bytes(s) / views for n, s in specs.items()
                                 if len(s.shape) == 3 and s.shape[1] == views and not is_strong(n)),
        "parts": parts,
        "this_cache": {"samples": layout.num_samples, "views": views, "bytes": layout.num_samples * views * per_view},
    }
    if dataset not in IMAGENET_SCALE:
        return result
    at_imagenet = {**parts}
    if "teacher/logits" in parts:
        at_imagenet["teacher/logits"] = IMAGENET_1K_CLASSES * 2
    at_view = sum(at_imagenet.values())
    return {
        **result,
        "imagenet_1k": {"samples": IMAGENET_1K_TRAIN, "views": views, "bytes_per_sample_view": at_view,
                        "bytes": IMAGENET_1K_TRAIN * views * at_view},
        "references": [{"name": name, "bytes_per_sample_view": b, "imagenet_1k_bytes": IMAGENET_1K_TRAIN * views * b}
                       for name, b in REFERENCES.items()],
    }


def per_sample_bytes(spec: ArraySpec) -> int:
    """Bytes of one sample's row of a sample-axis array: (N, [V,] X) -> itemsize x V x X."""
    return np.dtype(spec.dtype).itemsize * math.prod(spec.shape[1:])


def clip_model_summary(reader, name: str) -> dict:
    """One CLIP model's weights, tau, input size and activation, its status and written blocks."""
    record = reader.clip_records[name]
    written = reader.written_mask(name) if f"{reader.clips[name].written}/zarr.json" in reader.keys else None
    return {**{k: record.get(k) for k in ("arch", "pretrained", "checkpoint_sha256", "tau", "image_size",
                                          "activation_source", "embed_dim", "feature_dim", "status")},
            "activation": "quickgelu" if record.get("quick_gelu") else "gelu",
            "blocks_written": None if written is None else int(written.sum())}


def default_prompts(reader, models: list[str]) -> str | None:
    """The prompt set used where `models` are asked about and none is named (`train`, `analyze`, `export`):
    `multi` by name when they all store it (`default_prompt_set`); None when they store none."""
    stored = reader.prompt_sets_of(models)
    return default_prompt_set(stored) if stored else None


def prompt_set_accuracy(reader, alpha: float, *models: str) -> list[dict]:
    """Per prompt set every one of `models` stores (none given: the cache's only CLIP model): CLIP
    zero-shot top-1 (several models: their ensemble), the teacher's top-1, the fused top-1 at alpha (eq. 4),
    and whether it is the set used when none is named."""
    models = list(models) or reader.select_clip(None)
    labels, z_t, embeds = clean_view(reader, models)
    teacher_top1 = topk_accuracy(z_t, labels)
    default = default_prompts(reader, models)
    rows = []
    for name in reader.prompt_sets_of(models):
        texts = {m: reader.text_embeddings(name, m) for m in models}
        z_c = ensemble_logits([clip_logits(embeds[m], torch.from_numpy(texts[m]), reader.clip_records[m]["tau"])
                               for m in models])
        rows.append({
            "prompt_set": name,
            "default": name == default,
            "num_templates": int(texts[models[0]].shape[0]),
            "clip_top1": topk_accuracy(z_c, labels),
            "teacher_top1": teacher_top1,
            "fused_top1": topk_accuracy(fuse_logits(z_t, z_c, alpha), labels),
        })
    return rows


def render_summary(summary: dict, console: Console) -> None:
    ds, teacher = summary["dataset"], summary["teacher"]
    console.print(f"[bold]{summary['url']}[/bold]  format {summary['format_version']}  status {summary['status']}  "
                  f"blocks {summary['blocks_written']}/{summary['blocks_total']}")
    console.print(f"dataset  {ds['name']} / {ds['split']}: {ds['num_samples']} samples, {ds['num_classes']} classes, "
                  f"fingerprint {str(ds['fingerprint'])[:16]}")
    console.print(f"teacher  {teacher['arch']}  sha256 {str(teacher['checkpoint_sha256'])[:16]}")
    if summary["teacher_topk"]:
        kl = teacher["topk_kl_mean"]
        cost = f"mean KL {kl:.4f} nats over {teacher['topk_kl_rows']} rows" if kl is not None else "KL not measured"
        console.print(f"         logits stored as top-k, k = {summary['teacher_topk']}: {cost}")
    for name, clip in summary["clip_models"].items():
        weights = clip["pretrained"] or f"checkpoint {str(clip['checkpoint_sha256'])[:16]}"
        state = "" if clip["status"] == "complete" else (
            f"  INCOMPLETE ({clip['blocks_written'] or 0}/{summary['blocks_total']} blocks: re-run the build that adds it)")
        console.print(f"clip     {name}: {clip['arch']} ({weights}), tau {clip['tau']:.2f}, input {clip['image_size']}px"
                      f"{state}", highlight=False)
        decided = f" (decided by {clip['activation_source']})" if clip["activation_source"] else ""
        console.print(f"         activation {clip['activation']}{decided}")
    arrays = Table(title="arrays")
    for col in ("array", "dtype", "shape", "chunks", "stored"):  # whole names (clip/<model>/...) on any width
        arrays.add_column(col, no_wrap=True)
    for a in summary["arrays"]:
        arrays.add_row(a["name"], str(a["dtype"]), "x".join(map(str, a["shape"])), "x".join(map(str, a["chunks"])),
                       human_bytes(a["stored_bytes"]))
    console.print(arrays)
    console.print(views_table(summary))
    console.print(storage_table(summary["storage"]))
    console.print(f"chunk checksums: {summary['chunk_checksums']}", highlight=False, soft_wrap=True)
    if summary["prompt_sets"]:
        acc = Table(title=f"top-1 (%) on the cached split, fused at alpha={summary['alpha']}")
        several = len(summary["clip_models"]) > 1
        for col in ("CLIP model",) * several + ("prompt set", "templates", "CLIP zero-shot", "teacher", "fused"):
            acc.add_column(col, justify="right")
        for r in summary["prompt_sets"]:
            name = f"{r['prompt_set']} (default)" if r["default"] else r["prompt_set"]
            acc.add_row(*(r["clip_model"],) * several, name, str(r["num_templates"]), f"{r['clip_top1']:.2f}",
                        f"{r['teacher_top1']:.2f}", f"{r['fused_top1']:.2f}")
        console.print(acc)


def views_table(summary: dict) -> Table:
    """Each model's view policy, its rows, and the bytes of one row (one sample-view)."""
    table = Table(title="views and bytes per sample-view")
    for col in ("model", "policy", "views", "rows", "bytes/row", "stored/row", "fp16 total"):
        table.add_column(col, justify="right", overflow="fold")
    several = len(summary["clip_models"]) > 1
    for model, size in summary["bytes_per_sample_view"].items():
        teacher_rows = model in ("teacher", "strong")  # the teacher on its views, and on the strong views
        v = summary["views"][model if teacher_rows else "clip"]
        label = model if teacher_rows else (f"clip {model}" if several else "clip")
        policy = str(v["policy"]) if v.get("augment") in (None, "clean", "crop-flip") else v["augment"]
        table.add_row(label, policy, str(v["num_views"]), str(size["rows"]), str(size["bytes_per_row"]),
                      f"{size['stored_bytes_per_row']:.0f}", human_bytes(size["rows"] * size["bytes_per_row"]))
    return table


def storage_table(storage: dict) -> Table:
    """Bytes per sample-view of this cache by array, and the whole cache: its own, or for an image-folder
    cache ImageNet-1k's at this layout beside the references (formula: `storage`)."""
    if "imagenet_1k" not in storage:
        own = storage["this_cache"]
        table = Table(title=f"bytes per sample-view, and this cache ({own['samples']:,} images x {own['views']} "
                            "view(s))")
        table.add_column("store", no_wrap=True)
        for col in ("B per sample-view", "this cache"):
            table.add_column(col, justify="right")
        for name, b in storage["parts"].items():
            table.add_row(f"  {name}", f"{b:.1f}", "")
        table.add_row("this cache", f"{storage['bytes_per_sample_view']:.1f}", human_bytes(own["bytes"]))
        table.add_row("  its per-view arrays (teacher, view record)", f"{storage['view_arrays_bytes']:.1f}", "")
        return table
    n, v = storage["imagenet_1k"]["samples"], storage["views"]
    table = Table(title=f"bytes per sample-view, and ImageNet-1k ({n:,} images x {v} view(s)) at that cost")
    table.add_column("store", no_wrap=True)
    for col in ("B per sample-view", "ImageNet-1k"):
        table.add_column(col, justify="right")
    for name, b in storage["parts"].items():
        table.add_row(f"  {name}", f"{b:.1f}", "")
    at = storage["imagenet_1k"]
    if at["bytes_per_sample_view"] == storage["bytes_per_sample_view"]:
        table.add_row("this cache", f"{storage['bytes_per_sample_view']:.1f}", human_bytes(at["bytes"]))
    else:  # full logits: at ImageNet a row holds 1,000 classes, not this cache's C
        table.add_row("this cache", f"{storage['bytes_per_sample_view']:.1f}", "")
        table.add_row("its layout with ImageNet's 1,000 classes", f"{at['bytes_per_sample_view']:.1f}",
                      human_bytes(at["bytes"]))
    table.add_row("  its per-view arrays (teacher, view record)", f"{storage['view_arrays_bytes']:.1f}", "")
    for ref in storage["references"]:
        table.add_row(ref["name"], f"{ref['bytes_per_sample_view']}", human_bytes(ref["imagenet_1k_bytes"]))
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def compare_runs(runs: list[str]) -> list[dict]:
    """One row per run folder: summary.json, or the seed*/summary.json under it as mean +- std, and under
    "settings" its config.json's settings (method parameters as method_params.NAME)."""
    rows = []
    for run in runs:
        folder = Path(run)
        files = [folder / "summary.json"] if (folder / "summary.json").exists() else sorted(folder.glob("seed*/summary.json"))
        if not files:
            raise ConfigError(f"{run} holds no summary.json (nor seed*/summary.json): not a finished run")
        summaries = [json.loads(f.read_text()) for f in files]
        rows.append({"run": run, "student": summaries[0]["student"], "target": summaries[0]["target"],
                     "seeds": len(summaries), "best": mean_std([s["best_top1"] for s in summaries]),
                     "last": mean_std([s["last_top1"] for s in summaries]),
                     "settings": run_settings(files[0].parent / "config.json")})
    return rows


# What config.json records that is not a setting of the run's training: where it ran, run control, its seed
# (a row's seeds are counted instead). Everything else that differs between two runs is shown by `compare`.
NOT_COMPARED = ("out", "seed", "resume", "overwrite", "quiet", "workers", "device", "cache_device", "data_root",
                "teacher_checkpoint", "clip_checkpoint", "extra", "log", "log_every", "stream_window")


def run_settings(path: Path) -> dict[str, str]:
    """A run's recorded settings as printable values; a run from before config.json records nothing."""
    if not path.exists():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as JSON ({e})") from None
    settings = {}
    for key, value in (recorded.items() if isinstance(recorded, dict) else ()):
        if key in NOT_COMPARED:
            continue
        if isinstance(value, dict):
            settings.update({f"{key}.{k}": show_value(v) for k, v in value.items()})
        else:
            settings[key] = show_value(value)
    return settings


def differing_settings(rows: list[dict]) -> list[str]:
    """The settings whose values are not the same in every row (a setting a run does not record counts as
    "-"), in the order config.json lists them."""
    names = list(dict.fromkeys(k for row in rows for k in row["settings"]))
    return [n for n in names if len({row["settings"].get(n, "-") for row in rows}) > 1]


def show_value(value: object) -> str:
    """A setting as one short cell: numbers as %g, lists joined by commas, null as none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(show_value(v) for v in value) or "-"
    return str(value)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"
