"""The cache format's guarantees, with numpy data only (cache_store needs no torch)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
from dataclasses import asdict
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from cache_store import (
    CacheError,
    CacheLayout,
    choose_block_rows,
    create_cache,
    open_cache,
    open_for_write,
    pack_cache,
    verify_cache,
)
from cache_store.schema import MANIFEST_KEY

LAYOUT = CacheLayout(num_samples=100, num_views=1, num_classes=10, teacher_dim=8, view_param_dim=1, block_rows=16)
MANIFEST = {"dataset": {"name": "synthetic", "split": "train", "num_samples": 100, "num_classes": 10,
                        "classes": [f"c{i}" for i in range(10)], "fingerprint": "f" * 64},
            "teacher": {"arch": "resnet8", "checkpoint_sha256": "a" * 64},
            "clip_models": {"tiny": {"arch": "tiny", "requested": "tiny", "tau": 100.0, "embed_dim": 4, "feature_dim": 6}},
            "build_key": {"teacher": "a"}}
CLIP = "clip/tiny"  # the one CLIP model's arrays


def block_arrays(layout: CacheLayout, block: int) -> dict[str, np.ndarray]:
    """Deterministic rows for a block: a function of the sample index only."""
    start, stop = layout.block_range(block)
    idx = np.arange(start, stop)

    def rows(width: int, salt: int) -> np.ndarray:
        base = (idx[:, None] * 31 + np.arange(width)[None] * 7 + salt) % 97
        return (base / 97.0).astype(np.float32)[:, None, :]

    return {"labels": (idx % layout.num_classes).astype(np.int32),
            "views/params": np.zeros((len(idx), 1, 1), np.uint8),  # the clean view's record
            "teacher/logits": rows(layout.num_classes, 1), "teacher/features": rows(layout.teacher_dim, 2),
            f"{CLIP}/image_embeds": rows(4, 3), f"{CLIP}/features": rows(6, 4)}


def build(url: str, blocks=None, finalize: bool = True) -> None:
    writer = create_cache(url, LAYOUT, MANIFEST)
    for b in blocks if blocks is not None else writer.pending_blocks():
        writer.write_block(b, block_arrays(LAYOUT, b))
    writer.put_text_embeddings("multi", np.ones((3, 10, 4), np.float32) / 2, {"templates": ["a {}"] * 3})
    if finalize:
        writer.finalize()


def all_arrays(url: str) -> dict[str, np.ndarray]:
    reader = open_cache(url, require_complete=False)
    return {name: reader.load(name) for name in reader.arrays()}


def test_round_trip_out_of_order_and_plain_zarr(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url, blocks=[6, 0, 3, 1, 5, 2, 4])
    reader = open_cache(url)
    expected = np.concatenate([block_arrays(LAYOUT, b)["teacher/logits"] for b in range(LAYOUT.num_blocks)])
    assert np.array_equal(reader.load("teacher/logits"), expected.astype(np.float16))
    assert reader.load("teacher/logits").dtype == np.float16 and reader.prompt_sets() == ["multi"]
    group = zarr.open_group(url, mode="r")  # anyone can read it
    assert group["labels"][:10].tolist() == list(range(10))
    assert group.attrs[MANIFEST_KEY]["status"] == "complete"


def test_chunks_are_whole_blocks_and_flags_are_separate(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    group = zarr.open_group(url, mode="r")
    assert group["teacher/logits"].chunks == (16, 1, 10) and group["written"].chunks == (1,)
    assert np.isnan(zarr.open_group(url, mode="r")["teacher/logits"].fill_value)


def test_resume_skips_written_blocks_and_ends_identical(tmp_path: Path) -> None:
    straight, resumed = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    build(straight)
    build(resumed, blocks=[0, 2, 5], finalize=False)  # then the process dies
    writer = create_cache(resumed, LAYOUT, MANIFEST)  # the same build again
    assert writer.pending_blocks() == [1, 3, 4, 6]
    for b in writer.pending_blocks():
        writer.write_block(b, block_arrays(LAYOUT, b))
    writer.finalize()
    a, b = all_arrays(straight), all_arrays(resumed)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def test_another_build_into_the_same_place_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    other = {**MANIFEST, "build_key": {"teacher": "b"}}
    with pytest.raises(CacheError, match=r"differs in: build_key.teacher.*--overwrite"):
        create_cache(url, LAYOUT, other)
    writer = create_cache(url, LAYOUT, other, overwrite=True)
    assert writer.pending_blocks() == list(range(LAYOUT.num_blocks))


def test_incomplete_cache_is_refused_and_reported(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url, blocks=[0, 1], finalize=False)
    with pytest.raises(CacheError, match=r"incomplete \(status building, 2 of 7 blocks written\).*resume"):
        open_cache(url)
    report = verify_cache(url)
    assert not report.ok and report.blocks_written == 2 and "incomplete" in report.problems[0]
    with pytest.raises(CacheError, match="missing 5 of 7 blocks"):
        open_for_write(url).finalize()


def test_unknown_version_and_broken_arrays_are_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    manifest = dict(group.attrs[MANIFEST_KEY])
    group.attrs[MANIFEST_KEY] = {**manifest, "format_version": 2}
    zarr.consolidate_metadata(url)
    with pytest.raises(CacheError, match="cache format 2 was written by an earlier richkd-cache.*rebuild it"):
        open_cache(url)  # its views are float32 fractions of a centre crop, not the records this version replays
    group.attrs[MANIFEST_KEY] = {**manifest, "format_version": 4}
    zarr.consolidate_metadata(url)
    with pytest.raises(CacheError, match="cache format 4 is newer than this richkd-cache understands"):
        open_cache(url)
    with pytest.raises(CacheError, match="upgrade richkd-cache"):
        open_for_write(url)  # an older writer must not touch a newer format
    with pytest.raises(CacheError, match="differs in: format_version"):
        create_cache(url, LAYOUT, MANIFEST)
    group.attrs[MANIFEST_KEY] = manifest
    del group[f"{CLIP}/features"]
    zarr.consolidate_metadata(url)
    with pytest.raises(CacheError, match=f"lacks array {CLIP}/features"):
        open_cache(url)


def test_non_finite_outputs_name_the_samples_and_flag_nothing(tmp_path: Path) -> None:
    writer = create_cache(str(tmp_path / "c.zarr"), LAYOUT, MANIFEST)
    arrays = block_arrays(LAYOUT, 2)
    arrays[f"{CLIP}/features"][3, 0, 1] = np.nan
    arrays[f"{CLIP}/features"][5, 0, 0] = np.inf
    with pytest.raises(CacheError, match=r"sample\(s\) 35, 37"):
        writer.write_block(2, arrays)
    assert writer.pending_blocks() == list(range(LAYOUT.num_blocks))


def _write_blocks(url: str, blocks: list[int]) -> None:
    writer = open_for_write(url)
    for b in blocks:
        writer.write_block(b, block_arrays(LAYOUT, b))


def test_two_processes_writing_one_cache_lose_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    create_cache(url, LAYOUT, MANIFEST)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_blocks, args=(url, blocks)) for blocks in ([0, 2, 4, 6], [1, 3, 5])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    writer = open_for_write(url)
    writer.put_text_embeddings("multi", np.ones((1, 10, 4), np.float32), {})
    writer.finalize()
    straight = str(tmp_path / "straight.zarr")
    build(straight)
    a, b = all_arrays(straight), all_arrays(url)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def test_reading_writes_nothing_and_zip_packs_read_the_same(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    before = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")}
    arrays = all_arrays(url)
    verify_cache(url)
    assert {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")} == before
    packed = str(tmp_path / "c.zip")
    pack_cache(url, packed)
    reader = open_cache(packed)
    assert all(np.array_equal(arrays[k], reader.load(k), equal_nan=True) for k in arrays)
    assert reader.text_embeddings("multi").shape == (3, 10, 4)
    with pytest.raises(CacheError, match="incomplete"):
        incomplete = str(tmp_path / "i.zarr")
        build(incomplete, blocks=[0], finalize=False)
        pack_cache(incomplete, str(tmp_path / "i.zip"))
    assert not os.path.exists(tmp_path / "i.zip")


def test_prompt_sets_put_list_and_refuse_unknown(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    writer = open_for_write(url)
    writer.put_text_embeddings("single", np.full((1, 10, 4), 0.5, np.float32), {"templates": ["a photo of a {}."]})
    with pytest.raises(CacheError, match="already exists"):
        writer.put_text_embeddings("single", np.zeros((1, 10, 4), np.float32), {})
    with pytest.raises(CacheError, match=r"\[M, 10, 4\]"):
        writer.put_text_embeddings("bad", np.zeros((1, 9, 4), np.float32), {})
    writer.finalize()
    reader = open_cache(url)
    assert reader.prompt_sets() == ["multi", "single"]
    assert reader.prompt_set_attrs("single")["templates"] == ["a photo of a {}."]
    with pytest.raises(CacheError, match="stored: multi, single"):
        reader.text_embeddings("complex")


def test_verify_finds_corrupt_values(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    assert verify_cache(url).ok
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    rows = group["teacher/features"][16:32]
    rows[4, 0, 0] = np.nan
    group["teacher/features"][16:32] = rows
    report = verify_cache(url)
    assert not report.ok and "teacher/features: non-finite values in sample(s) 20" in report.problems


def test_the_documented_zarr_only_snippet_runs(tmp_path: Path, capsys) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    doc = (Path(__file__).parents[1] / "docs" / "cache-format.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    snippet = re.sub(r'^CACHE = ".*"$', f"CACHE = {url!r}", snippet, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(snippet, "cache-format.md", "exec"), namespace)
    embeds = open_cache(url).load(f"{CLIP}/image_embeds")[:, 0].astype(np.float32)
    expected = 100.0 * embeds @ np.full((10, 4), 0.5, np.float32).T
    assert np.allclose(namespace["clip_logits"], expected, atol=1e-5)
    assert "fused top-1" in capsys.readouterr().out


def test_fsspec_urls_build_read_verify_and_pack(tmp_path: Path) -> None:
    local = str(tmp_path / "c.zarr")
    build(local)
    expected = all_arrays(local)
    for url in ("memory://bucket/c.zarr", f"file://{tmp_path}/f.zarr"):
        build(url)
        assert verify_cache(url).ok
        loaded = all_arrays(url)
        assert all(np.array_equal(expected[k], loaded[k], equal_nan=True) for k in expected)
    cached = open_cache("simplecache::memory://bucket/c.zarr")
    assert np.array_equal(cached.load("labels"), expected["labels"])
    packed = str(tmp_path / "m.zip")
    pack_cache("memory://bucket/c.zarr", packed)
    fsspec.filesystem("memory").pipe("/bucket/m.zip", Path(packed).read_bytes())
    remote_zip = open_cache("memory://bucket/m.zip")  # a packed cache on an object store
    assert np.array_equal(remote_zip.load(f"{CLIP}/features"), expected[f"{CLIP}/features"])


def test_files_that_are_not_a_cache_are_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(CacheError, match="not a richkd-cache cache") as refused:
            create_cache(str(target), LAYOUT, MANIFEST, overwrite=overwrite)
        assert "--overwrite" not in str(refused.value)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    damaged = tmp_path / "damaged.zarr"
    damaged.mkdir()
    (damaged / "zarr.json").write_text("{not json")
    for overwrite in (False, True):  # a damaged zarr.json is not provably a cache: never deleted
        with pytest.raises(CacheError, match="not JSON.*not a richkd-cache cache") as refused:
            create_cache(str(damaged), LAYOUT, MANIFEST, overwrite=overwrite)
        assert "--overwrite" not in str(refused.value)
    assert (damaged / "zarr.json").read_text() == "{not json"
    with pytest.raises(CacheError, match="not a readable zarr group"):
        open_cache(str(damaged))
    (tmp_path / "empty").mkdir()
    assert create_cache(str(tmp_path / "empty"), LAYOUT, MANIFEST).num_blocks == 7


def test_top_k_teacher_layout_round_trips_and_checks_indices(tmp_path: Path) -> None:
    layout = CacheLayout(**{**asdict(LAYOUT), "teacher_topk": 3})
    assert "teacher/logits" not in layout.arrays() and layout.arrays()["teacher/topk_indices"].dtype == "int16"
    writer = create_cache(str(tmp_path / "k.zarr"), layout, MANIFEST)
    arrays = {k: v for k, v in block_arrays(layout, 0).items() if k != "teacher/logits"}
    values = np.tile(np.array([3.0, 2.0, 1.0], np.float32), (16, 1, 1))
    indices = np.tile(np.array([9, 0, 4], np.int64), (16, 1, 1))  # int64 from argsort/topk is fine
    indices[7, 0, 2] = 10
    with pytest.raises(CacheError, match=r"teacher/topk_indices outside 0..9 for sample\(s\) 7"):
        writer.write_block(0, {**arrays, "teacher/topk_values": values, "teacher/topk_indices": indices})
    indices[7, 0, 2] = 4
    writer.write_block(0, {**arrays, "teacher/topk_values": values, "teacher/topk_indices": indices})
    reader = open_cache(writer.url, require_complete=False)
    assert reader.load("teacher/topk_indices")[:16].tolist() == indices.astype(np.int32).tolist()
    assert reader.load("teacher/topk_values").dtype == np.float16


def test_write_block_refuses_wrong_blocks_dtypes_and_overflow(tmp_path: Path) -> None:
    writer = create_cache(str(tmp_path / "c.zarr"), LAYOUT, MANIFEST)
    arrays = block_arrays(LAYOUT, 6)
    assert arrays["labels"].shape == (4,)  # the last block is short: 100 = 6 * 16 + 4
    with pytest.raises(CacheError, match="block 7 does not exist"):
        writer.write_block(7, arrays)
    with pytest.raises(CacheError, match="labels must be int32"):
        writer.write_block(6, {**arrays, "labels": arrays["labels"].astype(np.float32)})
    with pytest.raises(CacheError, match="float16's range"):
        writer.write_block(6, {**arrays, f"{CLIP}/features": arrays[f"{CLIP}/features"] * 1e6})
    with pytest.raises(CacheError, match=r"need shape \(4, 1, 10\)"):
        writer.write_block(6, {**arrays, "teacher/logits": arrays["teacher/logits"][:3]})
    with pytest.raises(CacheError, match="expected arrays"):
        writer.write_block(6, {k: v for k, v in arrays.items() if k != "labels"})
    assert writer.pending_blocks() == list(range(7))
    writer.write_block(6, arrays)
    assert writer.pending_blocks([6, 5]) == [5]


def test_stored_array_of_the_wrong_dtype_is_named(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    del group["teacher/features"]
    group.create_array("teacher/features", shape=(100, 1, 8), dtype="float32", fill_value=np.nan)
    zarr.consolidate_metadata(url)
    with pytest.raises(CacheError, match=r"teacher/features is float32 \(100, 1, 8\), its manifest says float16"):
        open_cache(url)
    assert "teacher/features" in verify_cache(url).problems[0]


def test_damaged_manifest_layout_is_a_cache_error(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    manifest = dict(group.attrs[MANIFEST_KEY])
    group.attrs[MANIFEST_KEY] = {**manifest, "layout": {**manifest["layout"], "num_crops": 2}}
    with pytest.raises(CacheError, match="layout has keys"):
        open_cache(url)
    group.attrs[MANIFEST_KEY] = {**manifest, "layout": {**manifest["layout"], "block_rows": 0}}
    with pytest.raises(CacheError, match="block_rows=0"):
        open_cache(url)
    with pytest.raises(CacheError, match=r"teacher_topk=11"):
        CacheLayout(**{**asdict(LAYOUT), "teacher_topk": 11})


def test_changes_after_completion_stay_consolidated(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    writer = create_cache(url, LAYOUT, MANIFEST)  # the same build again: nothing left to do
    assert writer.pending_blocks() == []
    writer.put_text_embeddings("single", np.full((1, 10, 4), 0.25, np.float32), {"templates": ["{}"]})
    writer.update_manifest(teacher={**MANIFEST["teacher"], "accuracy": 91.5})
    root = json.loads((Path(url) / "zarr.json").read_text())
    assert f"{CLIP}/text/single" in root["consolidated_metadata"]["metadata"]
    reader = open_cache(url)
    assert reader.manifest["teacher"]["accuracy"] == 91.5 and reader.manifest["status"] == "complete"
    assert reader.prompt_sets() == ["multi", "single"]
    assert set(reader.manifest["versions"]) >= {"zarr", "numpy", "numcodecs"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod a-w; reading-writes-nothing covers root")
def test_read_only_directory_opens_and_verifies(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    build(url)
    expected = all_arrays(url)
    for path in [*Path(url).rglob("*"), Path(url)]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        loaded = all_arrays(url)
        assert verify_cache(url).ok
    finally:
        for path in [Path(url), *Path(url).rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert all(np.array_equal(expected[k], loaded[k], equal_nan=True) for k in expected)


def test_block_rows_give_chunks_of_a_few_megabytes() -> None:
    for bytes_per_row in (2 * (100 + 256 + 768 + 1024), 2 * (1000 + 2048 + 768 + 1024), 40, 10**6):
        rows = choose_block_rows(bytes_per_row)
        assert rows % 64 == 0 and rows >= 64
        assert 1 << 20 <= rows * bytes_per_row <= 8 << 20 or rows == 64
