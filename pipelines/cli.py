"""The `richkd-cache` command line. Each command fills a config once and calls one pipeline function.

Anything a user can get wrong ends as one line on stderr and exit code 2, never a traceback.
Nothing imported at module level imports torch (seconds): each command imports its pipeline when it
runs, so `--help` and the settings' refusals answer at once (tests/test_cli_startup.py checks it).
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cache_store import CacheError

from pipelines.config import (
    METHOD_SETTINGS,
    BuildConfig,
    TrainConfig,
    check_fields,
    check_range,
    check_used,
    check_values,
    list_recipes,
    load_config_file,
    load_recipe,
    parse_method_params,
    unused_settings,
)
from pipelines.progress import Reporter
from richkd_cache.errors import ConfigError, RichKDError

app = typer.Typer(
    name="richkd-cache",
    help="Cache the teacher and CLIP once (build), then distill students at the cost of plain training (train).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
prompts_app = typer.Typer(help="Prompt sets stored in a cache.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")

out_console = Console()
err_console = Console(stderr=True)

EXIT_USER_ERROR = 2


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RichKDError, CacheError) as e:
            err_console.print(f"[red]error:[/red] {escape(one_line(e))}", highlight=False, soft_wrap=True)
        except ModuleNotFoundError as e:
            err_console.print(
                f"[red]error:[/red] missing package {e.name!r}; install it (for object stores: "
                "pip install 'richkd-cache[s3]' or 'richkd-cache[gcs]')",
                soft_wrap=True,
            )
        except OSError as e:  # a path that cannot be written or read, a full disk
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            err_console.print("interrupted: re-run the same command to resume", soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR)

    return wrapper


def one_line(error: Exception) -> str:
    """The message itself: a DataLoader worker re-raises it wrapped in the worker's traceback."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def show(result: dict, as_json: bool, render: Callable[[dict, Console], None]) -> None:
    """A report as JSON for scripts, or rendered as tables for people."""
    if as_json:
        out_console.print_json(json.dumps(result))
    else:
        render(result, out_console)


def split_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_numbers(flag: str, value: str, kind: type[int] | type[float]) -> tuple:
    """A comma-separated list of ints or floats; an item that is not one is refused in one line."""
    try:
        return tuple(kind(v) for v in split_list(value))
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ConfigError(f"{flag} takes comma-separated {what} (e.g. {'1,2,3' if kind is int else '0.1,0.5'}), "
                          f"got {value!r}") from None


def alpha_setting(text: str) -> float | str:
    """eq. 4's weight, or an adaptive rule's name: a number needs no torch (the rules' module imports it)."""
    try:
        return float(text)
    except ValueError:
        from richkd_cache.distill.adaptive import parse_alpha

        return parse_alpha(text)


def parse_seeds(value: str) -> tuple[int, ...]:
    seeds = parse_numbers("--seeds", value, int)
    if not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds takes one or more distinct seeds (e.g. 0,1,2), got {value!r}")
    for seed in seeds:  # every one before the first is trained
        check_range("seed", seed)
    return seeds


