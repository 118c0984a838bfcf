"""Cache format 3: the arrays, their dtypes, shapes and chunking, and the manifest rules.

A cache holds several CLIP models, each under `clip/<name>/` with its own write flags and prompt sets, so
a model can be added to a complete cache without touching the teacher's arrays. Views are packed records
(uint8, `views/params`: the view policy's integer fields, listed in the manifest's `views`), top-k class
indices int16 where the classes fit. Formats 1 and 2 (float32 view fractions of a centre crop) are refused
with the reason. docs/cache-format.md is the prose version of this module; keep the two in step.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import numpy as np

from cache_store.errors import CacheError

FORMAT_VERSION = 3
READABLE_FORMATS = (3,)
# formats 1-2 stored views as float32 fractions of the centre crop: their pixels are not those format 3 replays
OLD_FORMATS = (1, 2)
MANIFEST_KEY = "richkd_cache"
STATUS_BUILDING, STATUS_COMPLETE = "building", "complete"
CLIP_GROUP = "clip"
CLASS_INDEX_ARRAYS = ("labels", "teacher/topk_indices", "teacher/strong_topk_indices")  # class indices 0..C-1
STORED_BYTE_ORDER = "<"  # every multi-byte value is stored little-endian (the `bytes` codec's endian)
CHECKSUM_CODEC = "crc32c"  # zarr v3's core checksum codec, last in every array's codec chain
# The top-level nodes a cache is made of: `build --overwrite` deletes, and `pack` copies, only keys under
# these that are zarr metadata or chunk keys (every array of CacheLayout lives under one of them).
TOP_LEVEL_NODES = ("labels", "written", "views", "teacher", "clip")
_NODE = rf"(?:{'|'.join(TOP_LEVEL_NODES)})(?:/[A-Za-z0-9_.-]+)*"
CACHE_KEY = re.compile(rf"zarr\.json|{_NODE}/(?:zarr\.json|c(?:/\d+)+)")
# zarr's LocalStore writes KEY via KEY-stem.<uuid hex>.partial and a rename: a killed write leaves one
WRITE_LEFTOVER = re.compile(rf"(?:{_NODE}/)?(?:c/(?:\d+/)*)?[^/]+\.[0-9a-f]{{32}}\.partial")

_NUMBER = (int, float)
# Fields readers rely on, with their JSON types (a dict is checked field by field). Anything else in the
# manifest is provenance for people and is not checked. None in a tuple: the value may be null.
CLIP_FIELDS: dict = {"arch": str, "requested": str, "tau": _NUMBER, "pretrained?": (str, None),
                     "checkpoint_sha256?": (str, None), "zero_shot_accuracy?": dict}
_COMMON_FIELDS: dict = {
    "format_version": int,
    "status": str,
    "layout": dict,
    "dataset": {"name": str, "split": str, "num_samples": int, "num_classes": int, "classes": list,
                "fingerprint": str, "root?": (str, None)},
    "teacher": {"arch": str, "checkpoint_sha256": str, "checkpoint?": str, "accuracy?": (*_NUMBER, None)},
    "build_key": dict,
}
MANIFEST_FIELDS: dict = {**_COMMON_FIELDS, "clip_models": dict}  # each entry: CLIP_MODEL_FIELDS
CLIP_MODEL_FIELDS: dict = {**CLIP_FIELDS, "status": str, "embed_dim": int, "feature_dim": int}
OPTIONAL_LAYOUT_KEYS = ("teacher_topk", "clip_views", "strong_views", "strong_param_dim", "teacher_clean", "features")  # None when unused; absent in older manifests
MODELS = ("teacher", "clip")
CLIP_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A prompt set's name: one array under a model's text group, so no nesting, no "." or "..", no hidden name
PROMPT_SET_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
VIEW_FILL = 0xFF  # packed view records never hold an all-0xFF row (richkd_cache/views.py Record)
STRONG_PREFIX = "strong_"
CLEAN_PREFIX = "clean_"  # teacher/clean_logits (or clean_topk_*): the teacher on the clean view, beside random views  # views/strong_params, teacher/strong_logits (or strong_topk_*): the strong views' arrays


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    fill_value: float | int | bool


@dataclass(frozen=True)
class CacheLayout:
    """Sizes that fix every array's shape. Sample-axis chunks are whole write blocks of `block_rows`.

    `num_views` is the teacher's view count (and that of `views/params`); `clip_views` is CLIP's: 1 (the
    clean view) or `num_views` (the teacher's views). None, in caches written before the two had their
    own policies, means `num_views`. `strong_views` is K, the strong (RandAugment) views per sample whose
    records and teacher logits are stored for methods that train on a second view (MLKD); None: none.
    `view_param_dim` and `strong_param_dim` are the bytes of one packed view record of each policy.
    `teacher_clean` True: random views hold no clean view, so the teacher's logits on it are stored apart
    (`teacher/clean_*`, one row per sample) for the accuracy reports; None: not stored.
    `features` False: no pooled features are stored (no `teacher/features`, no CLIP model's `features`),
    only feature losses (eq. 7-8) read them; None (older caches) or True: they are.
    """

    num_samples: int
    num_views: int
    num_classes: int
    teacher_dim: int
    view_param_dim: int
    block_rows: int
    teacher_topk: int | None = None
    clip_views: int | None = None
    strong_views: int | None = None
    strong_param_dim: int | None = None
    teacher_clean: bool | None = None
    features: bool | None = None

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in OPTIONAL_LAYOUT_KEYS}
        wrong = [f"{k}={v!r}" for k, v in sizes.items() if not _is_count(v)]  # JSON true is no count
        if self.clip_views is not None and not (_is_count(self.clip_views) and self.clip_views in (1, self.num_views)):
            wrong.append(f"clip_views={self.clip_views!r} (must be 1 or num_views={self.num_views})")
        if self.teacher_topk is not None and not (_is_count(self.teacher_topk) and self.teacher_topk <= self.num_classes):
            wrong.append(f"teacher_topk={self.teacher_topk!r} (must be 1..num_classes or None)")
        if self.strong_views is not None and not _is_count(self.strong_views):
            wrong.append(f"strong_views={self.strong_views!r} (must be a positive integer or None)")
        if (self.strong_views is None) != (self.strong_param_dim is None) or not (
                self.strong_param_dim is None or _is_count(self.strong_param_dim)):
            wrong.append(f"strong_param_dim={self.strong_param_dim!r} (a positive integer with strong_views, else None)")
        if self.teacher_clean not in (True, None):
            wrong.append(f"teacher_clean={self.teacher_clean!r} (must be true or absent)")
        if not isinstance(self.features, (bool, type(None))):
            wrong.append(f"features={self.features!r} (must be true, false or absent)")
        if wrong:
            raise CacheError(f"invalid cache layout: {', '.join(wrong)} (sizes are positive integers)")

    @property
    def stores_features(self) -> bool:
        return self.features is not False

    @property
    def index_dtype(self) -> str:
        """Top-k class indices: int16 where every class index fits (C <= 32,768), else int32."""
        return "int16" if self.num_classes <= 1 << 15 else "int32"

    @property
    def clip_num_views(self) -> int:
        return self.num_views if self.clip_views is None else self.clip_views

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.block_rows)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.num_samples)

    def per_view(self, name: str, dtype: str, width: int, views: int | None = None,
                 fill: float | int = float("nan")) -> ArraySpec:
        """An (N, V, width) array chunked by write block (V: the teacher's views unless given)."""
        v = self.num_views if views is None else views
        return ArraySpec(name, dtype, (self.num_samples, v, width), (self.block_rows, v, width), fill)

    def flags(self, name: str) -> ArraySpec:
        """One flag per block, one chunk per flag, so writers of different blocks never share a chunk."""
        return ArraySpec(name, "bool", (self.num_blocks,), (1,), False)

    def sample_arrays(self) -> dict[str, ArraySpec]:
        """The teacher's part: arrays with one row per sample (and a view axis), written block by block
        and flagged in `written`."""
        per_view = self.per_view
        specs = [
            ArraySpec("labels", "int32", (self.num_samples,), (self.block_rows,), -1),
            per_view("views/params", "uint8", self.view_param_dim, fill=VIEW_FILL),
        ]
        if self.stores_features:
            specs.append(per_view("teacher/features", "float16", self.teacher_dim))
        if self.teacher_topk:
            specs += [per_view("teacher/topk_values", "float16", self.teacher_topk),
                      per_view("teacher/topk_indices", self.index_dtype, self.teacher_topk, fill=-1)]
        else:
            specs.append(per_view("teacher/logits", "float16", self.num_classes))
        logits = [spec for spec in specs if spec.name.startswith("teacher/") and "features" not in spec.name]
        if self.teacher_clean:  # the teacher's logits on the clean view, one row per sample
            specs += [per_view(spec.name.replace("/", f"/{CLEAN_PREFIX}", 1), spec.dtype, spec.shape[2], 1,
                               spec.fill_value) for spec in logits]
        if self.strong_views:  # the teacher's logits on K strong views, stored like those on its own views
            k = self.strong_views
            specs.append(per_view(f"views/{STRONG_PREFIX}params", "uint8", self.strong_param_dim, k, fill=VIEW_FILL))
            specs += [per_view(spec.name.replace("/", f"/{STRONG_PREFIX}", 1), spec.dtype, spec.shape[2], k,
                               spec.fill_value) for spec in logits]
        return {s.name: s for s in specs}

    def arrays(self) -> dict[str, ArraySpec]:
        """The teacher's part, its flags `written` included."""
        return {**self.sample_arrays(), "written": self.flags("written")}


def _is_count(value: object) -> bool:
    """A positive integer, and not a boolean (Python's True is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class ClipLayout:
    """One CLIP model's arrays: image embeddings (N, Vc, D) and features (N, Vc, Fc) under `root`, its
    block flags, and its prompt sets (M, C, D) under `root`/text: root `clip/<name>`, flags
    `clip/<name>/written`."""

    name: str
    embed_dim: int
    feature_dim: int
    root: str
    written: str

    @property
    def image_embeds(self) -> str:
        return f"{self.root}/image_embeds"

    @property
    def features(self) -> str:
        return f"{self.root}/features"

    @property
    def text_group(self) -> str:
        return f"{self.root}/text"

    def sample_arrays(self, layout: CacheLayout) -> dict[str, ArraySpec]:
        v = layout.clip_num_views
        specs = [layout.per_view(self.image_embeds, "float16", self.embed_dim, v)]
        if layout.stores_features:  # the cache's choice, the same for every CLIP model
            specs.append(layout.per_view(self.features, "float16", self.feature_dim, v))
        return {s.name: s for s in specs}

    def arrays(self, layout: CacheLayout) -> dict[str, ArraySpec]:
        """Its arrays, with its flags."""
        return {**self.sample_arrays(layout), self.written: layout.flags(self.written)}


def clip_model_name(requested: str) -> str:
    """The name a CLIP model is stored and chosen under: what the user asked for, with characters that
    cannot name a zarr node replaced (`ViT-L/14` -> `ViT-L-14`, `ViT-L/14@336px` -> `ViT-L-14-336px`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", requested)


def read_layout(manifest: dict) -> CacheLayout:
    """The teacher's layout of a (validated) manifest."""
    return CacheLayout(**manifest["layout"])


def clip_records(manifest: dict) -> dict[str, dict]:
    """Each CLIP model's manifest entry by name, with its `status`."""
    return {name: dict(record) for name, record in manifest["clip_models"].items()}


def clip_layouts(manifest: dict) -> dict[str, ClipLayout]:
    """Each CLIP model's arrays by name."""
    return {name: ClipLayout(name, r["embed_dim"], r["feature_dim"], f"{CLIP_GROUP}/{name}", f"{CLIP_GROUP}/{name}/written")
            for name, r in manifest["clip_models"].items()}


def layout_record(layout: CacheLayout) -> dict:
    """The manifest's `layout`: every size, the optional ones only when set (`features` only when false)."""
    return {k: v for k, v in asdict(layout).items() if v is not None and not (k == "features" and v)}


def model_of(array: str) -> str | None:
    """The model whose outputs a sample-axis array holds (teacher/..., clip/...), else None."""
    head = array.split("/", 1)[0]
    return head if head in MODELS else None


def is_strong(array: str) -> bool:
    """Whether an array holds the strong views (their parameters or the teacher's outputs on them)."""
    return array.rsplit("/", 1)[-1].startswith(STRONG_PREFIX)


def is_clean_row(array: str) -> bool:
    """Whether an array holds the teacher's clean-view row stored beside random views."""
    return array.rsplit("/", 1)[-1].startswith(CLEAN_PREFIX)


def model_views(manifest: dict) -> dict[str, dict]:
    """Each model's view policy and view count. A cache written when both models shared one policy
    (no per-model entries in its manifest) gives both that policy."""
    views = manifest.get("views") or {}
    layout = read_layout(manifest)
    shared = str(views.get("policy", "clean"))
    return {
        "teacher": dict(views.get("teacher") or {"policy": shared, "num_views": layout.num_views}),
        "clip": dict(views.get("clip") or {"policy": shared, "num_views": layout.clip_num_views}),
    }


def choose_block_rows(bytes_per_row: int, target_bytes: int = 4 << 20, multiple: int = 64) -> int:
    """Rows per write block (= per chunk) so the largest chunk is a few MB (zarr reads whole chunks)."""
    rows = max(multiple, target_bytes // max(bytes_per_row, 1))
    return int(rows // multiple * multiple)


def validate_manifest(manifest: object, url: str = "cache") -> None:
    """Refuse what this version does not understand, saying why (`url` only names the cache in messages)."""
    if not isinstance(manifest, dict):
        raise CacheError(f"{url} is not a richkd-cache cache (no '{MANIFEST_KEY}' manifest)")
    version = manifest.get("format_version")
    if version in OLD_FORMATS and not isinstance(version, bool):
        raise CacheError(f"{url}: cache format {version} was written by an earlier richkd-cache, whose views are "
                         "not those this version replays (format 3 crops whole images and packs view records); "
                         "rebuild it with `richkd-cache build`")
    if version not in READABLE_FORMATS or isinstance(version, bool):
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise CacheError(
                f"{url}: cache format {version} is newer than this richkd-cache understands "
                f"({FORMAT_VERSION}); upgrade richkd-cache"
            )
        raise CacheError(f"{url}: unknown cache format version {version!r} (this richkd-cache reads "
                         f"{', '.join(map(str, READABLE_FORMATS))})")
    problem = manifest_problem(manifest, MANIFEST_FIELDS)
    if problem:
        raise CacheError(f"{url}: the manifest's {problem}; the cache is damaged, rebuild it")
    if manifest["status"] not in (STATUS_BUILDING, STATUS_COMPLETE):
        raise CacheError(
            f"{url}: unknown status {manifest['status']!r} (expected {STATUS_BUILDING} or {STATUS_COMPLETE})"
        )
    _check_layout_keys(manifest["layout"], version, url)
    _check_dataset(manifest["dataset"], read_layout(manifest), url)  # sizes must be valid too
    for name, record in manifest["clip_models"].items():
        _check_clip_model(name, record, url)


def _check_layout_keys(layout: object, version: int, url: str) -> None:
    expected = {f.name for f in fields(CacheLayout)}
    if not isinstance(layout, dict) or not expected - set(OPTIONAL_LAYOUT_KEYS) <= set(layout) <= expected:
        got = sorted(layout) if isinstance(layout, dict) else type(layout).__name__
        raise CacheError(f"{url}: the manifest's layout has keys {got}, format {version} needs {sorted(expected)}")


def _check_dataset(dataset: dict, layout: CacheLayout, url: str) -> None:
    """The manifest agrees with itself: one class name (a string) per class, and the dataset's sizes are
    the layout's (readers index classes and rows by them)."""
    classes = dataset["classes"]
    if not all(isinstance(c, str) for c in classes):
        odd = next(c for c in classes if not isinstance(c, str))
        raise CacheError(f"{url}: the manifest's dataset.classes holds {_json_type(odd)} ({odd!r}), not a class "
                         "name; the cache is damaged, rebuild it")
    counts = {"dataset.classes": len(classes), "dataset.num_classes": dataset["num_classes"],
              "layout.num_classes": layout.num_classes}
    samples = {"dataset.num_samples": dataset["num_samples"], "layout.num_samples": layout.num_samples}
    for sizes in (counts, samples):
        if len(set(sizes.values())) > 1:
            said = ", ".join(f"{k} {v}" for k, v in sizes.items())
            raise CacheError(f"{url}: the manifest contradicts itself ({said}); the cache is damaged, rebuild it")


def _check_clip_model(name: str, record: object, url: str) -> None:
    """One entry of format 2's `clip_models`: a usable name, its fields, a positive tau and dims, a status."""
    if not CLIP_MODEL_NAME.fullmatch(name):
        raise CacheError(f"{url}: the manifest names a CLIP model {name!r}, which is not a valid node name; "
                         "the cache is damaged, rebuild it")
    if not isinstance(record, dict):
        raise CacheError(f"{url}: the manifest's field clip_models.{name} is {_json_type(record)}, expected an object")
    problem = manifest_problem(record, CLIP_MODEL_FIELDS, f"clip_models.{name}.")
    if problem:
        raise CacheError(f"{url}: the manifest's {problem}; the cache is damaged, rebuild it")
    _check_tau(record["tau"], f"clip_models.{name}.tau", url)
    if record["embed_dim"] < 1 or record["feature_dim"] < 1:
        raise CacheError(f"{url}: the manifest's clip_models.{name} has embed_dim {record['embed_dim']} and "
                         f"feature_dim {record['feature_dim']}; sizes are positive integers")
    if record["status"] not in (STATUS_BUILDING, STATUS_COMPLETE):
        raise CacheError(f"{url}: CLIP model {name} has unknown status {record['status']!r} "
                         f"(expected {STATUS_BUILDING} or {STATUS_COMPLETE})")


def _check_tau(tau: float, field: str, url: str) -> None:
    if not math.isfinite(tau) or tau <= 0:
        raise CacheError(f"{url}: the manifest's {field} is {tau!r}, not a positive number")


def manifest_problem(value: dict, schema: dict, prefix: str = "") -> str | None:
    """The first field of `value` that is missing or of the wrong type under `schema`, as "field: why"."""
    for key, expected in schema.items():
        name, optional = key.removesuffix("?"), key.endswith("?")
        field = prefix + name
        if name not in value:
            if optional:
                continue
            return f"field {field} is missing"
        item = value[name]
        if isinstance(expected, dict):
            if not isinstance(item, dict):
                return f"field {field} is {_json_type(item)}, expected an object"
            problem = manifest_problem(item, expected, field + ".")
            if problem:
                return problem
            continue
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if item is None and None in allowed:
            continue
        types = tuple(t for t in allowed if t is not None)
        if isinstance(item, bool) and bool not in types or not isinstance(item, types):
            return f"field {field} is {_json_type(item)}, expected {' or '.join(_json_type(t) for t in allowed)}"
    return None


def _json_type(value: object) -> str:
    """A value's (or a type's) JSON name, for messages."""
    kind = value if isinstance(value, type) or value is None else type(value)
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", None: "null", type(None): "null"}
    return names[kind] if kind in names else getattr(kind, "__name__", str(kind))


def bad_rows(name: str, rows: np.ndarray, num_classes: int) -> np.ndarray:
    """Row positions (first axis) of a block that no model or dataset can have produced correctly:
    NaN/Inf anywhere in a float row, or a class index outside 0..num_classes-1."""
    flat = rows.reshape(len(rows), -1)
    if np.issubdtype(rows.dtype, np.floating):
        return np.flatnonzero(~np.isfinite(flat).all(axis=1))
    if name in CLASS_INDEX_ARRAYS:
        return np.flatnonzero(((flat < 0) | (flat >= num_classes)).any(axis=1))
    return np.empty(0, dtype=np.int64)


def describe_samples(samples: np.ndarray, shown: int = 10) -> str:
    """Sample indices for a message: the first few, then '...'."""
    text = ", ".join(map(str, samples[:shown].tolist()))
    return text + (" ..." if len(samples) > shown else "")


def check_array(name: str, spec: ArraySpec, dtype: np.dtype, shape: tuple[int, ...], chunks: tuple[int, ...],
                url: str) -> None:
    """The stored dtype (byte order included), shape and chunks are the layout's (a chunk per write block:
    other chunks would mix writers' blocks, and a chunk of 0 rows holds nothing)."""
    if np.dtype(dtype) != np.dtype(spec.dtype).newbyteorder(STORED_BYTE_ORDER) or tuple(shape) != spec.shape:
        raise CacheError(
            f"cache {url}: array {name} is {describe_dtype(dtype)} {tuple(shape)}, "
            f"its manifest says {spec.dtype} {spec.shape}"
        )
    if tuple(chunks) != spec.chunks:
        raise CacheError(f"cache {url}: array {name} is stored in chunks of {tuple(chunks)}, its layout says "
                         f"{spec.chunks}; the cache is damaged, rebuild it")


def describe_dtype(dtype: np.dtype) -> str:
    """`float16`, or `float16 (big-endian)` when the byte order is not the one caches are stored in."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1 or dtype.str[0] == STORED_BYTE_ORDER:
        return dtype.name
    return f"{dtype.name} ({'big' if dtype.str[0] == '>' else 'little'}-endian)"


def cache_arrays(layout: CacheLayout, clips: dict[str, ClipLayout]) -> dict[str, ArraySpec]:
    """Every fixed-shape array of a cache: the teacher's part and each CLIP model's, flags included."""
    out = layout.arrays()
    for clip in clips.values():
        out.update(clip.arrays(layout))
    return out


def flags_of(name: str, clips: dict[str, ClipLayout]) -> str:
    """The flags array whose blocks say which chunks of array `name` are written."""
    for clip in clips.values():
        if name in (clip.image_embeds, clip.features, clip.written):
            return clip.written
    return "written"
