"""Typed configuration filled once at the edge (the CLI or a recipe) and passed down read-only.

Below the pipelines, functions take plain arguments; only `run_build(cfg)` and `run_train(cfg)` see these.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from richkd_cache.distill import DEFAULTS, describe_params, get_logit_loss, method_params
from richkd_cache.distill.adaptive import ALPHA_RULES
from richkd_cache.errors import ConfigError
from richkd_cache.views import parse_policy


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what stage one computes (and so what a resumed build must match)."""

    dataset: str
    data_root: str | None
    split: str
    teacher: str | None
    teacher_checkpoint: str
    clip: str
    clip_pretrained: str | None
    clip_checkpoint: str | None
    prompts: tuple[str, ...]
    out: str
    clip_activation: str | None = None  # quickgelu | gelu; None: decided by the name or weights tag
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"
    overwrite: bool = False
    block_rows: int | None = None  # rows per write block (= chunk); None: a few MB per chunk
    teacher_views: str = "auto"  # clean | all | K random views | auto: all for 32 px images, else clean
    clip_views: str = "clean"  # clean | same (the teacher's views)
    topk: int | None = None  # store only the teacher's top-k log-probabilities (large class counts)
    view_seed: int = 0
    image_size: int | None = None  # imagefolder: the clean view's side; None: its default (224)
    resize: int | None = None  # imagefolder: the shorter side before the centre crop; None: its default (256)
    strong_views: int = 0  # K strong (RandAugment) views per sample with the teacher's logits, for MLKD; 0: none
    # store the pooled features only feature losses read (eq. 7-8); None: as the cache at `out` does
    # (a build adding a CLIP model or resuming keeps its choice), else stored
    features: bool | None = None

    def __post_init__(self) -> None:
        """Flags and scripts are checked alike, before anything is loaded or written."""
        check_settings(self)
        check_device_name("--device", self.device)
        if self.teacher_views != "auto":
            parse_policy(self.teacher_views)
        # every target but kd needs CLIP's logits (eq. 2-3), hence a prompt set; one costs a single
        # text-tower pass, and the manifest's zero-shot accuracy is measured with it
        if not self.prompts:
            raise ConfigError("--prompts names no prompt set: a cache needs at least one (e.g. --prompts single)")
        repeated = sorted({p for p in self.prompts if self.prompts.count(p) > 1})
        if repeated:
            raise ConfigError(f"--prompts names {', '.join(repeated)} more than once")


