"""The run folder: what `train --out` holds and how a run continues after a crash.

last.pth and best.pth in mdistiller's layout (plus our metadata), resume.pth with everything else a
resumed run needs, metrics.parquet and metrics.csv (one row per epoch), config.json and summary.json, and
with --log the TensorBoard and W&B folders (pipelines/loggers.py). Every file is written whole or not at
all; resume.pth is untrusted input when read back, so it is loaded as plain data only (tensors, numbers,
strings, lists and dicts).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

from pipelines.config import TrainConfig
from pipelines.loggers import LOG_DIRS, LoggingReporter, RunLog
from pipelines.progress import Reporter
from richkd_cache.errors import ConfigError
from richkd_cache.files import atomic_path
from richkd_cache.models import save_checkpoint
from richkd_cache.models.checkpoint import atomic_torch_save, holds_code, load_plain_data

# Settings that do not change what a run computes; everything else must match to resume.
_NOT_IDENTITY = ("resume", "overwrite", "quiet", "log", "log_every", "epochs", "workers", "device", "cache_device",
                 "out", "data_root",  # where the data is on this machine: a cache checks it is the same data
                 "teacher_checkpoint", "clip_checkpoint")  # model files: checked by sha256 instead
# The files a run writes into its folder; nothing else there is ever touched.
RUN_FILES = ("config.json", "last.pth", "best.pth", "resume.pth", "metrics.parquet", "metrics.csv", "summary.json",
             *LOG_DIRS)


@dataclass
class RunState:
    epoch: int
    best_top1: float
    history: list[dict]


def run_identity(settings: dict) -> str:
    """A hash of the settings a run resolved (those config.json records: a method's reference values
    filled in), so `--temperature 4` names the same run as a default of 4. The number of epochs may
    grow on resume, except under a cosine schedule, whose every epoch's lr depends on it."""
    fields = {k: v for k, v in settings.items() if k not in _NOT_IDENTITY}
    if settings.get("schedule") == "cosine":
        fields["epochs"] = settings.get("epochs")
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunFolder:
    """OUT of one run. Created before anything is trained: it refuses an existing run unless the user
    asked to continue it (--resume) or to replace it (--overwrite), so no user file is ever replaced by
    surprise, and it writes nothing until `start`, after every setting has been checked."""

    def __init__(self, cfg: TrainConfig, is_main: bool = True) -> None:
        self.cfg, self.out, self.is_main = cfg, Path(cfg.out), is_main
        self.identity = ""  # set by `start`, from the settings the run resolved
        self.log: RunLog | None = None  # the main process's, from `start`
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a run folder")
        present = [name for name in RUN_FILES if (self.out / name).exists()]
        self.own = own_files(self.out, present)
        foreign = [name for name in present if name not in self.own]
        if foreign:  # training would write over them, and --overwrite must never delete them
            raise ConfigError(
                f"{self.out} holds {', '.join(foreign)}, which no richkd-cache run wrote (a run writes files of "
                "these names); nothing was changed: move them away or choose another --out")
        if self.own and not (cfg.resume or cfg.overwrite):
            raise ConfigError(
                f"{self.out} already holds a run ({', '.join(self.own)}); continue it with --resume, "
                "replace it with --overwrite, or choose another --out"
            )

    def start(self, student, objective, optimizer, scheduler, settings: dict) -> RunState:
        """Restore the saved state (--resume) or begin afresh; then write config.json with the settings
        actually used. With --overwrite the previous run's own files go first, and only those."""
        self.identity = run_identity(settings)
        state = restore(self.out / "resume.pth", self.identity, student, objective, optimizer, scheduler) \
            if self.cfg.resume else None
        if self.is_main:
            if state is None and self.cfg.overwrite:
                for name in self.own:
                    if name in LOG_DIRS:
                        shutil.rmtree(self.out / name, ignore_errors=True)
                    else:
                        (self.out / name).unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", settings)
        state = state or RunState(epoch=0, best_top1=0.0, history=[])
        if self.is_main:
            self.log = RunLog(self.out, self.cfg.log, settings, state.history, optimizer, self.cfg.log_every)
        return state

    def logging(self, reporter: Reporter) -> Reporter:
        """The reporter the loop tells each step to: the run's logs hear of it (main process only)."""
        return LoggingReporter(reporter, self.log) if self.log is not None else reporter

    def end_epoch(self, state: RunState, stats: dict, student, objective, optimizer, scheduler,
                  num_classes: int, reporter) -> None:
        """Record the epoch (`stats`: lr, train losses, val top-1/top-5, seconds) and save the run."""
        top1 = stats["val_top1"]
        state.best_top1 = max(state.best_top1, top1)
        state.history.append({"epoch": state.epoch, **stats, "best_top1": state.best_top1, "step": self.log.step})
        # logged before it is saved: if the run dies in between, the resumed run's logs hide this epoch's
        # rows (TensorBoard's purge step) and write them again, never twice
        self.log.log_epoch(state.history[-1])
        reporter.info(
            f"epoch {state.epoch}/{self.cfg.epochs}  loss {stats['loss']:.3f}  top1 {top1:.2f}  "
            f"top5 {stats['val_top5']:.2f}  best {state.best_top1:.2f}  ({stats['epoch_s']:.1f}s)"
        )
        save_run(self.out, self.cfg, self.identity, student, objective, optimizer, scheduler, state, num_classes, top1)

    def finish(self, state: RunState) -> dict:
        summary = summarize(self.cfg, state)
        if self.is_main:
            self.log.close()
            write_json(self.out / "summary.json", summary)
        return summary


