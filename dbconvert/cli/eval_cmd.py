"""`dbconvert eval METRIC | compare` (DESIGN 7): one subcommand per registered metric, built from the registry.

Each metric command takes the shared options (--run, --model, --seed, --steps, --solver, --weights, --json,
-q) and the metric's own (`Metric.options`), calls `Metric.evaluate`, writes RUN/eval/<name>.json and prints
the metric's table. A metric registered at run time (a plug-in family's) gets its command the same way. The
commands are built from each metric's torch-free `MetricHelp` (`metric.metric_help`), so `eval --help` and `eval
NAME --help` import no metric; the metric is imported when its command runs.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from rich.text import Text

from dbconvert.cli.app import bold, console, err_console, handle_errors, print_table
from dbconvert.cli.options import (
    JsonOpt,
    ModelOpt,
    QuietOpt,
    RunOpt,
    SampleStepsOpt,
    SeedOpt,
    SolverOpt,
    WeightsOpt,
    option_parameter,
    tidy_help,
)
from dbconvert.evaluation.metric import Metric, MetricHelp, get_metric, metric_help, metric_names, nolog


def _log(quiet: bool):  # noqa: ANN202
    return nolog if quiet else (lambda msg: err_console.print(msg, highlight=False, markup=False))


def _report(result: dict, run, as_json: bool) -> None:  # noqa: ANN001
    from dbconvert.evaluation.results import result_table, write_result

    path = write_result(run.root / "eval", result) if run is not None else None
    if as_json:
        typer.echo(json.dumps({**result, "file": str(path) if path else None}))
        return
    print_table(result_table(result))
    if path:
        console.print(
            Text.assemble("written to ", bold(path), "; `dbconvert eval compare` lists every evaluation of the run")
        )


SHARED = [
    ("run", RunOpt, None),
    ("model", ModelOpt, "blocks"),
    ("steps", SampleStepsOpt, None),
    ("solver", SolverOpt, None),
    ("seed", SeedOpt, None),
    ("weights", WeightsOpt, None),
    ("as_json", JsonOpt, False),
    ("quiet", QuietOpt, False),
]


def run_metric(
    metric: Metric,
    run: Optional[Path],
    model: str,
    steps: Optional[int],
    solver: Optional[str],
    seed: Optional[int],
    weights: Optional[str],
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """What every `eval METRIC` command does: resolve the run, evaluate through the registry, report."""
    from dbconvert.errors import DbconvertError
    from dbconvert.rundir import resolve_run
    from dbconvert.sampling import check_sampler_choices

    check_sampler_choices(solver, weights)
    given = [name for name in metric.alone_options if options.get(name) is not None]
    if run is None and given and given == list(metric.alone_options):
        opened = _current_run_for(metric)  # files alone need no run; the current one helps where it applies
    else:
        opened = resolve_run(run)
        if run is None and given and metric.name not in opened.family().metrics_for(opened.recipe):
            raise DbconvertError(
                f"{metric.alone_hint} (the current run {opened.root} is a {opened.family_name} run, "
                f"which eval {metric.name} does not apply to)"
            )
        metric.require(opened)
    sampler = {"steps": steps, "solver": solver, "seed": seed, "weights": weights}
    result = metric.evaluate(
        opened,
        model=model,
        log=_log(quiet or as_json),
        progress=not quiet,
        **{k: v for k, v in sampler.items() if v is not None},
        **options,
    )
    _report(result, opened, as_json)


def _current_run_for(metric: Metric) -> Any:
    """The current run when there is one and the metric applies to its family (its data and features), else None."""
    from dbconvert.errors import DbconvertError
    from dbconvert.rundir import resolve_run

    try:
        current = resolve_run(None)
    except DbconvertError:
        return None
    return current if metric.name in current.family().metrics_for(current.recipe) else None


def metric_command(name: str, shown: MetricHelp) -> click.Command:
    """The click command of `dbconvert eval NAME` for metric `name`, built from its `MetricHelp` (the metric itself
    is imported when the command runs)."""

    def command(**kwargs: Any) -> None:
        shared = {key: kwargs.pop(key) for key, _, _ in SHARED}
        run_metric(get_metric(name), **shared, **kwargs)

    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in SHARED
    ]
    params += [option_parameter(o) for o in shown.options]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = shown.help or f"{shown.title} of the run's models."
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    sub.command(name)(handle_errors(command))
    return typer.main.get_command(sub)


class MetricGroup(TyperGroup):
    """`dbconvert eval`: `compare`, plus one command per metric registered when the command line is read."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *metric_names()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in metric_names():
            found = tidy_help(metric_command(cmd_name, metric_help(cmd_name)))
        return found


eval_app = typer.Typer(
    cls=MetricGroup,
    no_args_is_help=True,
    help="Evaluate a run with one of its metrics (FID/KID for images, MAUVE for text, and those a "
    "family registers), and compare every result.",
)


@eval_app.command("compare")
@handle_errors
def compare_cmd(run: RunOpt = None, as_json: JsonOpt = False) -> None:
    """Every evaluation of the run, one table per metric and features: blocks vs e2e vs ar or source, with settings."""
    from dbconvert.evaluation.results import compare_tables, require_results
    from dbconvert.rundir import resolve_run

    opened = resolve_run(run)
    results = require_results(opened.root / "eval")
    if as_json:
        typer.echo(json.dumps(results))
        return
    for table in compare_tables(results, opened.root):
        print_table(table)
