"""The `dbconvert` command line (see `dbconvert.cli.app`)."""

from dbconvert.cli.app import app, main
from dbconvert.cli.eval_cmd import eval_app
from dbconvert.cli import plot_cmd  # noqa: F401  (registers `dbconvert plot`)
from dbconvert.cli import export_cmd  # noqa: F401  (registers `dbconvert export`)

app.add_typer(eval_app, name="eval")

__all__ = ["app", "main"]
