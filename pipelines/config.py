"""Typed configuration filled once at the edge (the CLI or a recipe) and passed down read-only.

Below the pipelines, functions take plain arguments; only `run_build(cfg)` and `run_train(cfg)` see these.
The CLI imports this module before any command runs, so it imports no torch: `--help` and a refused
setting answer in a fraction of a second; what needs torch imports it where it is used.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from richkd_cache.errors import ConfigError

if TYPE_CHECKING:
    import torch


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
    teacher_views: str = "auto"  # clean | all | K random views | auto: all for 32 px images, else 100 views
    view_policy: str = "random-resized-crop"  # what K random views are (richkd_cache/views.py); deit: ViT students'
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
        from richkd_cache.views import check_random_policy, parse_policy

        if self.teacher_views != "auto":
            parse_policy(self.teacher_views)
        check_random_policy(self.view_policy)
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
    # timm students: the input side they are built for (a ViT's patch grid); None: the data's own size
    student_image_size: int | None = None
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
    cache_device: str | None = None  # where the cache's compact rows live; None: the host's shared local copy
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
    log: tuple[str, ...] = ()  # experiment logs: tensorboard, wandb, csv (metrics.csv is always written)
    log_every: int = 10  # TensorBoard / W&B: a point of the loss terms every N steps (their mean)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Flags and recipes are checked alike, before the run folder is touched."""
        from pipelines.loggers import check_loggers  # imports torch: only once a run is configured

        check_settings(self)
        check_loggers(self.log)
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


# Settings only some runs read, and what a run needs for each to be read: a target that fuses CLIP in,
# one that distills at all, or a feature loss. Each test sees (target, feature loss) as resolved.
_CLIP_SETTINGS = ("prompts", "clip_tau", "clip_renormalize", "clip_model")
_USED_WHEN: dict[str, tuple[str, Any]] = {
    "alpha": ("target richkd (the teacher's weight in the fused logits, eq. 4)", lambda t, f: t == "richkd"),
    "lam": ("target richkd and a feature loss (the teacher's weight in the fused features, eq. 7)",
            lambda t, f: t == "richkd" and f is not None),
    "gamma": ("a feature loss (its weight, eq. 9)", lambda t, f: t != "ce" and f is not None),
    "feature_loss": ("a target that distills (kd, clip or richkd)", lambda t, f: t != "ce" or f is None),
    **{key: ("a target with CLIP's logits (clip or richkd)", lambda t, f: t in ("clip", "richkd"))
       for key in _CLIP_SETTINGS},
    **{key: ("a target that distills (kd, clip or richkd)", lambda t, f: t != "ce")
       for key in ("method", "temperature", "beta", "method_params")},
}


def resolved_losses(settings: dict[str, Any]) -> tuple[str, str | None]:
    """(target, feature loss) of a run's settings as TrainConfig resolves them."""
    target = settings.get("target") or ("richkd" if settings.get("cache") else "ce")
    return target, settings.get("feature_loss", TrainConfig.feature_loss)