@dataclass(frozen=True)
class TrainConfig:
    """One stage-two run. `cache=None` means plain cross-entropy (how a teacher is made)."""

    student: str
    out: str
    cache: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    target: str | None = None  # ce | kd | clip | richkd; None: richkd with a cache, ce without
    method: str | None = "kd"  # the logit loss applied to the target logits; None: no logit loss
    feature_loss: str | None = "cosine"
    alpha: float | str = 0.7  # eq. 4: a weight in [0, 1], or an adaptive rule (auto, per-class, confidence)
    temperature: float | None = None  # the method's temperature (eq. 5 for KD); None: its reference value
    lam: float = 0.7  # eq. 7
    beta: float | None = None  # the method's loss weight (eq. 9; 3 for KD); None: its reference value
    gamma: float = 0.8  # eq. 9
    method_params: dict[str, float] = field(default_factory=dict)  # the method's other parameters, by name
    prompts: str | None = None  # None: multi where the cache stores it, else its first (prompts.default_prompt_set)
    clip_renormalize: bool = False
    clip_tau: float | None = None
    image_size: int | None = None  # imagefolder: None takes the cache's (or the dataset's default)
    resize: int | None = None
    # the cache's CLIP model(s): NAME, A+B or ensemble; None: its only one (refused, listing them, if several)
    clip_model: str | None = None
    fraction: float = 1.0  # train on this share of every class (few-shot study)
    imbalance: float = 1.0  # long-tailed: rarest / most common class size (supplement's protocol)
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None  # None: 0.05, or 0.01 for MobileNet/ShuffleNet students
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    optimizer: str = "sgd"  # sgd (mdistiller) | adamw (LG's ViT students); see pipelines/optim.py
    schedule: str = "step"  # step: x lr_decay at the milestones | cosine: from lr to min_lr over the epochs
    warmup_epochs: int = 0  # cosine only: linear warm-up from lr x 0.001 (LG's WARMUP_FACTOR)
    min_lr: float = 0.0  # cosine only: the floor the cosine ends at
    seed: int = 0
    device: str = "auto"
    cache_device: str | None = None  # where cached targets live; None: the training device
    stream_window: int | None = None  # stream the cache, this many write blocks at a time; None: read it whole
    workers: int = 4
    online: bool = False  # run the teacher and CLIP on every batch instead of reading their cached outputs
    # torch.compile the step (CUDA graphs on a GPU). Off by default until measured on a GPU; on a CPU the
    # first steps pay minutes of compilation that a short run never wins back
    compile: bool = False
    # the student's forward on CUDA: fp32, as mdistiller and the RichKD code train (no autocast), so a
    # recipe's numbers are the reference's; bf16 autocast on request. A CPU trains in fp32 either way.
    precision: str = "fp32"
    teacher_checkpoint: str | None = None  # --online: the teacher's file on this machine (default: the recorded path)
    clip_checkpoint: str | None = None  # --online: CLIP's weights file on this machine, when it was built from one
    resume: bool = False
    overwrite: bool = False  # replace an existing run folder's own files
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Flags and recipes are checked alike, before the run folder is touched."""
        check_settings(self)
        check_device_name("--device", self.device)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision takes {' or '.join(PRECISIONS)}, not {self.precision!r}")
        if self.cache_device is not None:
            check_device_name("--cache-device", self.cache_device)

    @property
    def resolved_target(self) -> str:
        if self.target is not None:
            return self.target
        return "richkd" if self.cache else "ce"


PRECISIONS = ("fp32", "bf16")  # TrainConfig.precision: the student's forward, autocast to bf16 or not

# Settings of the logit method: a recipe's belong to its method and are dropped when --method changes it.
METHOD_SETTINGS = ("temperature", "beta", "method_params")
# TrainConfig fields that are shorthands for a method parameter (its name in logit_losses.DEFAULTS)
_SHORTHANDS = {"temperature": ("temperature", "the distillation temperature"),
               "beta": ("weight", "the weight of the logit loss, eq. 9")}


def logit_params(cfg: TrainConfig) -> dict[str, float] | None:
    """The logit method's parameters as trained: its reference values, replaced by the recipe's and the
    flags'. None when no logit loss is trained. A setting the method does not use is an error, never ignored."""
    method = cfg.method if cfg.resolved_target != "ce" else None
    if not isinstance(cfg.method_params, dict):
        raise ConfigError("method_params must be a table of NAME = VALUE")
    given = dict(cfg.method_params)
    shorthands = {key: getattr(cfg, key) for key in _SHORTHANDS if getattr(cfg, key) is not None}
    if method is None:
        if given or shorthands:
            names = [f"--{k}" for k in shorthands] + [f"method parameter {k}" for k in given]
            raise ConfigError(f"{', '.join(names)} set, but no logit loss is trained "
                              f"(target {cfg.resolved_target}, method {cfg.method})")
        return None
    get_logit_loss(method)
    for key, value in shorthands.items():
        name, meaning = _SHORTHANDS[key]
        if name not in DEFAULTS[method]:
            raise ConfigError(f"--{key} ({meaning}; recipe key {key}) is not used by {method}; its parameters: "
                              f"{describe_params(method)} (set with --method-param NAME=VALUE)")
        if name in given:
            raise ConfigError(f"{method}'s {name} is set twice: by --{key} and by method parameter {name}")
        given[name] = value
    return method_params(method, given)


def recorded_method(cfg: TrainConfig, params: dict[str, float] | None) -> dict[str, Any]:
    """What config.json says about the logit method: the values trained with, not the flags' defaults."""
    params = params or {}
    return {"method": cfg.method if params else None, "temperature": params.get("temperature"),
            "beta": params.get("weight"), "method_params": params}


