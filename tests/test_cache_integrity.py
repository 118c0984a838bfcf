"""What a shared cache promises on disk: damage is named (array and chunk), never read as data; every step
of writing is atomic or resumed; only a cache is ever deleted; pack copies the cache's own files only."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_store import CacheError, create_cache, open_cache, open_for_write, pack_cache, verify_cache
from cache_store import writer as cache_writer
from cache_store.schema import CACHE_KEY, MANIFEST_KEY, TOP_LEVEL_NODES, CacheLayout, clip_layouts
from cache_store.verify import NO_CHECKSUMS
from test_cache_store import CLIP, LAYOUT, MANIFEST, all_arrays, block_arrays, build

TEXT = np.ones((3, 10, 4), np.float32) / 2


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    url = tmp_path / "c.zarr"
    build(str(url))
    return url


def flip_bit(path: Path, byte: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ damaged chunks and arrays


def test_one_flipped_bit_is_named_by_verify_and_by_every_read(cache: Path) -> None:
    flip_bit(cache / "teacher/logits/c/2/0/0")
    report = verify_cache(str(cache))
    assert report.problems == ["array teacher/logits chunk c/2/0/0 (rows 32..47) fails its checksum"]
    reader = open_cache(str(cache))
    with pytest.raises(CacheError, match=r"array teacher/logits chunk c/2/0/0 \(rows 32..47\) fails its checksum"):
        reader.load("teacher/logits")
    with pytest.raises(CacheError, match="chunk c/2/0/0"):
        reader.load_rows("teacher/logits", 32, 48)
    assert reader.load_rows("teacher/logits", 0, 32).shape == (32, 1, 10)  # the other chunks still read


def test_truncated_chunks_and_prompt_sets_are_named(cache: Path) -> None:
    chunk = cache / "clip/tiny/features/c/5/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    flip_bit(cache / "clip/tiny/text/multi/c/0/0/0", 20)
    problems = verify_cache(str(cache)).problems
    assert "array clip/tiny/features chunk c/5/0/0 (rows 80..95) fails its checksum" in problems
    assert "array clip/tiny/text/multi chunk c/0/0/0 (rows 0..2) fails its checksum" in problems
    with pytest.raises(CacheError, match="clip/tiny/text/multi chunk c/0/0/0"):
        open_cache(str(cache)).text_embeddings("multi")


def test_deleted_chunk_or_flag_is_never_read_as_fill(cache: Path) -> None:
    (cache / "teacher/features/c/3/0/0").unlink()
    with pytest.raises(CacheError, match=r"array teacher/features chunk c/3/0/0 \(rows 48..63\) is missing"):
        open_cache(str(cache))
    assert "array teacher/features chunk c/3/0/0 (rows 48..63) is missing" in verify_cache(str(cache)).problems
    build(str(cache.with_name("d.zarr")))
    (cache.with_name("d.zarr") / "written/c/4").unlink()  # a complete cache must hold every flag
    with pytest.raises(CacheError, match="array written chunk c/4"):
        open_cache(str(cache.with_name("d.zarr")))


def test_deleted_array_is_not_complete(cache: Path) -> None:
    shutil.rmtree(cache / "clip/tiny/image_embeds")  # the consolidated metadata still lists it
    with pytest.raises(CacheError, match="lacks array clip/tiny/image_embeds"):
        open_cache(str(cache))
    report = verify_cache(str(cache))
    assert not report.ok and "lacks array clip/tiny/image_embeds" in report.problems[0]


def test_caches_without_checksums_still_read_and_say_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_writer, "COMPRESSORS", (cache_writer.COMPRESSOR,))  # how caches were written before
    url = tmp_path / "old.zarr"
    build(str(url))
    monkeypatch.undo()
    report = verify_cache(str(url))
    assert report.ok and report.checksums == NO_CHECKSUMS
    assert verify_cache(str(tmp_path / "old.zarr")).checksums.startswith("none")
    expected = all_arrays(str(url))
    chunk = url / "teacher/logits/c/1/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-5])  # without a checksum, truncation still fails to decode
    assert verify_cache(str(url)).problems[0].startswith("array teacher/logits chunk c/1/0/0 (rows 16..31) does not")
    assert np.array_equal(open_cache(str(url)).load("labels"), expected["labels"])


# ------------------------------------------------------------------ metadata and manifest


def test_a_corrupt_array_zarr_json_is_reported_and_a_rebuild_keeps_the_cache(cache: Path) -> None:
    (cache / "teacher/logits/zarr.json").write_text('{"zarr_format": 3, "node_type": "array"')
    problems = verify_cache(str(cache)).problems
    assert len(problems) == 1 and "metadata of array teacher/logits (teacher/logits/zarr.json) is damaged" in problems[0]
    with pytest.raises(CacheError, match="teacher/logits"):
        writer = create_cache(str(cache), LAYOUT, MANIFEST)  # the same build again
        writer.put_text_embeddings("multi", TEXT, {})
        writer.update_manifest(teacher={**MANIFEST["teacher"], "accuracy": 1.0})
    root = json.loads((cache / "zarr.json").read_text())
    assert "teacher/logits" in root["consolidated_metadata"]["metadata"]  # readers are unaffected
    assert open_cache(str(cache)).load("teacher/logits").shape == (100, 1, 10)


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: m["clip_models"]["tiny"].update(tau="100"),
     r"field clip_models.tiny.tau is a string, expected an integer or a number"),
    (lambda m: m["clip_models"]["tiny"].pop("tau"), r"field clip_models.tiny.tau is missing"),
    (lambda m: m.update(dataset="cifar100"), r"field dataset is a string, expected an object"),
    (lambda m: m.update(teacher=None), r"field teacher is null, expected an object"),
    (lambda m: m["dataset"].update(num_classes=True), r"field dataset.num_classes is a boolean"),
    (lambda m: m["clip_models"]["tiny"].update(tau=-1.0), r"clip_models.tiny.tau is -1.0, not a positive number"),
    (lambda m: m["clip_models"]["tiny"].update(status="half"), r"CLIP model tiny has unknown status 'half'"),
    # a manifest that contradicts itself
    (lambda m: m["dataset"].update(classes=["c0"]),
     r"contradicts itself \(dataset.classes 1, dataset.num_classes 10, layout.num_classes 10\)"),
    (lambda m: m["dataset"].update(classes=list(range(10))), r"dataset.classes holds an integer \(0\), not a class name"),
    (lambda m: m["layout"].update(num_views=True), r"invalid cache layout: num_views=True"),
    (lambda m: m["layout"].update(clip_views=True), r"invalid cache layout: clip_views=True"),
    (lambda m: m["dataset"].update(num_samples=99), r"dataset.num_samples 99, layout.num_samples 100"),
])
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_field(cache: Path, change, field: str) -> None:
    group = zarr.open_group(str(cache), mode="r+", use_consolidated=False)
    manifest = json.loads(json.dumps(group.attrs[MANIFEST_KEY]))
    change(manifest)
    group.attrs[MANIFEST_KEY] = manifest
    zarr.consolidate_metadata(str(cache))
    with pytest.raises(CacheError, match=field):
        open_cache(str(cache))
    assert len(verify_cache(str(cache)).problems) == 1
    result = cli("verify", cache)
    assert result.exit_code == 1 and re.search(field, result.output), result.output


# ------------------------------------------------------------------ kill windows


class Killed(Exception):
    """Stands for the process dying at this exact step."""


def test_killed_before_the_arrays_exist_resumes(tmp_path: Path, monkeypatch) -> None:
    url = str(tmp_path / "c.zarr")
    create_array = zarr.Group.create_array
    calls = []

    def dies_on_the_third(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise Killed
        return create_array(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_the_third)
    with pytest.raises(Killed):
        create_cache(url, LAYOUT, MANIFEST)
    monkeypatch.undo()
    assert os.path.exists(f"{url}/zarr.json")  # the group is there, two arrays are
    assert "re-run the same build command to resume" in verify_cache(url).problems[0]
    writer = create_cache(url, LAYOUT, MANIFEST)  # the same build again: resumed, not "a different cache"
    assert writer.pending_blocks() == list(range(LAYOUT.num_blocks))
    for b in writer.pending_blocks():
        writer.write_block(b, block_arrays(LAYOUT, b))
    writer.put_text_embeddings("multi", TEXT, {})
    writer.finalize()
    straight = str(tmp_path / "straight.zarr")
    build(straight)
    a, b = all_arrays(straight), all_arrays(url)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def test_killed_between_creating_and_writing_a_prompt_set_resumes(cache: Path, monkeypatch) -> None:
    setitem = zarr.Array.__setitem__

    def dies_writing_text(self, selection, value):
        if self.path.startswith("clip/tiny/text/"):
            raise Killed
        return setitem(self, selection, value)

    writer = open_for_write(str(cache))
    monkeypatch.setattr(zarr.Array, "__setitem__", dies_writing_text)
    with pytest.raises(Killed):
        writer.put_text_embeddings("single", np.full((1, 10, 4), 0.5, np.float32), {"templates": ["{}"]})
    monkeypatch.undo()
    reader = open_cache(str(cache))
    assert reader.prompt_sets() == ["multi"]  # created but unwritten: never a set of fill values
    assert not os.path.exists(cache / "clip/tiny/text/single/c")
    assert any("prompt set single was created but never written" in p for p in verify_cache(str(cache)).problems)
    open_for_write(str(cache)).put_text_embeddings("single", np.full((1, 10, 4), 0.5, np.float32), {"templates": ["{}"]})
    reader = open_cache(str(cache))
    assert reader.prompt_sets() == ["multi", "single"] and reader.text_embeddings("single").min() == 0.5
    assert reader.prompt_set_attrs("single")["templates"] == ["{}"]


# ------------------------------------------------------------------ what --overwrite may delete


def test_overwrite_never_deletes_what_is_not_provably_a_cache(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w", attributes={"project": "theirs"})
    zarr.create_array(str(foreign / "x"), shape=(4,), dtype="int8")
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.csv").write_text("a,b\n1,2\n")
    (data / "zarr.json").write_text('{"name": "my settings"}')
    for target in (foreign, data):
        before = sorted(p.relative_to(target) for p in target.rglob("*"))
        for overwrite in (False, True):
            with pytest.raises(CacheError, match="not a richkd-cache cache") as refused:
                create_cache(str(target), LAYOUT, MANIFEST, overwrite=overwrite)
            assert "--overwrite" not in str(refused.value)
        assert sorted(p.relative_to(target) for p in target.rglob("*")) == before


def test_overwrite_refuses_a_cache_holding_other_files_and_replaces_a_clean_one(cache: Path) -> None:
    (cache / "my-notes.txt").write_text("mine")
    other = {**MANIFEST, "build_key": {"teacher": "b"}}
    with pytest.raises(CacheError, match=r"not part of a richkd-cache cache \(my-notes.txt\); nothing was deleted"):
        create_cache(str(cache), LAYOUT, other, overwrite=True)
    assert open_cache(str(cache)).manifest["build_key"] == MANIFEST["build_key"]
    (cache / "my-notes.txt").unlink()
    (cache / "labels/c/0.0123456789abcdef0123456789abcdef.partial").write_bytes(b"killed write")
    writer = create_cache(str(cache), LAYOUT, other, overwrite=True)
    assert writer.pending_blocks() == list(range(LAYOUT.num_blocks))
    assert sorted(p.name for p in cache.iterdir()) == sorted([*TOP_LEVEL_NODES, "zarr.json"])
    assert not list((cache / "labels").rglob("*.partial"))


def open_cache_layouts():
    """The one CLIP model of MANIFEST, as a format-2 cache lays it out."""
    return clip_layouts({**MANIFEST, "format_version": 2})["tiny"]


def test_every_array_lies_under_a_node_overwrite_and_pack_know() -> None:
    layout = CacheLayout(**{**LAYOUT.__dict__, "teacher_topk": 3})
    clip = open_cache_layouts()
    for name in [*LAYOUT.arrays(), *layout.arrays(), *clip.arrays(LAYOUT), f"{clip.text_group}/multi"]:
        assert CACHE_KEY.fullmatch(f"{name}/zarr.json") and CACHE_KEY.fullmatch(f"{name}/c/0/0/0")


def test_a_build_whose_cache_is_replaced_stops_with_one_line(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    first = create_cache(url, LAYOUT, MANIFEST)
    first.write_block(0, block_arrays(LAYOUT, 0))
    other = CacheLayout(**{**LAYOUT.__dict__, "teacher_dim": 9})
    create_cache(url, other, {**MANIFEST, "build_key": {"teacher": "b"}}, overwrite=True)
    with pytest.raises(CacheError, match="was replaced or deleted by another process"):
        first.write_block(1, block_arrays(LAYOUT, 1))
    same_layout = create_cache(url, LAYOUT, {**MANIFEST, "build_key": {"teacher": "c"}}, overwrite=True)
    with pytest.raises(CacheError, match="was replaced or deleted"):  # its rows would land in the new cache
        first.write_block(2, block_arrays(LAYOUT, 2))
    for step in (lambda: first.update_manifest(status="complete"), first.finalize):
        with pytest.raises(CacheError, match="was replaced or deleted"):
            step()
    assert same_layout.pending_blocks() == list(range(LAYOUT.num_blocks))


# ------------------------------------------------------------------ pack


def test_pack_copies_only_the_cache_and_never_through_links(cache: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (cache / "secret.txt").symlink_to(secret)
    (cache / "stray.txt").write_text("not the cache's")
    (cache / "teacher/logits/c/0/0/0.0123456789abcdef0123456789abcdef.partial").write_bytes(b"killed write")
    packed = tmp_path / "c.zip"
    pack_cache(str(cache), str(packed))
    with zipfile.ZipFile(packed) as zf:
        names = zf.namelist()
    expected = sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                      if p.is_file() and not p.is_symlink() and CACHE_KEY.fullmatch(str(p.relative_to(cache))))
    assert sorted(names) == expected and "secret.txt" not in names and "stray.txt" not in names
    assert not any(n.endswith(".partial") for n in names)
    assert verify_cache(str(packed)).ok
    chunk = cache / "clip/tiny/features/c/1/0/0"
    chunk.rename(tmp_path / "chunk")
    chunk.symlink_to(tmp_path / "chunk")
    with pytest.raises(CacheError, match="clip/tiny/features/c/1/0/0 is a symbolic link"):
        pack_cache(str(cache), str(tmp_path / "linked.zip"))
    assert not (tmp_path / "linked.zip").exists()


def test_pack_refuses_to_replace_a_zip_unless_asked(cache: Path, tmp_path: Path) -> None:
    packed = tmp_path / "c.zip"
    packed.write_bytes(b"someone's zip")
    with pytest.raises(CacheError, match="already exists; pass --overwrite"):
        pack_cache(str(cache), str(packed))
    assert packed.read_bytes() == b"someone's zip"
    pack_cache(str(cache), str(packed), overwrite=True)
    assert np.array_equal(open_cache(str(packed)).load("labels"), open_cache(str(cache)).load("labels"))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


# ------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache of the 1442 training digits in blocks of 64 rows, written with random model outputs
    (the checks under test never look at the models, and this takes no forward pass)."""
    from richkd_cache.data import create_dataset, dataset_fingerprint

    data = create_dataset("digits", None, "train")
    n, c = len(data), data.num_classes
    layout = CacheLayout(num_samples=n, num_views=1, num_classes=c, teacher_dim=8, view_param_dim=1, block_rows=64)
    dataset = {"name": "digits", "split": data.split, "root": data.root, "num_samples": n, "num_classes": c,
               "classes": list(data.classes), "fingerprint": dataset_fingerprint(data)}
    url = tmp_path_factory.mktemp("built") / "digits.zarr"
    writer = create_cache(str(url), layout, {**MANIFEST, "dataset": dataset})
    rng = np.random.default_rng(0)
    for b in writer.pending_blocks():
        start, stop = layout.block_range(b)
        embeds = rng.normal(size=(stop - start, 1, 4))
        writer.write_block(b, {"labels": data.labels[start:stop].astype(np.int32),
                               "views/params": np.zeros((stop - start, 1, 1), np.uint8),
                               "teacher/logits": rng.normal(size=(stop - start, 1, c)),
                               "teacher/features": rng.normal(size=(stop - start, 1, 8)),
                               f"{CLIP}/image_embeds": embeds / np.linalg.norm(embeds, axis=-1, keepdims=True),
                               f"{CLIP}/features": rng.normal(size=(stop - start, 1, 6))})
    writer.put_text_embeddings("single", np.full((1, c, 4), 0.5, np.float32), {"templates": ["{}"]})
    writer.finalize()
    return url


