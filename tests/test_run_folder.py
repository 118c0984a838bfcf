"""A run folder is known by its own record (config.json, the checkpoints' metadata), never by file names; a
save that fails (a full disk) is one line and leaves every file as it was."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from clirun import invoke
from richkd_cache.models import create_model

FAST = ["--student", "resnet8", "--device", "cpu", "--workers", "0", "--quiet", "--epochs", "1"]


def refused(result, *words: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("name, mine", [
    ("best.pth", lambda p: torch.save({"model": create_model("resnet8", 10).state_dict()}, p)),
    ("best.pth", lambda p: p.write_bytes(b"my own notes")),
    ("config.json", lambda p: p.write_text('{"lr": 0.1, "student": "mine"}')),
    ("metrics.parquet", lambda p: p.write_bytes(b"PAR1")),
])
def test_a_users_file_with_a_run_files_name_is_never_a_run_nor_replaced(digits_cache: Path, tmp_path: Path,
                                                                        name: str, mine) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    mine(out / name)
    before = (out / name).read_bytes()
    for flags in ([], ["--overwrite"], ["--resume"]):
        result = invoke("train", "--cache", digits_cache, *FAST, *flags, "--out", out)
        refused(result, name, "no richkd-cache run wrote", "nothing was changed")
        assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_bytes() == before


def test_overwrite_replaces_a_runs_own_files_and_keeps_a_foreign_checkpoint_safe(digits_cache: Path,
                                                                                  tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke("train", "--cache", digits_cache, *FAST, "--out", out).exit_code == 0
    refused(invoke("train", "--cache", digits_cache, *FAST, "--out", out), "already holds a run", "--overwrite")
    assert invoke("train", "--cache", digits_cache, *FAST, "--overwrite", "--out", out).exit_code == 0
    (out / "best.pth").write_bytes(b"someone's weights")  # no longer the run's own checkpoint
    refused(invoke("train", "--cache", digits_cache, *FAST, "--overwrite", "--out", out), "best.pth",
            "no richkd-cache run wrote")
    assert (out / "best.pth").read_bytes() == b"someone's weights"


@pytest.mark.parametrize("name, error", [
    # torch's C++ writer reports a full disk as a RuntimeError (this is its message on a disk that filled up)
    ("last.pth", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")),
    ("last.pth", OSError(errno.ENOSPC, "No space left on device")),
])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_files(digits_cache: Path, tmp_path: Path,
                                                                              monkeypatch, name: str,
                                                                              error: Exception) -> None:
    out = tmp_path / "run"
    assert invoke("train", "--cache", digits_cache, *FAST, "--out", out).exit_code == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if f".{name}." in str(f):  # the temporary file the checkpoint is written to
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    result = invoke("train", "--cache", digits_cache, *FAST[:-1], "2", "--resume", "--out", out)
    refused(result, f"could not write {out / name}", f"the previous {name} is intact")
    assert "inline_container" not in result.output
    assert (out / name).read_bytes() == saved[name]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


class _Marker:
    """Unpickling this object would create a file: a crafted checkpoint must never get that far."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_crafted_checkpoint_is_refused_as_code_without_torchs_advice(tmp_path: Path, legacy: bool) -> None:
    crafted, marker = tmp_path / "crafted.pth", tmp_path / "marker"
    torch.save({"model": create_model("resnet8", 10).state_dict(), "hook": _Marker(str(marker))}, crafted,
               _use_new_zipfile_serialization=not legacy)
    result = invoke("evaluate", crafted, "--dataset", "digits", "--no-attacks", "--device", "cpu", "--workers", "0")
    refused(result, str(crafted), "holds Python objects besides weights (", "open)", "it will not be loaded")
    assert "weights_only" not in result.output and not marker.exists()
