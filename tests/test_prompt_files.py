"""Prompt files are untrusted input: checked against their schema (templates with exactly one `{}`,
synonyms as lists of names, a plain set name) and refused in one line before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clirun import invoke
from pipelines import build
from test_inputs import BUILD, refused

MALFORMED = {
    "synonyms_string.json": ({"templates": ["a photo of {}."], "synonyms": {"zero": "nought"}},
                             ["synonyms.zero", "'nought'", "list of strings"]),
    "synonyms_list.json": ({"templates": ["{}"], "synonyms": ["zero", "nought"]}, ["`synonyms`", "a list"]),
    "templates_string.json": ({"templates": "a photo of {}."}, ["`templates`", "a string"]),
    "template_number.json": ({"templates": ["a photo of {}.", 3]}, ["template 3", "not a string"]),
    "template_field.json": ({"templates": ["a {0} photo of {}."]}, ["'a {0} photo of {}.'", "exactly one {}"]),
    "template_brace.json": ({"templates": ["a photo of {} {"]}, ["'a photo of {} {'", "exactly one {}"]),
    "not_a_table.json": ([{"templates": ["{}"]}], ["holds a list", "`templates`"]),
    "class_names_list.json": ({"templates": ["{}"], "class_names": {"zero": ["nought"]}}, ["class_names.zero"]),
    "bad_name.json": ({"name": "../x", "templates": ["{}"]}, ["'../x'", "not a plain name"]),
}


def build_with(prompts: Path, teacher: Path, out: Path):
    """test_inputs' build of the digits with `prompts` in place of the shipped `single` set."""
    args = [prompts if arg == "single" else arg for arg in BUILD]
    return invoke(*args, "--teacher-checkpoint", teacher, "--out", out)


@pytest.fixture()
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the teacher or a CLIP model fails the test: prompt files are checked before either."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompt file was checked")

    monkeypatch.setattr(build, "setup_teacher", loaded)
    monkeypatch.setattr(build, "load_clip", loaded)


@pytest.mark.parametrize("file", sorted(MALFORMED))
def test_build_refuses_a_malformed_prompt_file_before_loading_a_model(tmp_path: Path, teacher: Path, no_models,
                                                                      file: str) -> None:
    table, words = MALFORMED[file]
    path = tmp_path / file
    path.write_text(json.dumps(table))
    refused(build_with(path, teacher, tmp_path / "c.zarr"), str(path), *words)
    assert not (tmp_path / "c.zarr").exists()


def test_a_toml_synonym_string_and_a_template_without_braces_are_refused_too(tmp_path: Path, teacher: Path,
                                                                             no_models) -> None:
    for text, words in (('templates = ["a photo of {}"]\n[synonyms]\nzero = "nought"\n', ["synonyms.zero"]),
                        ('templates = ["a photo"]\n', ["'a photo'", "exactly one {}"])):
        path = tmp_path / "mine.toml"
        path.write_text(text)
        refused(build_with(path, teacher, tmp_path / "c.zarr"), *words)


def test_prompts_add_refuses_a_path_as_name_and_a_malformed_file(digits_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import prompts

    monkeypatch.setattr(prompts, "load_clip", lambda *a, **k: pytest.fail("CLIP was loaded"))
    for name in ("..", "a/b", ".hidden"):
        refused(invoke("prompts", "add", digits_cache, "--file", "single", "--name", name),
                "--name", repr(name), "not a plain name")
    path = tmp_path / "nought.json"
    path.write_text(json.dumps({"templates": ["{}"], "synonyms": {"zero": "nought"}}))
    refused(invoke("prompts", "add", digits_cache, "--file", path), "synonyms.zero")
    assert invoke("prompts", "list", digits_cache).output.split() == ["multi", "single"]
