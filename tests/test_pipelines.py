"""Stage one and two guarantees through the real CLI: kill and resume, refusals, packed, read-only, S3."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_store import open_cache
from richkd_cache.models import create_model, save_checkpoint
from clirun import invoke

CLI = [sys.executable, "-m", "pipelines.cli"]
BUILD = ["build", "--dataset", "digits", "--clip", "richkd-tiny", "--clip-pretrained", "random",
         "--prompts", "single", "--teacher-views", "clean", "--device", "cpu", "--workers", "0", "--quiet"]
ARRAYS = ["labels", "views/params", "teacher/logits", "teacher/features", "clip/richkd-tiny/image_embeds",
          "clip/richkd-tiny/features"]


@pytest.fixture(scope="module")
def slow_teacher(tmp_path_factory) -> Path:
    """An untrained resnet32x4: slow enough on CPU to kill a build half way."""
    path = tmp_path_factory.mktemp("teacher") / "resnet32x4.pth"
    save_checkpoint(str(path), create_model("resnet32x4", 10), arch="resnet32x4", num_classes=10)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("cache") / "digits.zarr"
    result = invoke(*BUILD, "--teacher-checkpoint", teacher, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return {name: group[name][...] for name in ARRAYS}


def test_killed_build_is_refused_then_resumes_bit_identical(tmp_path: Path, slow_teacher: Path) -> None:
    out = tmp_path / "killed.zarr"
    # the 355 validation digits in 23 blocks of 16 rows
    base = CLI + BUILD + ["--split", "val", "--teacher-checkpoint", str(slow_teacher), "--block-rows", "16",
                          "--batch-size", "16", "--out"]
    command = base + [str(out)]
    straight = tmp_path / "straight.zarr"
    subprocess.run(base + [str(straight)], check=True, capture_output=True)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = out / "written" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and (not flags.exists() or len(list(flags.iterdir())) < 3):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(flags.iterdir()))
    assert 3 <= written < 23, "the build should have been killed half way"

    result = invoke("verify", out)
    assert result.exit_code == 1 and "incomplete" in result.output
    result = invoke("train", "--cache", out, "--student", "resnet8", "--epochs", "1", "--device", "cpu",
                    "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "incomplete" in result.output and "re-run" in result.output

    subprocess.run(command, check=True, capture_output=True)  # the same command resumes
    resumed, expected = arrays(str(out)), arrays(str(straight))
    assert all(np.array_equal(resumed[k], expected[k]) for k in ARRAYS)
    assert open_cache(str(out)).manifest["status"] == "complete"


def test_cache_from_other_data_is_refused_naming_the_difference(tmp_path: Path, cache: Path) -> None:
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 4).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    result = invoke("train", "--cache", cache, "--dataset", "cifar10", "--data-root", tmp_path, "--student",
                    "resnet8", "--epochs", "1", "--device", "cpu", "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "other data" in result.output and "class names" in result.output and "sample count" in result.output


def test_unknown_prompt_set_lists_the_stored_ones(tmp_path: Path, cache: Path) -> None:
    result = invoke("train", "--cache", cache, "--student", "resnet8", "--prompts", "complex", "--epochs", "1",
                    "--device", "cpu", "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "stored: single" in result.output


def test_packed_and_untouched_caches_train(tmp_path: Path, cache: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    packed = tmp_path / "digits.zip"
    assert invoke("pack", cache, packed).exit_code == 0
    for source in (cache, packed):
        result = invoke("train", "--cache", source, "--student", "resnet8", "--epochs", "1", "--device", "cpu",
                        "--workers", "0", "--quiet", "--out", tmp_path / f"run-{source.suffix}")
        assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before  # training never writes a cache


def test_info_reports_sizes_and_accuracy_per_prompt_set(cache: Path) -> None:
    result = invoke("info", cache)
    assert result.exit_code == 0
    assert "bytes per sample-view" in result.output and "CLIP zero-shot" in result.output
    assert "single" in result.output
    assert "activation quickgelu (decided by architecture richkd-tiny)" in result.output


def test_a_clip_file_without_its_activation_is_refused(tmp_path: Path, teacher: Path) -> None:
    args = [a for a in BUILD if a not in ("--clip-pretrained", "random")]
    args[args.index("richkd-tiny")] = "ViT-B-32"
    result = invoke(*args, "--clip-checkpoint", tmp_path / "w.pt", "--teacher-checkpoint", teacher,
                    "--out", tmp_path / "c.zarr")
    assert result.exit_code == 2 and "--clip-activation quickgelu" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_prompt_set_added_later_equals_one_built_with_the_cache(tmp_path: Path, teacher: Path, cache: Path) -> None:
    both = tmp_path / "both.zarr"
    assert invoke(*[a if a != "single" else "single,multi" for a in BUILD], "--teacher-checkpoint", teacher,
                  "--out", both).exit_code == 0
    later = tmp_path / "later.zarr"
    assert invoke(*BUILD, "--teacher-checkpoint", teacher, "--out", later).exit_code == 0
    result = invoke("prompts", "add", later, "--file", "multi")
    assert result.exit_code == 0, result.output
    assert np.array_equal(open_cache(str(later)).text_embeddings("multi"), open_cache(str(both)).text_embeddings("multi"))
    assert "multi" in open_cache(str(later)).clip_records["richkd-tiny"]["zero_shot_accuracy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_into_and_train_from_an_s3_bucket(tmp_path: Path, teacher: Path) -> None:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
        import s3fs

        s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint).mkdir("caches")
        url = "s3://caches/digits.zarr"
        subprocess.run(CLI + BUILD + ["--teacher-checkpoint", str(teacher), "--out", url], check=True, env=env,
                       capture_output=True)
        for source in (url, f"simplecache::{url}"):
            done = subprocess.run(CLI + ["train", "--cache", source, "--student", "resnet8", "--epochs", "1",
                                         "--device", "cpu", "--workers", "0", "--quiet",
                                         "--out", str(tmp_path / source.split(":")[0])],
                                  env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
    finally:
        server.stop()


def test_two_rank_build_equals_a_single_process_build(tmp_path: Path, teacher: Path, cache: Path) -> None:
    """torchrun with the gloo backend: contiguous block ranges per rank, rank 0 finalises."""
    out = tmp_path / "ranks.zarr"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "pipelines.cli", *BUILD, "--teacher-checkpoint", str(teacher),
               "--block-rows", "128", "--batch-size", "64", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "single.zarr"
    assert invoke(*BUILD, "--teacher-checkpoint", teacher, "--block-rows", "128", "--batch-size", "64",
                  "--out", single).exit_code == 0
    a, b = arrays(str(out)), arrays(str(single))
    assert all(np.array_equal(a[k], b[k]) for k in ARRAYS)
    assert open_cache(str(out)).manifest["status"] == "complete"


def test_two_rank_training_runs_an_epoch_and_resumes(tmp_path: Path, cache: Path) -> None:
    """torchrun + gloo: DistributedDataParallel over two CPU processes, rank 0 writes the run."""
    out = tmp_path / "ddp"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pipelines.cli", "train",
            "--cache", str(cache), "--student", "resnet8", "--device", "cpu", "--workers", "0", "--quiet",
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        done = subprocess.run(base[:5] + ["--master-port", str(_free_port())] + base[5:] + extra,
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    import pyarrow.parquet as pq

    assert [row["epoch"] for row in pq.read_table(out / "metrics.parquet").to_pylist()] == [1, 2]


def test_verify_recomputes_rows_with_the_recorded_models(cache: Path, teacher: Path, tmp_path: Path) -> None:
    result = invoke("verify", cache, "--recompute", "5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "recomputed 5 rows" in result.output and "ok" in result.output
    other = tmp_path / "other.pth"
    save_checkpoint(str(other), create_model("resnet8", 10), arch="resnet8", num_classes=10, epoch=7)
    result = invoke("verify", cache, "--recompute", "5", "--device", "cpu", "--teacher-checkpoint", other)
    assert result.exit_code == 2 and "not the file the cache was built with" in result.output
