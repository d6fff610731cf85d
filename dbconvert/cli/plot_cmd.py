"""`dbconvert plot [partition|loss|eval|samples|all]`: PNG figures of a run in RUN/plots/, paths printed one per
line."""

from __future__ import annotations

from typing import Annotated

import typer

from dbconvert.cli.app import RunOpt, command, err_console

FigureArg = Annotated[str, typer.Argument(help="partition, loss, eval, samples, or all (every figure that has data).")]
CompareOpt = Annotated[
    bool, typer.Option("--compare-uniform", help="Partition figure: equi-probability and uniform side by side.")
]


@command("plot")
def plot_cmd(figure: FigureArg = "all", run: RunOpt = None, compare_uniform: CompareOpt = False) -> None:
    """Draw the run's figures (noise partition, loss curves, evaluations, samples) into RUN/plots/."""
    from dbconvert.plots import make_figures
    from dbconvert.rundir import resolve_run

    opened = resolve_run(run)
    paths = make_figures(
        opened,
        figure,
        compare_uniform,
        note=lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True),
    )
    for path in paths:
        typer.echo(str(path))  # plain lines: scripts and terminals get whole paths, never wrapped
