"""Prompt sets: which text CLIP is asked about each class (eq. 2-3 average over them).

Shipped sets (by dataset): `single` ("a photo of a {}."), `multi` (CLIP's 18 CIFAR templates; the 80
ImageNet templates open_clip carries for image folders), `complex` (the multi templates x several
names per class, written for CIFAR-10, CIFAR-100 and the bundled digits), `richkd-code` (the 12 templates
of the RichKD authors' released code, github.com/IPL-sharif/RichKD `cache.py`, filled with the dataset's
class names as they are, underscores included, as that code does). User sets come from TOML or JSON files
with `templates`, optional per-class `synonyms` and optional `class_names` overrides.

Wherever a set is chosen for the user it is `multi` (`default_prompt_set`): the paper's method is
multi-prompting (sec. 3.1), so a cache holding several sets trains on it by name, never by sort order.

Class names are cleaned as CLIP's own CIFAR lists are (underscores to spaces: "aquarium_fish" ->
"aquarium fish"); the names that stay ambiguous ("ray", "plain", "tank") get disambiguating
synonyms in the `complex` set rather than being renamed, so `single` and `multi` match CLIP's lists.
"""

from __future__ import annotations

import hashlib
import json
import string
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cache_store.schema import PROMPT_SET_NAME
from richkd_cache.errors import ClipError

SHIPPED = ("single", "multi", "complex", "richkd-code")
DEFAULT = "multi"  # the paper's multi-prompting (sec. 3.1)
_SYNONYM_FILES = {"cifar10": "cifar10_synonyms.json", "cifar100": "cifar100_synonyms.json", "digits": "digits_synonyms.json"}
_CIFAR_LIKE = ("cifar10", "cifar100", "digits")
_FILE_KEYS = ("name", "templates", "synonyms", "class_names", "classes")


@dataclass(frozen=True)
class PromptSet:
    """templates: each with one "{}" for the class name; synonyms: raw class -> names to fill in
    (replacing the class name); class_names: raw class -> the single name to use instead;
    classes: the class list a prompt file was written for, when it says (checked against the data);
    raw_names: fill in the dataset's class names uncleaned ("aquarium_fish"), as the released code does."""

    name: str
    templates: tuple[str, ...]
    synonyms: dict[str, tuple[str, ...]] | None = None
    class_names: dict[str, str] | None = None
    classes: tuple[str, ...] | None = None
    raw_names: bool = False


def list_prompt_sets() -> list[str]:
    return list(SHIPPED)


def default_prompt_set(stored: list[str]) -> str:
    """The set used when the user names none: `multi` when it is among `stored`, else the first stored.

    Raises ClipError when nothing is stored (callers that can go without CLIP check before asking).
    """
    if not stored:
        raise ClipError("no prompt set is stored: add one with `richkd-cache prompts add CACHE multi`")
    return DEFAULT if DEFAULT in stored else stored[0]


def get_prompt_set(name: str, dataset: str) -> PromptSet:
    if name not in SHIPPED:
        raise ClipError(f"unknown prompt set {name!r}; shipped: {', '.join(SHIPPED)} (or give a .toml/.json file)")
    if name == "single":
        return PromptSet("single", tuple(_templates()["single"]))
    if name == "richkd-code":
        return PromptSet("richkd-code", tuple(_released_code_templates()), raw_names=True)
    multi = tuple(_templates()["cifar"]) if dataset in _CIFAR_LIKE else tuple(_imagenet_templates())
    if name == "multi":
        return PromptSet("multi", multi)
    if dataset not in _SYNONYM_FILES:
        raise ClipError(
            f"no shipped synonym list for {dataset}: write a prompt file with `templates` and `synonyms` "
            "and pass it to --prompts"
        )
    synonyms = json.loads(resources.files(__name__).joinpath(_SYNONYM_FILES[dataset]).read_text())
    return PromptSet("complex", multi, {k: tuple(v) for k, v in synonyms.items()})


def load_prompt_file(path: str, name: str | None = None) -> PromptSet:
    """A user prompt set: TOML or JSON with `templates`, optional `synonyms`, `class_names`, `classes`,
    checked against that schema before anything uses it (a file is untrusted input: a string where a
    list belongs would otherwise be split into letters, a stray brace would fail inside CLIP's encoding)."""
    file = Path(path)
    if not file.is_file():
        raise ClipError(f"prompt file {path} not found")
    try:
        text = file.read_text()
        table = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ClipError(f"cannot parse prompt file {path}: {type(e).__name__}: {str(e)[:200]}") from None
    where = f"prompt file {path}"
    if not isinstance(table, dict):
        raise ClipError(f"{where} holds {_kind(table)}; it must be a table with `templates` (a list of strings)")
    unknown = sorted(map(str, set(table) - set(_FILE_KEYS)))
    if unknown:
        raise ClipError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_FILE_KEYS)})")
    templates = table.get("templates")
    if not isinstance(templates, list) or not templates:
        raise ClipError(f"{where} needs a non-empty list of strings `templates`, got {_kind(templates)}")
    for template in templates:
        check_template(template, where)
    synonyms = _string_table(table.get("synonyms"), "synonyms", where, lists=True)
    class_names = _string_table(table.get("class_names"), "class_names", where, lists=False)
    classes = table.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ClipError(f"{where}: `classes` must be a list of class names (strings), got {_kind(classes)}")
    if name is None and "name" in table:
        name = table["name"]
        check_prompt_set_name(name, f"{where}: `name`")
    elif name is None:
        name = file.stem
        check_prompt_set_name(name, f"{where}: its file name", "; name the set with --name")
    return PromptSet(
        name=name,
        templates=tuple(templates),
        synonyms={k: tuple(v) for k, v in synonyms.items()} if synonyms else None,
        class_names=class_names or None,
        classes=tuple(classes) if classes else None,
    )


