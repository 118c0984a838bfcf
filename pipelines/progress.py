"""Progress and messages: a rich bar with rate and ETA on a terminal, plain log lines elsewhere.

A batch job's stderr is a file: a bar redrawn in place writes nothing readable there, so off a terminal
every task logs a line (done/total, rate, ETA) each time it passes another tenth of its total or when
30 s have gone by since its last line. The clock is injectable so tests never wait on a timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LOG_EVERY_FRACTION = 0.1  # off a terminal: a line at every tenth of the total ...
LOG_EVERY_S = 30.0  # ... and at least every 30 s while the task advances


class RateColumn(ProgressColumn):
    """Throughput in the task's own unit (img/s for stage one and stage two)."""

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


def duration(seconds: float) -> str:
    """H:MM:SS, as the bar's ETA column writes it."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Task:
    """`advance(n)` for one task; `status` is a short note shown after the counts (e.g. blocks written).

    After `estimate_after` advances past the first (which pays for warm-up: workers starting, kernels
    compiling), one line estimates the whole task's time from the rate of those advances."""

    def __init__(self, reporter: Reporter, description: str, total: int, unit: str, estimate_after: int | None,
                 on_change: Callable[[Task], None]) -> None:
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.done, self.status, self.calls = 0, "", 0
        self.start = reporter.clock()
        self.estimate_after = estimate_after
        self._warm: tuple[float, int] | None = None  # (time, done) after the first advance
        self._on_change = on_change

    def __call__(self, n: int = 0, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        if n:
            self.calls += 1
            now = self.reporter.clock()
            if self.calls == 1:
                self._warm = (now, self.done)
            elif self.estimate_after and self.calls == 1 + self.estimate_after:
                self._estimate(now)
        self._on_change(self)

    def rate(self, now: float) -> float | None:
        elapsed = now - self.start
        return self.done / elapsed if elapsed > 0 and self.done else None

    def line(self, now: float) -> str:
        """`build: 512/1,797 img (28 %), 310 img/s, ETA 0:00:04[, status]`."""
        rate = self.rate(now)
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        speed = f"{rate:,.0f} {self.unit}/s" if rate else f"- {self.unit}/s"
        eta = duration((self.total - self.done) / rate) if rate else "-"
        status = f", {self.status}" if self.status else ""
        return f"{self.description}: {self.done:,}/{self.total:,} {self.unit}{share}, {speed}, ETA {eta}{status}"

    def _estimate(self, now: float) -> None:
        since, done = self._warm  # type: ignore[misc]
        if now <= since or self.done <= done:
            return
        rate = (self.done - done) / (now - since)
        self.reporter.info(f"estimate: {self.description} takes about {duration(self.total / rate)} "
                           f"({rate:,.0f} {self.unit}/s over batches 2 to {self.calls})")


class Reporter:
    """Owns the console; pipelines report through it so tests and scripts can silence bars.

    live: draw rich bars (default: when the console is a terminal); otherwise tasks log plain lines.
    clock: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, console: Console | None = None, quiet: bool = False, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal if live is None else live
        self.clock = clock

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, soft_wrap=True)

    def step(self, terms: dict) -> None:
        """One optimisation step's loss terms (detached tensors): nothing to show. A run with --log gets a
        reporter that records them (pipelines/loggers.py)."""

    @contextmanager
    def stage(self, description: str) -> Iterator[None]:
        """A step with no count (loading a model): a spinner on a terminal, a line before and after elsewhere."""
        if self.quiet:
            yield
            return
        start = self.clock()
        if self.live:
            with self.console.status(description):
                yield
        else:
            self.info(f"{description} ...")
            yield
        self.info(f"{description}: done in {self.clock() - start:.1f} s")

    @contextmanager
    def task(self, description: str, total: int, unit: str = "img",
             estimate_after: int | None = None) -> Iterator[Task]:
        """Yields a `Task`: call it with the count just done; a bar (terminal) or log lines show done/total,
        rate and ETA, unless quiet."""
        if self.quiet:
            yield Task(self, description, total, unit, None, lambda task: None)
            return
        if not self.live:
            yield from self._logged(description, total, unit, estimate_after)
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(description, total=total, unit=unit, status="")

            def redraw(task: Task) -> None:
                progress.update(task_id, completed=task.done, status=task.status)

            yield Task(self, description, total, unit, estimate_after, redraw)

    def _logged(self, description: str, total: int, unit: str, estimate_after: int | None) -> Iterator[Task]:
        step = max(1.0, total * LOG_EVERY_FRACTION)
        mark = {"next": step, "at": self.clock(), "done": 0}  # the next count; the time and count of the last line

        def log(task: Task) -> None:
            now = self.clock()
            if task.done >= mark["next"] or now - mark["at"] >= LOG_EVERY_S:
                self.info(task.line(now))
                mark.update(next=(task.done // step + 1) * step, at=now, done=task.done)

        task = Task(self, description, total, unit, estimate_after, log)
        self.info(task.line(task.start))  # the task has started: its total, before the first batch
        yield task
        if task.done != mark["done"]:  # the last count, unless its line is the last one
            self.info(task.line(self.clock()))
