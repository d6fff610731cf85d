"""One progress display for long work: a Rich bar with rate and ETA on a terminal, plain lines otherwise.

Every long step (sampling images, FID generation and features, MAUVE, split, the built-in feature
network) reports through `progress`, so they all look alike. It writes to stderr, so stdout stays
machine-readable (`--json`, paths, `recipes --show`). When stderr is not a terminal (a log file,
`train-all`'s per-block logs, a CI job), a live bar would write control codes, so it prints one plain
line when the work starts, then at most one every `every` seconds, and one when it ends, each with the
count, the rate and the time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

PLAIN_EVERY_S = 10.0
"""Seconds between two plain progress lines (non-terminal output)."""

Update = Callable[[float], None]
"""update(done): the absolute amount of work done so far, in the bar's unit."""


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def amount(value: float) -> str:
    """A count without a spurious `.0` (counts are usually whole numbers)."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


class PlainLines:
    """The non-terminal display: a line at start, every `every` seconds, and at the end."""

    def __init__(self, console: Console, label: str, total: float | None, unit: str, every: float) -> None:
        self.console, self.label, self.total, self.unit, self.every = console, label, total, unit, every
        self.start = time.perf_counter()
        self.last = self.start
        self.done = 0.0
        of = f" of {amount(total)} {unit}" if total else ""
        self.say(f"{label}: started{of}")

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{amount(self.done)}/{amount(self.total)}" if self.total else amount(self.done)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", {duration((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
        return f"{self.label}: {count} {self.unit}{pct}, {rate:.3g} {self.unit}/s, {duration(elapsed)} elapsed{eta}"

    def update(self, done: float) -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.say(self.line(now))

    def finish(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.say(f"{self.label}: done, {amount(self.done)} {self.unit} in {duration(elapsed)} "
                 f"({self.done / elapsed:.3g} {self.unit}/s)")


@contextmanager
def progress(label: str, total: float | None, *, unit: str = "steps", enabled: bool = True,
             every: float = PLAIN_EVERY_S, console: Console | None = None) -> Iterator[Update]:
    """Show progress of `total` units of work (None: unknown); yields `update(done)`.

    Disabled, it yields a no-op, so library callers stay quiet and the CLI turns it on.
    """
    if not enabled:
        yield lambda done: None
        return
    console = console or Console(stderr=True)
    if not console.is_terminal:
        plain = PlainLines(console, label, total, unit, every)
        yield plain.update
        plain.finish()  # not reached when the work raised: no "done" line for failed work
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    start = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total, rate="")

        def update(done: float) -> None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:.3g} {unit}/s")

        yield update
