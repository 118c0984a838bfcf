"""Progress and messages: a rich progress bar with images/s and ETA, silent when asked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import ProgressColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """Throughput in the task's own unit (img/s for stage one and stage two)."""

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


class Reporter:
    """Owns the console; pipelines report through it so tests and scripts can silence bars."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def step(self, terms: dict) -> None:
        """One optimisation step's loss terms (detached tensors): nothing to show. A run with --log gets a
        reporter that records them (pipelines/loggers.py)."""

    @contextmanager
    def task(self, description: str, total: int, unit: str = "img") -> Iterator[Callable[[int], None]]:
        """Yields `advance(n)`; shows a bar with rate and ETA unless quiet."""
        if self.quiet:
            yield lambda n: None
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(description, total=total, unit=unit)
            yield lambda n: progress.advance(task_id, n)