@app.command()
@user_errors
def build(
    out: Annotated[str, typer.Option(help="Cache location: a directory NAME.zarr or a URL (s3://bucket/NAME.zarr).")],
    teacher_checkpoint: Annotated[str, typer.Option(help="Teacher weights: a file (mdistiller's, ours, or a torchvision state_dict such as resnet34-b627a593.pth), or torchvision:TAG for a tv: teacher (e.g. torchvision:IMAGENET1K_V1: torch.hub's cache, downloaded when missing).")],
    dataset: Annotated[str, typer.Option(help="cifar10, cifar100, imagefolder or digits.")] = "cifar100",
    data_root: Annotated[Optional[str], typer.Option(help="Folder holding the dataset files.")] = None,
    split: Annotated[str, typer.Option(help="Split to cache (train for distillation).")] = "train",
    teacher: Annotated[Optional[str], typer.Option(help="Teacher architecture (read from our checkpoints if omitted).")] = None,
    clip: Annotated[str, typer.Option(help="CLIP model(s): OpenAI names (ViT-L/14) or open_clip names, comma-separated (ViT-L/14,RN50x64); a complete cache gains the models it lacks, running only them.")] = "ViT-L/14",
    clip_pretrained: Annotated[Optional[str], typer.Option(help="open_clip pretrained tag (openai for OpenAI names); one for all --clip models or one per model, comma-separated.")] = None,
    clip_checkpoint: Annotated[Optional[str], typer.Option(help="Local CLIP weights file instead of a download; one per --clip model, comma-separated.")] = None,
    clip_activation: Annotated[Optional[str], typer.Option(help="quickgelu (OpenAI's weights) or gelu: required for a --clip-checkpoint under an open_clip name; one for all or one per model.")] = None,
    prompts: Annotated[str, typer.Option(help="Prompt sets to store: names (single,multi,complex) or .toml/.json files.")] = "single,multi,complex",
    batch_size: int = 256,
    workers: int = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a cache built with other settings.")] = False,
    block_rows: Annotated[Optional[int], typer.Option(help="Rows per write block and chunk (default: ~4 MB chunks).")] = None,
    teacher_views: Annotated[str, typer.Option(help="Teacher views: all (CIFAR's 162 crop+flip views, what the student draws), clean, K random views (one per epoch trained: a fresh view every epoch), or auto (all for 32 px images, else 100 random views).")] = "auto",
    view_policy: Annotated[str, typer.Option(help="What the K random views are: random-resized-crop (torchvision's RandomResizedCrop of the whole image and a flip) or deit (that, RandAugment m9 and random erasing: the ViT students' augmentation).")] = "random-resized-crop",
    clip_views: Annotated[str, typer.Option(help="CLIP views: clean (the paper's setting) or same (the teacher's views).")] = "clean",
    view_seed: Annotated[int, typer.Option(help="Seed of the random views (with --teacher-views K) and of the strong views.")] = 0,
    topk: Annotated[Optional[int], typer.Option(help="Store only the teacher's top-k log-probabilities (large class counts).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="imagefolder: side of the centre crop every view is cut from (default 224).")] = None,
    resize: Annotated[Optional[int], typer.Option(help="imagefolder: shorter side before the centre crop (default 256).")] = None,
    strong_views: Annotated[int, typer.Option(help="K strong (RandAugment) views per sample with the teacher's logits on them, for --method mlkd; 0 stores none.")] = 0,
    features: Annotated[Optional[bool], typer.Option("--features/--no-features", help="Store the teacher's and CLIP's pooled features, which only feature losses (--feature-loss, export --features) read; --no-features keeps logits-only caches small (default: stored; a cache being resumed or gaining a CLIP model keeps its choice).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Stage one: run the teacher and CLIP once over a split and write the cache."""
    from pipelines.build import run_build

    cfg = BuildConfig(
        dataset=dataset, data_root=data_root, split=split, teacher=teacher,
        teacher_checkpoint=teacher_checkpoint, clip=clip, clip_pretrained=clip_pretrained,
        clip_checkpoint=clip_checkpoint, clip_activation=clip_activation, prompts=split_list(prompts), out=out,
        batch_size=batch_size, workers=workers, device=device, overwrite=overwrite, block_rows=block_rows,
        teacher_views=teacher_views, view_policy=view_policy, clip_views=clip_views, view_seed=view_seed, topk=topk, strong_views=strong_views,
        image_size=image_size, resize=resize, features=features,
    )
    url = run_build(cfg, Reporter(err_console, quiet=quiet))
    out_console.print(f"cache complete: {url}")


def train_settings(recipe: str | None, given: dict[str, Any], command: str, new_method: bool = False,
                   file: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recipe's settings, overridden by a --config file's, overridden by the flags given (None: not given);
    "none" switches a loss off. The recipe is --recipe, else the one the file names.

    A recipe's method settings (temperature, beta, method_params) belong to its method: they are dropped
    when the file or a flag changes the method (`new_method`: it is swept) or no logit loss is trained."""
    file = dict(file or {})
    recipe = recipe or file.pop("recipe", None)
    file.pop("recipe", None)
    settings: dict[str, Any] = load_recipe(recipe) if recipe else {}
    # what the user set, by a flag or in the file: a recipe's settings may be dropped, the user's never
    flags = {k for k, v in given.items() if v is not None} | set(file)
    if new_method:
        drop_method_settings(settings)
    for layer in (file, given):  # each overrides the settings before it
        overlay(settings, layer)
    for key in ("feature_loss", "method"):
        if settings.get(key) == "none":
            settings[key] = None
    # the cache is opened here, before torch loads: a wrong path or an unfinished build is refused at once
    if settings.get("cache") and not cache_stores_features(settings["cache"]) and "feature_loss" not in settings:
        settings["feature_loss"] = None  # the default, cosine, has nothing to distill on a logits-only cache
    for key in ("milestones", "log"):  # lists in a file
        if key in settings:
            settings[key] = tuple(settings[key])
    if flags & {"target", "method", "feature_loss"}:  # the recipe's settings for the losses the flags replaced
        for key, _ in unused_settings(settings):
            if key not in flags:
                settings.pop(key)
    check_values(settings)  # a value out of range is named first, whether or not the run reads it
    check_used(settings, flags)
    model_files = [f"--{k.replace('_', '-')}" for k in ("teacher_checkpoint", "clip_checkpoint") if settings.get(k)]
    if model_files and not settings.get("online"):
        raise ConfigError(f"{' and '.join(model_files)} set, but only --online runs the models: drop "
                          f"{'it' if len(model_files) == 1 else 'them'} or add --online")
    if "student" not in settings:
        raise ConfigError("--student is required (or a --recipe or --config file that names one)")
    if "out" not in settings:
        raise ConfigError("--out is required (or out = FOLDER in the --config file)")
    check_fields(TrainConfig, settings, command)
    return settings


def check_sweep_used(settings: dict[str, Any], axes: dict[str, tuple], user: set[str]) -> None:
    """A setting the user gave (fixed or swept) that no run of the sweep would read is refused, as `train`
    refuses it; one some runs read is kept (`--target ce,richkd --alpha 0.5`), and a recipe's setting a run
    does not read is dropped by that run."""
    deciding = {k: axes[k] for k in ("target", "method", "feature_loss") if k in axes}
    probe = {**settings, **{k: v[0] for k, v in axes.items()}}
    runs = [{**probe, **dict(zip(deciding, combo))} for combo in itertools.product(*deciding.values())]
    unused = [{key for key, _ in unused_settings(run)} for run in runs]
    refused = set.intersection(*unused) & user
    if refused:  # named as `train` names them, for the first run
        check_used({k: v for k, v in runs[0].items() if k not in unused[0] - refused}, user)


def refuse_missing_cache(url: str) -> None:
    """A wrong path (or something that is not a cache) is refused before the command imports torch."""
    from cache_store import open_cache

    open_cache(url, require_complete=False, check_chunks=False)


def overlay(settings: dict[str, Any], layer: dict[str, Any]) -> None:
    """Settings given by `layer` (None: not given) replace those in `settings`; its method_params add to theirs."""
    method = layer.get("method")
    if (method is not None and method != settings.get("method")) or layer.get("target") == "ce":
        drop_method_settings(settings)
    params = layer.get("method_params") or {}
    settings.update({k: v for k, v in layer.items() if v is not None and k != "method_params"})
    if params:
        settings["method_params"] = {**settings.get("method_params", {}), **params}


def drop_method_settings(settings: dict[str, Any]) -> None:
    for key in METHOD_SETTINGS:
        settings.pop(key, None)


def seeds_to_run(flag: str | None, file_seeds: Any, settings: dict[str, Any]) -> tuple[int, ...]:
    """--seeds, else the file's `seeds` (a list, or one), else the settings' `seed`, else 0."""
    seed = settings.pop("seed", None)
    if flag is not None:
        return parse_seeds(flag)
    if file_seeds is None:
        return (0 if seed is None else seed,)
    if seed is not None:
        raise ConfigError("the --config file sets both seed and seeds: keep one")
    seeds = tuple(file_seeds) if isinstance(file_seeds, list) else (file_seeds,)
    for s in seeds:
        check_range("seed", s)
    if not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError(f"seeds takes one or more distinct seeds (e.g. [0, 1, 2]), got {file_seeds!r}")
    return seeds


def cache_stores_features(url: str) -> bool:
    """Whether the cache holds the pooled features a feature loss reads (not one built with --no-features)."""
    from cache_store import open_cache

    return open_cache(url, check_chunks=False).layout.stores_features  # train checks the chunks when it opens it


@app.command()
@user_errors
def train(
    out: Annotated[Optional[str], typer.Option(help="Run folder: checkpoints, metrics.parquet and .csv, config.json, summary.json.")] = None,
    config: Annotated[Optional[str], typer.Option(help="Your own settings file (.toml, .yaml): the recipes' keys, recipe = NAME to start from one, seeds; flags override it.")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student architecture (see `richkd-cache models`).")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Cache from `build`; omit to train with cross-entropy only.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: the one the cache records).")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="Dataset folder on this machine.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="imagefolder: centre-crop side (default: the cache's, else 224).")] = None,
    student_image_size: Annotated[Optional[int], typer.Option(help="timm: students: the input side they are built for, inputs resized to it (default: the data's size; LG's ViT recipes: 224).")] = None,
    resize: Annotated[Optional[int], typer.Option(help="imagefolder: shorter side before the crop (default: the cache's, else 256).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="A shipped recipe; other flags override it.")] = None,
    target: Annotated[Optional[str], typer.Option(help="ce, kd (teacher), clip or richkd (fused).")] = None,
    method: Annotated[Optional[str], typer.Option(help="Logit loss: kd, dkd, lskd, normkd, rld, mlkd (needs a cache built with --strong-views K), each with its reference weights (a recipe's method settings are dropped when this changes its method).")] = None,
    method_param: Annotated[Optional[list[str]], typer.Option(help="A parameter of the logit method, NAME=VALUE, repeatable (e.g. DKD's beta=6); an unknown name lists the method's parameters.")] = None,
    feature_loss: Annotated[Optional[str], typer.Option(help="cosine (the default), mse, crd or none (the default on a --no-features cache).")] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Teacher weight in the fused logits (eq. 4), or an adaptive rule: auto, per-class, confidence.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="The method's temperature (eq. 5; default its own: kd 3, dkd 4, lskd 2, rld 4, mlkd 4 (with 3, 5, 2, 6); normkd uses t_norm).")] = None,
    lam: Annotated[Optional[float], typer.Option(help="Teacher weight in the fused features (eq. 7).")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Weight of the logit loss (eq. 9; default the method's own: kd 3, lskd 9, normkd 0.9, mlkd 0.9; dkd and rld weigh their terms with --method-param alpha=,beta=).")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Feature loss weight (eq. 9).")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Stored prompt set for CLIP's logits (default: multi where stored, else the first).")] = None,
    clip_tau: Annotated[Optional[float], typer.Option(help="Override CLIP's logit scale tau.")] = None,
    clip_renormalize: Annotated[Optional[bool], typer.Option(help="Re-normalise the mean text embedding (CLIP notebook).")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="The cache's CLIP model: NAME, several as A+B or ensemble (mean of their probabilities, docs/fusion.md); default: its only one.")] = None,
    fraction: Annotated[Optional[float], typer.Option(help="Train on this share of every class (no rebuild).")] = None,
    imbalance: Annotated[Optional[float], typer.Option(help="Long-tailed subset: rarest/most common class size.")] = None,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Annotated[Optional[float], typer.Option(help="Default 0.05 (0.01 for MobileNet/ShuffleNet).")] = None,
    milestones: Annotated[Optional[str], typer.Option(help="Epochs where lr x0.1, e.g. 150,180,210.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option()] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd (default) or adamw (the ViT recipes).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="step (lr x0.1 at the milestones) or cosine.")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(help="cosine: linear warm-up epochs.")] = None,
    min_lr: Annotated[Optional[float], typer.Option(help="cosine: the lr it ends at.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="One seed, or several (0,1,2): runs each, reports mean +- std (default 0).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (the default), cpu or cuda[:N].")] = None,
    cache_device: Annotated[Optional[str], typer.Option(help="Where the cache's compact rows live: cpu (default: the machine's shared, memory-mapped local copy, each batch gathered ahead of its step) or cuda (a copy on the GPU, when it fits).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers decoding image files (default 4).")] = None,
    online: Annotated[Optional[bool], typer.Option("--online/--no-online", help="Reference mode: run the cache's teacher and CLIP on every batch instead of reading the cache (slow).")] = None,
    teacher_checkpoint: Annotated[Optional[str], typer.Option(help="--online: the teacher's file here (default: the path the cache records).")] = None,
    clip_checkpoint: Annotated[Optional[str], typer.Option(help="--online: CLIP's weights file here, when the cache was built from one.")] = None,
    compile_step: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training step (CUDA graphs on a GPU).")] = None,
    log: Annotated[Optional[str], typer.Option(help="Experiment logs, any of tensorboard,wandb,csv: per-epoch metrics to each, per-step loss terms and lr to TensorBoard (OUT/tensorboard) and W&B (OUT/wandb, offline unless WANDB_MODE=online); metrics.csv is always written.")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="--log tensorboard/wandb: a point of the loss terms every N steps, their mean (default 10; 1: every step).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="The student's forward on CUDA: fp32 (the default, as mdistiller trains) or bf16 (autocast); a CPU trains in fp32.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/resume.pth.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run already in OUT (only its own files).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Stage two: train a student from a cache (or with cross-entropy alone, without one)."""
    if alpha is not None:
        alpha = alpha_setting(alpha)
    given = {
        "student": student, "cache": cache, "dataset": dataset, "data_root": data_root, "image_size": image_size,
        "student_image_size": student_image_size,
        "resize": resize, "target": target,
        "method": method, "alpha": alpha, "temperature": temperature, "lam": lam, "beta": beta,
        "gamma": gamma, "prompts": prompts, "clip_tau": clip_tau, "clip_renormalize": clip_renormalize,
        "clip_model": clip_model, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "fraction": fraction, "imbalance": imbalance, "optimizer": optimizer, "schedule": schedule,
        "warmup_epochs": warmup_epochs, "min_lr": min_lr, "compile": compile_step, "precision": precision,
        "milestones": parse_numbers("--milestones", milestones, int) if milestones else None,
        "out": out, "device": device, "cache_device": cache_device, "workers": workers, "online": online,
        "teacher_checkpoint": teacher_checkpoint, "clip_checkpoint": clip_checkpoint,
        "log": split_list(log) if log is not None else None, "log_every": log_every,
    }
    params = parse_method_params(method_param) if method_param else None
    file = load_config_file(config) if config else {}
    file_seeds = file.pop("seeds", None)
    settings = train_settings(recipe, {**given, "feature_loss": feature_loss, "method_params": params}, "train",
                              file=file)
    seed_list = seeds_to_run(seeds, file_seeds, settings)
    base = TrainConfig(resume=resume, overwrite=overwrite, quiet=quiet, **settings)
    out = base.out
    reporter = Reporter(err_console, quiet=quiet)
    from pipelines.train import run_train

    if len(seed_list) == 1:
        summary = run_train(replace(base, seed=seed_list[0]), reporter)
        out_console.print(f"best top-1 {summary['best_top1']:.2f}  last top-1 {summary['last_top1']:.2f}  -> {out}")
        return
    summaries = [run_train(replace(base, seed=s, out=f"{out}/seed{s}"), reporter) for s in seed_list]
    print_seed_table(summaries)


def print_seed_table(summaries: list[dict]) -> None:
    table = Table(title="runs over seeds")
    for col in ("seed", "best top-1", "last top-1"):
        table.add_column(col, justify="right")
    for s in summaries:
        table.add_row(str(s["seed"]), f"{s['best_top1']:.2f}", f"{s['last_top1']:.2f}")
    from pipelines.summary import mean_std

    for name, key in (("best top-1", "best_top1"), ("last top-1", "last_top1")):
        out_console.print(f"{name}: {mean_std([s[key] for s in summaries])}")
    out_console.print(table)


@app.command()
@user_errors
def info(
    cache: Annotated[str, typer.Argument(help="Cache location or .zip.")],
    alpha: Annotated[float, typer.Option(help="Teacher weight for the fused accuracy (eq. 4).")] = 0.7,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Manifest summary, arrays and sizes, completeness, and accuracy per prompt set."""
    check_range("alpha", alpha)
    refuse_missing_cache(cache)
    from pipelines.summary import cache_summary, render_summary

    show(cache_summary(cache, alpha), as_json, render_summary)


@app.command()
@user_errors
def verify(
    cache: Annotated[str, typer.Argument(help="Cache location or .zip.")],
    recompute: Annotated[int, typer.Option(min=0, help="Also rerun teacher and CLIP on this many random rows.")] = 0,
    data_root: Annotated[Optional[str], typer.Option(help="Dataset folder (default: the recorded one).")] = None,
    teacher_checkpoint: Annotated[Optional[str], typer.Option(help="Teacher file (default: the recorded path).")] = None,
    clip_checkpoint: Annotated[Optional[str], typer.Option(help="Local CLIP weights.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Check the manifest, every array's metadata, every chunk (checksums, missing chunks), NaN/Inf and the
    written mask (and recompute rows); exit 1 when wrong."""
    from cache_store import verify_cache

    report = verify_cache(cache)
    out_console.print(f"{cache}: status {report.status}, {report.blocks_written}/{report.blocks_total} blocks written, "
                      f"chunk checksums: {report.checksums}", highlight=False, soft_wrap=True)
    problems = list(report.problems)
    if recompute and report.ok:
        from pipelines.verify import recompute_rows

        problems += recompute_rows(cache, recompute, data_root, teacher_checkpoint, clip_checkpoint, device)
        out_console.print(f"recomputed {recompute} rows with the recorded teacher and CLIP")
    for problem in problems:
        out_console.print(f"  problem: {escape(problem)}", highlight=False, soft_wrap=True)
    out_console.print("NOT OK" if problems else "ok")
    if problems:
        raise typer.Exit(1)


@app.command()
@user_errors
def pack(
    cache: Annotated[str, typer.Argument(help="Complete cache to pack.")],
    out_zip: Annotated[str, typer.Argument(help="Output .zip; `train --cache FILE.zip` reads it directly.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT_ZIP.")] = False,
) -> None:
    """Pack a cache (its own files only: no links followed, no stray files) into one zip file to copy around."""
    from cache_store import pack_cache

    pack_cache(cache, out_zip, overwrite=overwrite)
    out_console.print(f"packed {cache} -> {out_zip}")


@prompts_app.command("add")
@user_errors
def prompts_add(
    cache: Annotated[str, typer.Argument(help="Cache to extend.")],
    file: Annotated[str, typer.Option(help="Prompt set file (.toml or .json), or a shipped set name.")],
    name: Annotated[Optional[str], typer.Option(help="Name to store it under (default: the file's).")] = None,
    clip_checkpoint: Annotated[Optional[str], typer.Option(help="Local CLIP weights if the recorded tag cannot be fetched.")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="The CLIP model to add it to: NAME, A+B or ensemble (every one); default: the cache's only one.")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Add a prompt set to an existing cache by running only CLIP's text tower (of each model named)."""
    from pipelines.prompts import add_prompt_set

    stored = add_prompt_set(cache, file, name, clip_checkpoint, device, clip_model)
    out_console.print(f"stored prompt set {stored!r} in {cache}")


@prompts_app.command("list")
@user_errors
def prompts_list(cache: Annotated[str, typer.Argument(help="Cache location.")]) -> None:
    """List the prompt sets stored in a cache (with several CLIP models: MODEL: SET per line)."""
    from cache_store import open_cache

    reader = open_cache(cache)
    for model in reader.clips:
        for name in reader.prompt_sets(model):
            out_console.print(f"{model}: {name}" if len(reader.clips) > 1 else name, highlight=False)


@app.command()
@user_errors
def analyze(
    cache: Annotated[str, typer.Argument(help="Cache location or .zip.")],
    prompts: Annotated[Optional[str], typer.Option(help="Stored prompt set (default: multi where stored, else the first; as train).")] = None,
    alpha: Annotated[float, typer.Option(help="Teacher weight of the fusion (eq. 4).")] = 0.7,
    out: Annotated[Optional[str], typer.Option(help="Folder for the PNG plots.")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="The cache's CLIP model: NAME, several as A+B, or ensemble (default: its only one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """From the cache alone: teacher vs CLIP vs fusion, alpha sweep and alpha*, confidence, calibration."""
    from cache_store import open_cache
    from pipelines.analyze import render_analysis, run_analyze
    from pipelines.summary import default_prompts

    check_range("alpha", alpha)  # before the cache is opened, as info checks it
    if prompts is None:  # the set train uses by default: multi by name
        reader = open_cache(cache)
        prompts = default_prompts(reader, reader.select_clip(clip_model))
    show(run_analyze(cache, prompts, alpha, out, clip_model), as_json, render_analysis)


@app.command()
@user_errors
def evaluate(
    checkpoints: Annotated[list[str], typer.Argument(help="Student checkpoint (last.pth / best.pth); with --gradcam, "
                                                          "more to draw beside it.")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: the run's).")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="Dataset folder.")] = None,
    split: Annotated[str, typer.Option()] = "val",
    attacks: Annotated[bool, typer.Option(help="FGSM and PGD at the paper's epsilons (Table 6).")] = True,
    epsilons: Annotated[str, typer.Option(help="Attack strengths in [0, 1] pixel units.")] = "0.001,0.005,0.01",
    corruptions: Annotated[Optional[str], typer.Option(help="A CIFAR-10-C / CIFAR-100-C folder: top-1 per corruption and severity.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher checkpoint: the student's accuracy by the teacher's category (Table 9).")] = None,
    plots: Annotated[Optional[str], typer.Option(help="Folder for the correlation matrix (Fig. 5) and t-SNE (Fig. 4) plots.")] = None,
    gradcam: Annotated[int, typer.Option(min=0, help="Grad-CAM maps of N random images, one column per checkpoint (Fig. 7), in --plots.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers decoding image files (imagefolder).")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Top-1/top-5 of a student, its accuracy under FGSM and PGD, corruptions, and the paper's plots."""
    from pipelines.config import resolve_device
    from pipelines.evaluate import render_evaluation, run_evaluate

    result = run_evaluate(checkpoints[0], dataset, data_root, split=split, attacks=attacks, batch_size=batch_size,
                          device=str(resolve_device(device)),
                          epsilons=parse_numbers("--epsilons", epsilons, float), corruptions=corruptions,
                          teacher=teacher, plots=plots, gradcam=gradcam, beside=tuple(checkpoints[1:]),
                          workers=workers)
    show(result, as_json, render_evaluation)


@app.command()
@user_errors
def compare(runs: Annotated[list[str], typer.Argument(help="Run folders (a folder of seed*/ runs counts as one).")]) -> None:
    """A table of runs: the settings that differ between them, best and last top-1, mean +- std over seeds."""
    from pipelines.summary import compare_runs, differing_settings

    rows = compare_runs(runs)
    table = Table(title="runs")
    for col in ("#", "run", "student", "target", "seeds", "best top-1", "last top-1"):
        table.add_column(col, justify="right", overflow="fold")
    for i, row in enumerate(rows, 1):
        table.add_row(str(i), row["run"], row["student"], row["target"], str(row["seeds"]), row["best"], row["last"])
    out_console.print(table)
    differ = differing_settings(rows)
    if differ:  # one row per setting, one column per run: readable however many settings differ
        settings = Table(title="settings that differ")
        settings.add_column("setting", overflow="fold")
        for i in range(1, len(rows) + 1):
            settings.add_column(f"#{i}", justify="right", overflow="fold")
        for name in differ:
            settings.add_row(name, *(row["settings"].get(name, "-") for row in rows))
        out_console.print(settings)


@app.command()
@user_errors
def sweep(
    out: Annotated[Optional[str], typer.Option(help="Sweep folder: one run per setting and seed, sweep.json, sweep.png.")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Cache from `build`.")] = None,
    config: Annotated[Optional[str], typer.Option(help="Your own settings file (.toml, .yaml): fixed settings as for train --config, seeds, jobs, and a \\[sweep] table of SETTING = \\[values] (any train setting); flags override it.")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student architecture(s).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="A shipped recipe for the fixed settings.")] = None,
    target: Annotated[Optional[str], typer.Option(help="Targets to sweep, e.g. kd,richkd.")] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Values to sweep, e.g. 0.5,0.6,0.7 (eq. 4).")] = None,
    lam: Annotated[Optional[str], typer.Option(help="Values to sweep (eq. 7).")] = None,
    temperature: Annotated[Optional[str], typer.Option(help="Values to sweep (eq. 5).")] = None,
    beta: Annotated[Optional[str], typer.Option(help="Values to sweep (eq. 9).")] = None,
    gamma: Annotated[Optional[str], typer.Option(help="Values to sweep (eq. 9).")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Stored prompt sets to sweep, e.g. single,multi.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Logit losses to sweep, e.g. kd,dkd.")] = None,
    feature_loss: Annotated[Optional[str], typer.Option(help="Feature losses to sweep, e.g. cosine,crd,none.")] = None,
    fraction: Annotated[Optional[str], typer.Option(help="Few-shot shares to sweep, e.g. 0.1,0.25,1.")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="CLIP models to sweep, e.g. ViT-L-14,RN50x64,ensemble.")] = None,
    epochs: Annotated[Optional[str], typer.Option(help="Epochs (several: swept).")] = None,
    batch_size: Annotated[Optional[str], typer.Option(help="Batch sizes.")] = None,
    lr: Annotated[Optional[str], typer.Option(help="Learning rates.")] = None,
    milestones: Annotated[Optional[str], typer.Option(help="Epochs where lr x0.1, e.g. 20,25; several sets separated by / are swept (150,180,210/20,25).")] = None,
    weight_decay: Annotated[Optional[str], typer.Option(help="Weight decays, e.g. 5e-4,1e-4.")] = None,
    vary: Annotated[Optional[list[str]], typer.Option(help="Any other train setting, NAME=V1,V2 (repeatable), e.g. lr_decay=0.1,0.2 or schedule=step,cosine.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Seeds of every setting, e.g. 0,1,2 (default 0).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: the one the cache records).")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="Dataset folder on this machine.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (the default), cpu or cuda[:N].")] = None,
    workers: Optional[int] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Runs trained at once, each in its own process (several fit on one GPU; default 1).")] = None,
    log: Annotated[Optional[str], typer.Option(help="Each run's experiment logs: tensorboard,wandb,csv (see train --log).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """A grid of training runs from one cache; re-running the same command resumes it run by run.

    A setting given several values is swept; given one value, it is fixed for every run."""
    from pipelines.sweep import Sweep, file_axes, parse_axis, run_sweep, show_value

    flags = {"student": student, "target": target, "alpha": alpha, "lam": lam, "temperature": temperature,
             "beta": beta, "gamma": gamma, "prompts": prompts, "method": method, "feature_loss": feature_loss,
             "fraction": fraction, "clip_model": clip_model, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "milestones": milestones, "weight_decay": weight_decay}
    for name, text in parse_vary(vary or []).items():
        if flags.get(name) is not None:
            raise ConfigError(f"--vary {name}= and --{name.replace('_', '-')} both give {name}: keep one")
        flags[name] = text
    file = load_config_file(config, ("jobs", "sweep")) if config else {}
    values = file_axes(file.pop("sweep", {}), f"--config {config}")
    values.update({name: parse_axis(name, text) for name, text in flags.items() if text is not None})
    axes = {name: v for name, v in values.items() if len(v) > 1}  # one value: a fixed setting
    for name in axes:  # a file's fixed value of a swept setting is replaced by each point's
        file.pop(name, None)
    file_seeds, file_jobs = file.pop("seeds", None), file.pop("jobs", None)
    # one value is a fixed setting; "none" (None here) switches a loss off, as train's flag does
    fixed = {"cache": cache, "dataset": dataset, "data_root": data_root, "out": out, "device": device,
             "workers": workers, "log": split_list(log) if log is not None else None,
             **{k: "none" if v[0] is None else v[0] for k, v in values.items() if len(v) == 1 or k == "student"}}
    settings = train_settings(recipe, fixed, "sweep", new_method="method" in axes, file=file)
    check_sweep_used(settings, axes, set(values) | set(file))
    if "cache" not in settings:
        raise ConfigError("--cache is required (or cache = CACHE in the --config file)")
    seed_list = seeds_to_run(seeds, file_seeds, settings)
    base = TrainConfig(quiet=True, **settings)
    result = run_sweep(Sweep(base, axes, seed_list), Reporter(err_console, quiet=quiet),
                       jobs if jobs is not None else 1 if file_jobs is None else file_jobs)
    table = Table(title=f"sweep over {', '.join(axes)} ({len(seed_list)} seed(s) each)")
    for col in (*axes, "best top-1", "last top-1"):
        table.add_column(col.replace("_", " "), justify="right")
    for row in result["results"]:
        table.add_row(*(show_value(row[a]) for a in axes), row["best"], row["last"])
    out_console.print(table)
    if result["plot"]:
        out_console.print(f"plot: {result['plot']}")


def parse_vary(items: list[str]) -> dict[str, str]:
    """`--vary lr_decay=0.1,0.2 --vary schedule=step,cosine` -> {"lr_decay": "0.1,0.2", "schedule": "step,cosine"}."""
    parsed = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--vary wants NAME=VALUES (e.g. lr_decay=0.1,0.2), got {item!r}")
        if name in parsed:
            raise ConfigError(f"--vary names {name} twice")
        parsed[name] = text
    return parsed


@app.command()
@user_errors
def export(
    cache: Annotated[str, typer.Argument(help="Cache location.")],
    out: Annotated[str, typer.Option(help="FILE.parquet (streamed block by block) or FILE.npz.")],
    target: Annotated[str, typer.Option(help="richkd (fused), kd (teacher) or clip.")] = "richkd",
    alpha: Annotated[float, typer.Option(help="Teacher weight in the fused logits (eq. 4).")] = 0.7,
    temperature: Annotated[float, typer.Option(help="Soft labels are softmax(z / T) (eq. 5).")] = 3.0,
    lam: Annotated[float, typer.Option(help="Teacher weight in the fused feature (eq. 7).")] = 0.7,
    prompts: Annotated[Optional[str], typer.Option(help="Stored prompt set (default: multi where stored, else the first; as train).")] = None,
    features: Annotated[bool, typer.Option(help="Also write the fused feature f_F of the fixed joint space.")] = False,
    clip_model: Annotated[Optional[str], typer.Option(help="The cache's CLIP model: NAME, several as A+B, or ensemble (default: its only one).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Fused soft labels (and features) per (sample, view) as a plain file, for other trainers."""
    from pipelines.export import run_export

    cfg = TrainConfig(student="-", out=out, cache=cache, target=target, alpha=alpha, temperature=temperature,
                      lam=lam, prompts=prompts, feature_loss="cosine" if features else None, clip_model=clip_model)
    result = run_export(cfg, out, features, overwrite)
    out_console.print(f"{result['rows']} rows (sample, view) of {result['target']} soft labels at T "
                      f"{result['temperature']} -> {result['out']}")


@app.command()
@user_errors
def models() -> None:
    """List the registered model names."""
    from richkd_cache.models import list_models

    out_console.print(", ".join(list_models()))


@app.command()
@user_errors
def recipes() -> None:
    """List the shipped training recipes."""
    out_console.print(", ".join(list_recipes()) or "none")


@app.command()
@user_errors
def quickstart(
    out: Annotated[str, typer.Option(help="Folder for the quickstart's checkpoints, cache and runs.")] = "runs/quickstart",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs for each student.")] = 8,
    teacher_epochs: Annotated[int, typer.Option(min=1)] = 12,
    clip_checkpoint: Annotated[Optional[str], typer.Option(help="Real CLIP weights for --clip.")] = None,
    clip: Annotated[str, typer.Option(help="CLIP model (a tiny random one unless weights are given).")] = "richkd-tiny",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The whole pipeline offline on the bundled digits dataset, in a few minutes on a laptop CPU."""
    from pipelines.quickstart import run_quickstart

    run_quickstart(out, epochs, teacher_epochs, clip, clip_checkpoint, Reporter(err_console, quiet=quiet), out_console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
