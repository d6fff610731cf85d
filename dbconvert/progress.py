"""One progress display for long work: a Rich bar with rate and ETA on a terminal, plain lines otherwise.

Every long step (sampling images, FID generation and features, MAUVE, split, the built-in feature
network) reports through `progress`, so they all look alike. It writes to stderr, so stdout stays
machine-readable (`--json`, paths, `recipes --show`). When stderr is not a terminal (a log file,
`train-all`'s per-block logs, a CI job), a live bar would write control codes, so it prints a plain
line every `every` seconds (count, rate, time left) and one when the work ends; work that fails or
ends within the first interval prints only that last line, or nothing when it fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

PLAIN_EVERY_S = 10.0
"""Seconds between two plain progress lines (non-terminal output)."""

Update = Callable[..., None]
"""update(done, detail="", total=None): the absolute amount of work done so far, in the bar's unit; optional
extra text (e.g. "120 MiB, 35 MiB/s"); the total, when it becomes known only once the work runs."""


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
    """The non-terminal display: a line every `every` seconds and one at the end."""

    def __init__(
        self, console: Console, label: str, total: float | None, unit: str, every: float, start: float = 0.0
    ) -> None:
        self.console, self.label, self.total, self.unit, self.every = console, label, total, unit, every
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.first = self.done = start
        self.detail = ""

    def say(self, text: str) -> None:
        self.console.print(
            text + (f", {self.detail}" if self.detail else ""), highlight=False, markup=False, soft_wrap=True
        )

    def rate(self, now: float) -> float:
        """Units per second in this process (work done before a resume does not count)."""
        return (self.done - self.first) / max(now - self.t0, 1e-9)

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        rate = self.rate(now)
        count = f"{amount(self.done)}/{amount(self.total)}" if self.total else amount(self.done)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", {duration((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
        return f"{self.label}: {count} {self.unit}{pct}, {rate:.3g} {self.unit}/s, {duration(elapsed)} elapsed{eta}"

    def update(self, done: float, detail: str = "", total: float | None = None) -> None:
        self.done, self.detail = done, detail
        self.total = self.total if total is None else total
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.say(self.line(now))

    def finish(self) -> None:
        now = time.perf_counter()
        self.say(
            f"{self.label}: done, {amount(self.done - self.first)} {self.unit} in {duration(now - self.t0)} "
            f"({self.rate(now):.3g} {self.unit}/s)"
        )


@contextmanager
def progress(
    label: str,
    total: float | None,
    *,
    unit: str = "steps",
    enabled: bool = True,
    every: float = PLAIN_EVERY_S,
    console: Console | None = None,
    start: float = 0.0,
) -> Iterator[Update]:
    """Show progress of `total` units of work (None: unknown); yields `update(done)`.

    `start`: units already done before (a resumed run): counted as done, not in the rate. Disabled, it
    yields a no-op, so library callers stay quiet and the CLI turns it on.
    """
    if not enabled:
        yield lambda done, detail="", total=None: None
        return
    console = console or Console(stderr=True)
    if not console.is_terminal:
        plain = PlainLines(console, label, total, unit, every, start)
        yield plain.update
        plain.finish()  # not reached when the work raised: no "done" line for failed work
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit, markup=False),
        TextColumn("{task.fields[rate]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}", markup=False),
    )  # labels hold paths: literal
    t0 = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total, completed=start, rate="", detail="")

        def update(done: float, detail: str = "", total: float | None = None) -> None:
            rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
            more = {"total": total} if total is not None else {}
            bar.update(task, completed=done, rate=f"{rate:.3g} {unit}/s", detail=detail, **more)

        yield update