def parse_method_params(values: list[str]) -> dict[str, float]:
    """`--method-param beta=6 --method-param alpha=1,warmup=20` -> {"beta": 6.0, "alpha": 1.0, "warmup": 20.0}."""
    parsed: dict[str, float] = {}
    for item in (p.strip() for v in values for p in v.split(",") if p.strip()):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise ConfigError(f"--method-param wants NAME=VALUE with a number (e.g. beta=6), got {item!r}")
        parsed[name.strip()] = number
    return parsed


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take; `meaning` says why, in the refusal."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False
    meaning: str = ""

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.open_low or self.low is None else "["
        right = ")" if self.open_high or self.high is None else "]"
        return f"{left}{low}, {high}{right}"

    def holds(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below


# Every numeric setting a flag, a recipe or another command can give, with its interval.
RANGES: dict[str, Range] = {
    "alpha": Range(0, 1, meaning="the teacher's weight in the fused logits, eq. 4"),
    "lam": Range(0, 1, meaning="the teacher's weight in the fused features, eq. 7"),
    "temperature": Range(0, None, open_low=True, meaning="eq. 5 divides the logits by it"),
    "beta": Range(0, None, meaning="a loss weight, eq. 9"),
    "gamma": Range(0, None, meaning="a loss weight, eq. 9"),
    "clip_tau": Range(0, None, open_low=True, meaning="CLIP's logit scale, eq. 2"),
    "fraction": Range(0, 1, open_low=True, meaning="the share of every class trained on"),
    "imbalance": Range(0, 1, open_low=True, meaning="the rarest class's size over the most common's"),
    "epochs": Range(1, None, integer=True),
    "batch_size": Range(1, None, integer=True),
    "lr": Range(0, None, open_low=True),
    "momentum": Range(0, 1, open_high=True),
    "weight_decay": Range(0, None),
    "lr_decay": Range(0, 1, open_low=True, meaning="the factor the learning rate is multiplied by at each milestone"),
    "milestones": Range(1, None, integer=True, meaning="epochs"),
    "warmup_epochs": Range(0, None, integer=True),
    "min_lr": Range(0, None),
    "seed": Range(0, None, integer=True),
    "view_seed": Range(0, None, integer=True),
    "workers": Range(0, None, integer=True),
    "jobs": Range(1, None, integer=True),  # sweep's runs at once
    "stream_window": Range(1, None, integer=True),
    "block_rows": Range(1, None, integer=True),
    "topk": Range(1, None, integer=True),
    "image_size": Range(1, None, integer=True, meaning="pixels"),
    "resize": Range(1, None, integer=True, meaning="pixels"),
    "strong_views": Range(0, None, integer=True, meaning="strong views per sample; 0 stores none"),
}


def check_range(name: str, value: object) -> None:
    """Refuse a setting outside its interval, or of the wrong type (a string in a recipe), in one line."""
    allowed = RANGES[name]
    if not allowed.holds(value):
        kind = "an integer" if allowed.integer else "a number"
        why = f" ({allowed.meaning})" if allowed.meaning else ""
        raise ConfigError(f"--{name.replace('_', '-')}{why} must be {kind} in {allowed}, got {value!r}")


def check_settings(config: object) -> None:
    """Range-check every field of a config that has a range (None means "the default" and passes)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "alpha" and value in ALPHA_RULES:  # an adaptive rule instead of a fixed weight
            continue
        if f.name in RANGES and value is not None:
            for item in value if isinstance(value, (tuple, list)) else (value,):
                check_range(f.name, item)


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe is a TOML table of TrainConfig fields shipped in pipelines/recipes/NAME.toml."""
    available = list_recipes()
    if name not in available:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available) or 'none'}")
    text = resources.files("pipelines.recipes").joinpath(f"{name}.toml").read_text()
    table = tomllib.loads(text)
    check_fields(TrainConfig, table, f"recipe {name}")
    return table


def list_recipes() -> list[str]:
    folder = resources.files("pipelines.recipes")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def check_fields(cls: type, table: dict[str, Any], where: str) -> None:
    """Reject unknown keys: a typo in a recipe must not silently fall back to a default."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")


DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(flag: str, name: str) -> None:
    """The device kinds this tool runs on; anything else (tpu, a typo) is refused in one line."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"{flag} takes auto, cpu, cuda, cuda:N or mps, not {name!r}")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """`auto` picks the GPU when there is one; asking for a device that is not there is an error, not a fallback."""
    check_device_name(flag, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{flag} {name} was asked for but no CUDA device is available; use {flag} cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"{flag} {name} was asked for but this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} mps was asked for but no MPS device is available; use {flag} cpu")
    return torch.device(name)
