"""Running `dbconvert` in-process for tests, and the shape every user error must have."""

from __future__ import annotations

from click.testing import Result
from typer.testing import CliRunner

from dbconvert.cli import app

runner = CliRunner()


def invoke(*args: object) -> Result:
    """`dbconvert ARGS...` through Typer's test runner (stdout and stderr kept apart)."""
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result: Result, match: str) -> None:
    """Exit code 2, no traceback, and exactly one `error:` line on stderr containing `match`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr or result.output
    assert match in lines[0], lines[0]