def cli(*args: object):
    from clirun import invoke

    return invoke(*args)


def test_every_command_names_a_damaged_chunk_in_one_line_before_training(built: Path, tmp_path: Path) -> None:
    cache = tmp_path / "flipped.zarr"
    shutil.copytree(built, cache)
    flip_bit(cache / "teacher/logits/c/2/0/0")
    named = "array teacher/logits chunk c/2/0/0 (rows 128..191) fails its checksum"
    for command in (["info", cache], ["analyze", cache],
                    ["train", "--cache", cache, "--student", "resnet8", "--epochs", "1", "--device", "cpu",
                     "--workers", "0", "--quiet", "--out", tmp_path / "run"]):
        result = cli(*command)
        assert result.exit_code == 2 and named in result.output, result.output
        assert "Traceback" not in result.output and "epoch" not in result.output
    result = cli("verify", cache)
    assert result.exit_code == 1 and f"problem: {named}" in result.output
    assert "chunk checksums: crc32c on every chunk" in result.output


def test_info_and_train_refuse_a_cache_with_a_deleted_chunk(built: Path, tmp_path: Path) -> None:
    cache = tmp_path / "deleted.zarr"
    shutil.copytree(built, cache)
    (cache / "clip/tiny/image_embeds/c/1/0/0").unlink()
    for command in (["info", cache], ["train", "--cache", cache, "--student", "resnet8", "--epochs", "1",
                                      "--device", "cpu", "--quiet", "--out", tmp_path / "run"]):
        result = cli(*command)
        assert result.exit_code == 2 and "array clip/tiny/image_embeds chunk c/1/0/0 (rows 64..127) is missing" in result.output
        assert "complete" not in result.output and "nan" not in result.output.lower()


