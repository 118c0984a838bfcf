"""A stage one you can watch: plan line, progress by images with rate and ETA, plain log lines off a
terminal, a resumed build that says so and what differs."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from clirun import invoke
from pipelines.progress import LOG_EVERY_S, Reporter

BUILD = ["build", "--dataset", "digits", "--clip", "richkd-tiny", "--clip-pretrained", "random",
         "--teacher-views", "clean", "--device", "cpu", "--workers", "0", "--block-rows", "512", "--batch-size", "64"]
PROGRESS = re.compile(r"^build: ([\d,]+)/1,442 img \((\d+) %\), ([\d,]+|-) img/s, ETA (\d+:\d\d:\d\d|-)")


def test_a_build_logging_to_a_file_plans_then_logs_progress_lines_as_it_goes(tmp_path: Path, teacher: Path) -> None:
    out, log = tmp_path / "digits.zarr", tmp_path / "build.log"
    with open(log, "w") as stderr:  # a batch job's stderr: a file, not a terminal
        subprocess.run([sys.executable, "-m", "pipelines.cli", *BUILD, "--prompts", "single,multi",
                        "--teacher-checkpoint", str(teacher), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL, stderr=stderr)
    lines = log.read_text().splitlines()
    assert "\x1b" not in log.read_text(), "no terminal control codes in a log file"

    plan = next(i for i, line in enumerate(lines) if line.startswith("plan:"))
    assert re.search(r"plan: 1,442 samples x 1 view = 1,442 teacher rows; 1,442 CLIP rows \(richkd-tiny\); "
                     r"190 text prompts \(single, multi\); [\d.]+ KiB on disk at most", lines[plan])
    loading = [i for i, line in enumerate(lines) if line.startswith("loading ") and ": done in " in line]
    assert len(loading) == 2 and max(loading) < plan, "teacher and CLIP loading are reported before the plan"
    text = [i for i, line in enumerate(lines) if line.startswith("text multi (richkd-tiny): 180/180 prompt")]
    assert text and text[0] > plan

    progress = [(i, PROGRESS.match(line)) for i, line in enumerate(lines) if PROGRESS.match(line)]
    done = [int(m.group(1).replace(",", "")) for _, m in progress]
    assert progress[0][0] > text[0] and done[0] == 0 and done[-1] == 1442
    # by images, batch by batch: at least one line per tenth of the 1,442 images, though a block holds 512
    assert len([d for d in done if 0 < d < 1442]) >= 9 and done == sorted(done)
    assert any(d % 512 for d in done[1:-1]), "the count advances by batches, not by write blocks"
    assert all(m.group(3) != "-" and m.group(4) != "-" for _, m in progress[1:]), "each line has a rate and an ETA"
    assert lines[progress[-1][0]].endswith("3/3 blocks written")
    assert any(line.startswith("estimate: build takes about ") for line in lines)


def test_a_resumed_build_says_so_and_what_differs(tmp_path: Path, teacher: Path) -> None:
    out = tmp_path / "digits.zarr"
    first = invoke(*BUILD, "--prompts", "single", "--quiet", "--teacher-checkpoint", teacher, "--out", out)
    assert first.exit_code == 0, first.output
    result = invoke(*BUILD, "--prompts", "single,multi", "--teacher-checkpoint", teacher, "--out", out)
    assert result.exit_code == 0, result.output
    assert (f"{out} is complete: no image is computed again; --prompts single,multi adds multi "
            "(the cache records single)") in result.stderr
    assert "1,442 (0 left to compute) teacher rows" in result.stderr

    # a build stopped after two of its three blocks: what is left, and the same settings
    from cache_store import open_cache
    from pipelines.build import resume_line, resolve_prompt_set
    from pipelines.config import BuildConfig
    from richkd_cache.data import create_dataset

    cfg = BuildConfig(dataset="digits", data_root=None, split="train", teacher=None, teacher_checkpoint=str(teacher),
                      clip="richkd-tiny", clip_pretrained="random", clip_checkpoint=None, prompts=("single", "multi"),
                      out=str(out))
    classes = create_dataset("digits", None, "train").classes
    prompt_sets = [resolve_prompt_set(p, "digits", classes) for p in cfg.prompts]
    stopped = {2: ["written", "clip/richkd-tiny/written"]}  # the last block lacks the teacher's and CLIP's rows
    line = resume_line(cfg, open_cache(str(out)), ["richkd-tiny"], prompt_sets, stopped)
    assert line == f"resuming the build of {out}: 2 of 3 write blocks done; same settings as the cache records"


def test_plain_lines_come_every_tenth_and_every_30_s_of_a_slow_task() -> None:
    now = [0.0]
    stream = io.StringIO()
    reporter = Reporter(Console(file=stream, width=200), clock=lambda: now[0])
    with reporter.task("build", total=1000) as advance:
        for _ in range(40):  # 40 batches of 25 images; every 4th comes 31 s after the one before
            now[0] += LOG_EVERY_S + 1 if _ % 4 == 0 else 0.1
            advance(25)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "build: 0/1,000 img (0 %), - img/s, ETA -"
    counts = [int(line.split("/")[0].split()[-1].replace(",", "")) for line in lines]
    assert all(c in counts for c in range(100, 1001, 100)), "a line at every tenth"
    assert any(c % 100 for c in counts), "and one when 30 s passed between tenths"
    assert lines[-1].startswith("build: 1,000/1,000 img (100 %)") and counts.count(1000) == 1


def test_train_reports_validation_by_images_off_a_terminal(digits_cache: Path, tmp_path: Path) -> None:
    """Each epoch's validation pass logs its progress like training's (done/total images, rate, ETA)."""
    from clirun import invoke

    result = invoke("train", "--cache", digits_cache, "--student", "resnet8", "--epochs", "1", "--device", "cpu",
                    "--workers", "0", "--feature-loss", "none", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("validation: ")]
    assert lines and lines[-1].startswith("validation: 355/355 img (100 %)"), result.output
    assert all("img/s" in line and "ETA" in line for line in lines[1:])