def own_files(out: Path, names: list[str]) -> list[str]:
    """Those of `names` (files of RUN_FILES in `out`) that a run of this tool wrote, known by what they hold,
    never by their names: the folder is a run when its config.json is one's record (the settings a run
    resolved); its metrics, summary and resume file are then the run's (resume.pth is checked when read);
    a checkpoint is a run's when its metadata names the run's settings (`richkd.config`)."""
    is_run = "config.json" in names and _is_run_record(out / "config.json")
    return [name for name in names if (_is_run_checkpoint(out / name) if name in ("last.pth", "best.pth")
                                       else is_run)]


def _is_run_record(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and {"student", "target", "seed", "out", "epochs"} <= set(record)


def _is_run_checkpoint(path: Path) -> bool:
    """Loaded as plain data only (a file in --out is untrusted), memory-mapped: its tensors are not read."""
    try:
        payload = load_plain_data(path, mmap=True)  # its tensors are never read
    except Exception:  # not a checkpoint torch can read as plain data: not one of ours
        return False
    meta = payload.get("richkd") if isinstance(payload, dict) else None
    return isinstance(meta, dict) and "config" in meta and "model" in payload


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk or a vanished folder while saving is one line naming the file; the previous
    version of the file stays intact (every write goes through a temporary file)."""
    existed = path.exists()
    try:
        yield
    except OSError as e:
        kept = f"the previous {path.name} is intact" if existed else "nothing was written there"
        raise ConfigError(f"could not write {path}: {e.strerror or e}; {kept}") from e


def save_run(out: Path, cfg: TrainConfig, identity: str, student, objective, optimizer, scheduler, state: RunState,
             num_classes: int, top1: float) -> None:
    """last.pth and best.pth in mdistiller's layout; resume.pth with everything else; metrics.parquet."""
    meta = {"config": identity, "target": cfg.resolved_target, "cache": cfg.cache}
    for name in ("last.pth", "best.pth") if top1 >= state.best_top1 else ("last.pth",):
        with _writing(out / name):
            save_checkpoint(str(out / name), student, arch=cfg.student, num_classes=num_classes,
                            epoch=state.epoch, best_acc=state.best_top1, extra=meta)
    resume = {
        "identity": identity,
        "student": student.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
    }
    save_resume(resume, out / "resume.pth")
    write_metrics(out, state.history)


# The only non-container type resume.pth holds: MultiStepLR keeps its milestones in a Counter.
_RESUME_TYPES = [collections.Counter]


def restore(path: Path, identity: str, student, objective, optimizer, scheduler) -> RunState | None:
    """Continue from resume.pth; a file from a run with other settings is refused.

    The file is untrusted: torch's weights-only unpickler builds tensors, numbers, strings and
    containers and nothing else, so a crafted file cannot run code; a damaged one is one line.
    """
    if not path.exists():
        return None
    try:
        saved = load_plain_data(path, "cpu", _RESUME_TYPES)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        refusal = holds_code(path, e, _RESUME_TYPES)
        if refusal:
            raise ConfigError(f"{refusal}; use --overwrite to start the run again") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is damaged or not a resume file ({first}); "
                          "use --overwrite to start the run again") from e
    if not isinstance(saved, dict) or saved.get("identity") != identity:
        raise ConfigError(
            f"{path} belongs to a run with other settings; resume with the same settings or use another --out"
        )
    try:
        student.load_state_dict(saved["student"])
        objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        return RunState(**saved["state"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{path} does not hold a complete run state ({type(e).__name__}: {e}); "
                          "use --overwrite to start the run again") from e


def save_resume(obj: dict, path: Path) -> None:
    with _writing(path):
        atomic_torch_save(obj, path)


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.parquet and metrics.csv: one row per epoch, rewritten whole (a resumed run never repeats one)."""
    table = pa.Table.from_pylist(history)
    with _writing(out / "metrics.parquet"), atomic_path(out / "metrics.parquet") as tmp:
        pq.write_table(table, tmp)
    with _writing(out / "metrics.csv"), atomic_path(out / "metrics.csv") as tmp:
        pyarrow.csv.write_csv(table, tmp)


def write_json(path: Path, obj: dict) -> None:
    with _writing(path), atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def summarize(cfg: TrainConfig, state: RunState) -> dict:
    last = state.history[-1] if state.history else {}
    return {
        "student": cfg.student,
        "target": cfg.resolved_target,
        "method": cfg.method if cfg.resolved_target != "ce" else None,
        "epochs": state.epoch,
        "seed": cfg.seed,
        "last_top1": last.get("val_top1", math.nan),
        "last_top5": last.get("val_top5", math.nan),
        "best_top1": state.best_top1,
        "out": cfg.out,
    }
