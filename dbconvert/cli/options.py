"""The command-line option types several commands share, defined once (typer `Annotated` aliases).

`TrainStepsOpt` is training steps (train-block, train-e2e, train-all); `SampleStepsOpt` is diffusion steps
(sample, eval). `option_parameter` turns a declared option (a metric's `MetricOption`, a family's
`SampleFlag`) into a parameter of a generated command.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dbconvert.schema import (
    EPOCHS_UNIT,
    MAX_EPOCHS,
    MAX_SAMPLE_STEPS,
    MAX_SEED,
    MAX_TRAIN_STEPS,
    SEED_UNIT,
    range_text,
    within,
)
from dbconvert.solvers import solver_choices, solver_names


def in_range(low: float, high: float, low_open: bool = False, unit: str = "") -> Callable[[Any], Any]:
    """An option callback: the value, or one line saying the whole allowed range, the recipe key's words
    (click's min/max name only the bound that failed, and let NaN through)."""

    def check(value: Any) -> Any:
        if value is not None and not within(value, low, high, low_open):
            raise typer.BadParameter(f"must be {range_text(low, high, low_open, unit)}, not {value}")
        return value

    return check


RunOpt = Annotated[Optional[Path], typer.Option("--run", help="Run directory (default: the last run split here).")]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Recipe overrides, key.sub=value (e.g. train.lr=3e-4).", show_default=False),
]
TrainStepsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--steps", callback=in_range(1, MAX_TRAIN_STEPS), help="Train for this many steps (overrides the recipe)."
    ),
]
EpochsOpt = Annotated[
    Optional[float],
    typer.Option(
        "--epochs",
        callback=in_range(0, MAX_EPOCHS, True, EPOCHS_UNIT),
        help="Train for this many epochs (overrides the recipe).",
    ),
]
RestartOpt = Annotated[bool, typer.Option("--restart", help="Ignore the saved training state and start over.")]
MODEL_CHOICES = "[blocks|e2e|source|ar|classifier]"
"""The model kinds as --help shows them (ar: text families' plain reference; classifier: ViT's)."""
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        metavar=MODEL_CHOICES,
        help="Which model: blocks, e2e (same denoiser, all layers), source (the unsplit "
        "converted source) or the family's plain reference (ar for text, "
        "classifier for ViT).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")]
SampleStepsOpt = Annotated[
    Optional[int],
    typer.Option("--steps", callback=in_range(1, MAX_SAMPLE_STEPS), help="Diffusion steps (default: recipe)."),
]
SolverOpt = Annotated[
    Optional[str],
    typer.Option("--solver", metavar=f"[{'|'.join(solver_names())}]", help=f"{solver_choices()} (default: recipe)."),
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", callback=in_range(0, MAX_SEED, unit=SEED_UNIT), help="Sampling seed (default: recipe)."),
]
WeightsOpt = Annotated[
    Optional[str], typer.Option("--weights", metavar="[ema|model]", help="ema or model weights (default: recipe).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


TYPE_METAVARS = {
    "<str>": "TEXT",
    "<int>": "INT",
    "<float>": "FLOAT",
    "<path>": "PATH",
    "<file>": "FILE",
    "<directory>": "DIR",
    "<int range>": "INT",
    "<float range>": "FLOAT",
}
"""click's plain names for option values in --help, for typer's `<str>`, `<int>`, ... (a range keeps its bounds)."""


def tidy_help(command: Any) -> Any:
    """A command (and every subcommand) as --help should show it: a flag shows no value type (typer writes
    `<bool>` beside --force), a value its plain name (TEXT, INT, PATH); options given a metavar (the choices of
    --model, --solver, --weights) keep it."""
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", "") != "option" or param.metavar is not None:
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
            continue
        try:
            shown = param.display_type(None)  # needs a context only for choices, which keep typer's <a|b>
        except Exception:  # noqa: BLE001 - any other parameter kind: as typer shows it
            continue
        if shown in TYPE_METAVARS:
            param.metavar = TYPE_METAVARS[shown]
    help_option = getattr(command, "get_help_option", None)
    if help_option is not None and not getattr(help_option, "tidied", False):

        def tidied(ctx: Any, original: Callable[[Any], Any] = help_option) -> Any:
            option = original(ctx)  # click adds --help when asked for it: a flag like the others
            if option is not None and option.metavar is None:
                option.metavar = ""
            return option

        tidied.tidied = True  # type: ignore[attr-defined]
        command.get_help_option = tidied
    for sub in (getattr(command, "commands", None) or {}).values():
        tidy_help(sub)
    return command


def option_parameter(option: Any, help: str | None = None, hidden: bool = False) -> inspect.Parameter:
    """A keyword parameter of a generated command from a declared option (`name`, `type`, `default`, `help`,
    `min`, `flag`): a `MetricOption` or a family's `SampleFlag`."""
    kind = option.type if option.default is not None else Optional[option.type]
    extra = {"min": option.min} if option.min is not None else {}
    annotation = Annotated[kind, typer.Option(option.flag, help=help or option.help, hidden=hidden, **extra)]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=annotation)


__all__ = [
    "EpochsOpt",
    "JsonOpt",
    "MODEL_CHOICES",
    "ModelOpt",
    "Overrides",
    "QuietOpt",
    "RestartOpt",
    "RunOpt",
    "SampleStepsOpt",
    "SeedOpt",
    "SolverOpt",
    "TrainStepsOpt",
    "WeightsOpt",
    "in_range",
    "option_parameter",
    "tidy_help",
]
