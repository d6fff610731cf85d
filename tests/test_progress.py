"""dbconvert.progress: plain lines with rate and time left when the output is not a terminal (issue 14.5)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dbconvert.progress import duration, progress


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=40, soft_wrap=True), out


def test_plain_lines_carry_count_rate_and_time_left_and_never_wrap() -> None:
    console, out = plain_console()
    with progress(
        "a long label that is wider than the forty columns", 4, unit="images", every=0.0, console=console
    ) as update:
        for done in range(1, 5):
            update(done, detail="3 MiB")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # one per update (every=0) and the final one
    assert lines[1].startswith("a long label that is wider than the forty columns: 2/4 images (50%), ")
    assert "images/s" in lines[1] and "left" in lines[1] and lines[1].endswith(", 3 MiB")
    assert lines[-1].startswith("a long label that is wider than the forty columns: done, 4 images in 0s")


def test_quiet_and_failed_work_print_nothing() -> None:
    console, out = plain_console()
    with progress("quiet", 10, enabled=False, console=console) as update:
        update(5)
    with pytest.raises(ValueError), progress("fails", 10, console=console) as update:
        update(1)
        raise ValueError("boom")
    assert out.getvalue() == ""


def test_duration() -> None:
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