def check_prompt_set_name(name: object, where: str, hint: str = "") -> None:
    """A plain name: letters, digits, '_' and '-', with '.' only between them (it names a cache array)."""
    if not isinstance(name, str) or not PROMPT_SET_NAME.fullmatch(name):
        raise ClipError(f"{where}: prompt set name {name!r} is not a plain name (letters, digits, '_', '-', "
                        f"and '.' between them){hint}")


def check_template(template: object, where: str) -> None:
    """A template is a string with exactly one `{}` (the class name) and no other format field."""
    if not isinstance(template, str):
        raise ClipError(f"{where}: template {template!r} is {_kind(template)}, not a string")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:  # a lone { or }
        fields = None
    if fields != [("", "", None)]:
        raise ClipError(f"{where}: template {template!r} must contain exactly one {{}} and no other format "
                        "field (write {{ and }} for literal braces)")


def _string_table(value: object, key: str, where: str, lists: bool) -> dict:
    """`synonyms` (class -> non-empty list of strings) or `class_names` (class -> string); absent: {}."""
    if value is None:
        return {}
    want = "a non-empty list of strings" if lists else "a string"
    if not isinstance(value, dict):
        raise ClipError(f"{where}: `{key}` must map class names to {want}, got {_kind(value)}")
    for cls, item in value.items():
        good = (isinstance(item, list) and bool(item) and all(isinstance(n, str) and n.strip() for n in item)
                if lists else isinstance(item, str) and bool(item.strip()))
        if not good:
            raise ClipError(f"{where}: {key}.{cls} is {_kind(item)}, expected {want}"
                            + (f' (e.g. {cls} = ["{item}"])' if lists and isinstance(item, str) else ""))
    return value


def _kind(value: object) -> str:
    """A parsed value's kind, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table", type(None): "nothing"}
    kind = names.get(type(value), type(value).__name__)
    if isinstance(value, list) and not value:
        return "an empty list"
    return f"{kind} {value!r}" if isinstance(value, (bool, int, float, str)) and len(repr(value)) < 40 else kind


def clean_class_name(raw: str) -> str:
    return raw.replace("_", " ").strip()


def class_prompts(prompt_set: PromptSet, raw_classes: list[str]) -> list[list[list[str]]]:
    """The filled prompts [M][C][S_c]: template m, class c, each of class c's names.

    Raises ClipError for a template without exactly one "{}", or names given for unknown classes.
    """
    for template in prompt_set.templates:
        check_template(template, f"prompt set {prompt_set.name}")
    if prompt_set.classes is not None and len(prompt_set.classes) != len(raw_classes):
        raise ClipError(
            f"prompt set {prompt_set.name} is written for {len(prompt_set.classes)} classes; "
            f"the dataset has {len(raw_classes)}"
        )
    known = set(raw_classes)
    for field, table in (("synonyms", prompt_set.synonyms), ("class_names", prompt_set.class_names)):
        unknown = sorted(set(table or {}) - known)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ClipError(f"prompt set {prompt_set.name}: {field} for classes the dataset does not have: {shown}")
    names = [_names(prompt_set, c) for c in raw_classes]
    return [[[template.format(n) for n in class_names] for class_names in names] for template in prompt_set.templates]


def _names(prompt_set: PromptSet, raw: str) -> tuple[str, ...]:
    if prompt_set.synonyms and raw in prompt_set.synonyms:
        names = prompt_set.synonyms[raw]
        if not names:
            raise ClipError(f"prompt set {prompt_set.name}: empty synonym list for class {raw}")
        return tuple(names)
    if prompt_set.class_names and raw in prompt_set.class_names:
        return (prompt_set.class_names[raw],)
    return (raw,) if prompt_set.raw_names else (clean_class_name(raw),)


def prompt_set_hash(prompt_set: PromptSet, raw_classes: list[str]) -> str:
    """Identity of a set by its filled prompts, so two sets with the same text are the same set."""
    filled = class_prompts(prompt_set, raw_classes)
    return hashlib.sha256(json.dumps(filled).encode()).hexdigest()


def prompt_set_manifest(prompt_set: PromptSet, raw_classes: list[str]) -> dict:
    return {
        "name": prompt_set.name,
        "templates": list(prompt_set.templates),
        "synonyms": {k: list(v) for k, v in (prompt_set.synonyms or {}).items()},
        "class_names": dict(prompt_set.class_names or {}),
        "raw_names": prompt_set.raw_names,
        "hash": prompt_set_hash(prompt_set, raw_classes),
        "reduction": "per template: mean of the normalised embeddings of the class's names",
    }


@lru_cache(maxsize=1)
def _templates() -> dict[str, list[str]]:
    return json.loads(resources.files(__name__).joinpath("cifar_templates.json").read_text())


@lru_cache(maxsize=1)
def _released_code_templates() -> list[str]:
    return json.loads(resources.files(__name__).joinpath("richkd_code_templates.json").read_text())["templates"]


def _imagenet_templates() -> list[str]:
    """open_clip carries the 80 ImageNet templates as functions of the class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