def test_pack_command_keeps_an_existing_zip_unless_told(built: Path, tmp_path: Path) -> None:
    packed = tmp_path / "digits.zip"
    packed.write_bytes(b"mine")
    result = cli("pack", built, packed)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert packed.read_bytes() == b"mine"
    assert cli("pack", built, packed, "--overwrite").exit_code == 0
    assert cli("verify", packed).exit_code == 0


def write_under_checksum(cache: Path, name: str, row: int, value: float) -> None:
    """Store `value` in one row of an array as the writer would: a new chunk with a valid crc32c."""
    array = zarr.open_array(str(cache / name), mode="r+")
    array[row, 0, 0] = value


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_info_export_and_train_refuse_a_nan_written_under_a_valid_checksum(built: Path, tmp_path: Path,
                                                                           value: float) -> None:
    cache = tmp_path / "nan.zarr"
    shutil.copytree(built, cache)
    write_under_checksum(cache, "teacher/logits", 130, value)
    named = "array teacher/logits holds non-finite values (NaN or Inf) in row(s) 130 (chunk c/2/0/0, rows 128..191)"
    export = tmp_path / "soft.parquet"
    for command in (["info", cache], ["export", cache, "--out", export],
                    ["train", "--cache", cache, "--student", "resnet8", "--epochs", "1", "--device", "cpu",
                     "--workers", "0", "--quiet", "--out", tmp_path / "run"]):
        result = cli(*command)
        assert result.exit_code == 2 and named in result.output, result.output
        assert "Traceback" not in result.output and "epoch" not in result.output and "complete" not in result.output
    assert not export.exists() and not (tmp_path / "run" / "last.pth").exists()
    result = cli("verify", cache)
    assert result.exit_code == 1 and "teacher/logits: non-finite values in sample(s) 130" in result.output


