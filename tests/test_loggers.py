"""`train --log tensorboard,wandb,csv`: per-epoch rows to every log, per-step loss terms and lr to TensorBoard
and W&B (offline, in the run folder), metrics.csv beside metrics.parquet; a resumed run doubles nothing."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipelines.run_folder
from clirun import invoke

FAST = ["--student", "resnet8", "--fraction", "0.25", "--batch-size", "128", "--device", "cpu", "--workers", "0",
        "--quiet"]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series as TensorBoard shows it, read with TensorBoard's own reader (which hides what a
    writer's purge step discards)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_history(run_file: Path) -> list[dict]:
    """The rows logged to an offline W&B run file: records in LevelDB's log format (32 KiB blocks of
    crc32c, length, type, payload) after a 7-byte header, each a wandb Record message."""
    records = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data, pos, payload, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = records.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_tensorboard_wandb_and_csv_hold_every_epoch_once_after_a_kill_and_resume(digits_cache: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    run = tmp_path / "run"
    command = ["train", "--cache", digits_cache, *FAST, "--epochs", "2", "--log", "tensorboard,wandb,csv",
               "--log-every", "2", "--out", run]
    real_save, saves = pipelines.run_folder.save_run, []

    def killed_while_saving_epoch_2(*args, **kwargs):  # epoch 2 is logged, then the process dies
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(pipelines.run_folder, "save_run", killed_while_saving_epoch_2)
    assert invoke(*command).exit_code == 2
    monkeypatch.setattr(pipelines.run_folder, "save_run", real_save)
    result = invoke(*command, "--resume")
    assert result.exit_code == 0, result.output

    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2]
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert [float(r["val_top1"]) for r in table] == pytest.approx([r["val_top1"] for r in rows])

    scalars = tensorboard_scalars(run / "tensorboard")
    steps_per_epoch = rows[0]["step"]
    assert rows[1]["step"] == 2 * steps_per_epoch
    assert scalars["epoch/epoch"] == [(steps_per_epoch, 1.0), (2 * steps_per_epoch, 2.0)]  # epoch 2 once
    assert [v for _, v in scalars["epoch/val_top1"]] == pytest.approx([r["val_top1"] for r in rows])
    assert steps_per_epoch == 3  # 1442 // 4 samples in batches of 128
    for term in ("loss", "ce", "logit", "feat", "lr"):  # every second step and each epoch's last, once, in order
        assert [s for s, _ in scalars[f"step/{term}"]] == [2, 3, 4, 6], term
    assert [v for _, v in scalars["step/lr"]] == pytest.approx([0.05] * 4)

    runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({p.name for p in runs}) == 1  # the resumed run continues the same W&B run
    epochs = [row for path in runs for row in wandb_history(path) if "epoch/epoch" in row]
    assert epochs[-1]["epoch/val_top1"] == pytest.approx(rows[1]["val_top1"])
    steps = [row["_step"] for row in wandb_history(runs[-1])]
    assert steps == sorted(steps) and min(steps) > steps_per_epoch  # it went on after the last saved epoch


def test_metrics_csv_is_written_without_log(digits_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke("train", "--cache", digits_cache, *FAST, "--epochs", "1", "--out", run).exit_code == 0
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


@pytest.mark.parametrize("log, message", [
    ("tensorboard", "--log tensorboard needs the tensorboard package: pip install 'richkd-cache[tensorboard]'"),
    ("csv,wandb", "--log wandb needs the wandb package: pip install 'richkd-cache[wandb]'"),
    ("mlflow", "--log takes tensorboard, wandb, csv"),
])
def test_a_logger_not_installed_or_unknown_is_one_line(tmp_path: Path, monkeypatch, log: str, message: str) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    result = invoke("train", "--dataset", "digits", *FAST, "--log", log, "--out", tmp_path / "r")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