def unused_settings(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """(setting, what would read it) for each setting of `settings` (those a flag or a recipe gave: defaults
    are not in it) that the run it resolves to would not read. `--method none` and `--feature-loss none`
    say "no such loss" and are always consistent."""
    target, feature_loss = resolved_losses(settings)
    return [(key, needs) for key, (needs, used) in _USED_WHEN.items()
            if not _off(settings.get(key)) and not used(target, feature_loss)]


def _off(value: object) -> bool:
    """Not given, or given as "nothing" (no method parameters, --no-clip-renormalize); 0 is a value."""
    return value is None or value is False or (isinstance(value, dict) and not value)


def check_used(settings: dict[str, Any], flags: set[str]) -> None:
    """A setting the run would not read is an error, never silently ignored (`--target ce --alpha 0.3`
    trains plain cross-entropy): one line naming each such setting, whether a flag (`flags`: the
    settings given on the command line) or the recipe gave it, and what would read it."""
    unused = unused_settings(settings)
    if not unused:
        return
    target, feature_loss = resolved_losses(settings)
    run = f"target {target}" + ("" if target == "ce" else f", feature loss {feature_loss or 'none'}")
    named = [f"{flag_name(key) if key in flags else f'the recipe setting {key}'} (read only with {needs})"
             for key, needs in unused]
    them = "it" if len(unused) == 1 else "them"
    raise ConfigError(f"{'; '.join(named)} set, but this run ({run}) would not use {them}: drop {them} or "
                      "change the target")


def flag_name(key: str) -> str:
    """The command-line flag of a TrainConfig field (`method_params` -> `--method-param`)."""
    return "--method-param" if key == "method_params" else f"--{key.replace('_', '-')}"


def logit_params(cfg: TrainConfig) -> dict[str, float] | None:
    """The logit method's parameters as trained: its reference values, replaced by the recipe's and the
    flags'. None when no logit loss is trained. A setting the method does not use is an error, never ignored."""
    from richkd_cache.distill import DEFAULTS, describe_params, get_logit_loss, method_params

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
        number = "{:d}" if self.integer else "{:g}"  # a seed's bound in full, not 4.29497e+09
        low = "-inf" if self.low is None else number.format(self.low)
        high = "inf" if self.high is None else number.format(self.high)
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
    # torch takes 64-bit seeds and each epoch's stream is seed x 100,003 + epoch: 32 bits keep that in range
    "seed": Range(0, 2**32 - 1, integer=True, meaning="a 32-bit seed"),
    "view_seed": Range(0, None, integer=True),
    "workers": Range(0, None, integer=True),
    "jobs": Range(1, None, integer=True),  # sweep's runs at once
    "log_every": Range(1, None, integer=True, meaning="steps"),
    "block_rows": Range(1, None, integer=True),
    "topk": Range(1, None, integer=True),
    "image_size": Range(1, None, integer=True, meaning="pixels"),
    "resize": Range(1, None, integer=True, meaning="pixels"),
    "student_image_size": Range(1, None, integer=True, meaning="pixels"),
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
    check_values({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def check_values(settings: dict[str, Any]) -> None:
    """Range-check every setting that has a range, by name (a list is checked item by item)."""
    for name, value in settings.items():
        if name == "alpha" and isinstance(value, str):  # an adaptive rule instead of a fixed weight
            from richkd_cache.distill.adaptive import ALPHA_RULES

            if value in ALPHA_RULES:
                continue
        if name in RANGES and value is not None:
            for item in value if isinstance(value, (tuple, list)) else (value,):
                check_range(name, item)


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe is a TOML table of TrainConfig fields shipped in pipelines/recipes/NAME.toml."""
    available = list_recipes()
    if name not in available:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(available) or 'none'}")
    text = resources.files("pipelines.recipes").joinpath(f"{name}.toml").read_text()
    table = tomllib.loads(text)
    check_fields(TrainConfig, table, f"recipe {name}")
    check_types(table, f"recipe {name}")
    return table


# Keys a --config file takes besides the recipes' (TrainConfig fields): the recipe it starts from and the
# seeds, as on the command line. Run control (resume, overwrite, quiet) stays on the command line.
CONFIG_KEYS = ("recipe", "seeds")
_NOT_IN_FILES = ("resume", "overwrite", "quiet", "extra", "stream_window")
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")
_PATHS = ("out", "cache", "data_root", "teacher_checkpoint", "clip_checkpoint")
_MAX_CONFIG_BYTES = 1 << 20  # a settings file, not data: anything larger is refused unread


def load_config_file(path: str, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A user's own settings file (`train --config FILE`): TOML, or YAML (.yaml/.yml), holding a table of
    the recipes' keys, `recipe = NAME` to start from a shipped recipe, `seeds`, and `extra_keys`.

    The file is untrusted: YAML is read with the safe loader (plain data only), every key must be known,
    every value of the right type; anything wrong is one line naming the file."""
    where = f"--config {path}"
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"{where}: settings files are TOML (.toml) or YAML (.yaml, .yml), "
                          f"not {suffix or 'no suffix'}")
    try:
        if file.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is larger than {_MAX_CONFIG_BYTES >> 20} MiB: not a settings file")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    table = parse_toml(text, where) if suffix == ".toml" else parse_yaml(text, where)
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must hold a table of settings (KEY = VALUE), not {type(table).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(_NOT_IN_FILES) | {*CONFIG_KEYS, *extra_keys}
    unknown = sorted(str(k) for k in table if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; a file takes the recipes' keys "
                          "(the train flags' names with _), recipe and seeds")
    if "recipe" in table and not isinstance(table["recipe"], str):
        raise ConfigError(f"{where}: recipe must be a recipe's name (see `richkd-cache recipes`), "
                          f"got {short(table['recipe'])}")
    check_types(table, where)
    for key in _PATHS:  # as a shell would on the command line
        if isinstance(table.get(key), str):
            table[key] = os.path.expanduser(table[key])
    return table


def parse_toml(text: str, where: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None


def parse_yaml(text: str, where: str) -> Any:
    import yaml  # PyYAML: installed with open_clip's dependencies, declared in pyproject.toml

    try:
        return yaml.safe_load(text)  # plain data only: no tags that build objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or type(e).__name__}") from None


def check_types(table: dict[str, Any], where: str) -> None:
    """Each TrainConfig field of `table` holds a value of its type (ranges are checked by TrainConfig itself)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    for key, value in table.items():
        if key in kinds and not fits(kinds[key], value):
            raise ConfigError(f"{where}: {key} must be {describe_type(kinds[key])}, got {short(value)}")


def fits(kind: str, value: Any) -> bool:
    """Whether `value` (from TOML, YAML or a command line) has a TrainConfig annotation's type."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for part in (p.strip() for p in kind.split("|")):
        if (part == "None" and value is None or part == "bool" and isinstance(value, bool)
                or part == "int" and number and isinstance(value, int) or part == "float" and number
                or part == "str" and isinstance(value, str)):
            return True
        if part.startswith("tuple[int") and isinstance(value, (list, tuple)):
            return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if part.startswith("tuple[str") and isinstance(value, (list, tuple)):
            return all(isinstance(v, str) for v in value)
        if part.startswith("dict[str, float]") and isinstance(value, dict):
            return all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                       for k, v in value.items())
    return False


def describe_type(kind: str) -> str:
    names = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false"}
    parts = [p.strip() for p in kind.split("|") if p.strip() != "None"]
    if parts[0].startswith("tuple"):
        return "a list of strings" if "str" in parts[0] else "a list of integers"
    if parts[0].startswith("dict"):
        return "a table of NAME = number"
    return " or ".join(names.get(p, p) for p in parts)


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    import torch

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