def test_a_nan_in_an_unwritten_block_is_the_fill_value_and_one_in_a_written_block_is_refused(tmp_path: Path) -> None:
    url = tmp_path / "c.zarr"
    build(str(url), blocks=[0, 1], finalize=False)  # blocks 2.. hold the NaN fill value: not damage
    reader = open_cache(str(url), require_complete=False)
    assert np.isnan(reader.load("teacher/features")[32:]).all()
    write_under_checksum(url, "clip/tiny/features", 20, np.nan)
    with pytest.raises(CacheError, match=r"array clip/tiny/features holds non-finite values .* row\(s\) 20 "):
        open_cache(str(url), require_complete=False).load("clip/tiny/features")
    zarr.open_array(str(url / "labels"), mode="r+")[3] = 10  # a class index no dataset of 10 classes has
    with pytest.raises(CacheError, match=r"array labels holds class indices out of range in row\(s\) 3 "):
        open_cache(str(url), require_complete=False).load("labels")


def test_a_byte_order_flipped_in_the_consolidated_metadata_is_refused(built: Path, tmp_path: Path) -> None:
    cache = tmp_path / "swapped.zarr"
    shutil.copytree(built, cache)
    root = json.loads((cache / "zarr.json").read_text())
    codecs = root["consolidated_metadata"]["metadata"]["teacher/logits"]["codecs"]
    next(c for c in codecs if c["name"] == "bytes")["configuration"]["endian"] = "big"  # '<f2' -> '>f2'
    (cache / "zarr.json").write_text(json.dumps(root))
    named = "array teacher/logits is float16 (big-endian) (1442, 1, 10), its manifest says float16"
    for command in (["info", cache], ["train", "--cache", cache, "--student", "resnet8", "--epochs", "1",
                                      "--device", "cpu", "--workers", "0", "--quiet", "--out", tmp_path / "run"]):
        result = cli(*command)
        assert result.exit_code == 2 and named in result.output, result.output
    result = cli("verify", cache)
    assert result.exit_code == 1 and named in result.output


def chunk_shape_zero(cache: Path) -> None:
    root = json.loads((cache / "zarr.json").read_text())
    root["consolidated_metadata"]["metadata"]["teacher/logits"]["chunk_grid"]["configuration"]["chunk_shape"] = [0, 1, 10]
    (cache / "zarr.json").write_text(json.dumps(root))


@pytest.mark.parametrize("damage, words", [
    (lambda c: (c / "zarr.json").write_text("[1, 2]"), ["is not a readable zarr group", "TypeError"]),
    (lambda c: (c / "zarr.json").write_text("[" * 100_000 + "]" * 100_000), ["is not a readable zarr group",
                                                                              "RecursionError"]),
    (chunk_shape_zero, ["array teacher/logits is stored in chunks of (0, 1, 10), its layout says (64, 1, 10)"]),
])
def test_a_root_zarr_json_of_the_wrong_shape_or_a_chunk_of_zero_rows_is_one_line(built: Path, tmp_path: Path,
                                                                                  damage, words) -> None:
    cache = tmp_path / "odd.zarr"
    shutil.copytree(built, cache)
    damage(cache)
    for command in (["info", cache], ["train", "--cache", cache, "--student", "resnet8", "--epochs", "1",
                                      "--device", "cpu", "--workers", "0", "--quiet", "--out", tmp_path / "run"]):
        result = cli(*command)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), result.output
    result = cli("verify", cache)
    assert result.exit_code == 1 and all(w in result.output for w in words), result.output


def test_verify_flags_zip_entries_outside_the_cache_and_stray_files(built: Path, tmp_path: Path) -> None:
    packed = tmp_path / "digits.zip"
    assert cli("pack", built, packed).exit_code == 0
    with zipfile.ZipFile(packed, "a") as zf:
        for name in ("../x", "/etc/y", "teacher/../../z", "notes.txt"):
            zf.writestr(name, b"not the cache's")
    result = cli("verify", packed)
    assert result.exit_code == 1, result.output
    assert "entries that point outside the cache (../x, /etc/y, teacher/../../z)" in result.output
    assert "files that are not part of the cache (notes.txt)" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
