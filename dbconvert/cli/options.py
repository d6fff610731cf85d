"""The command-line option types several commands share, defined once (typer `Annotated` aliases).

`TrainStepsOpt` is training steps (train-block, train-e2e, train-all); `SampleStepsOpt` is diffusion steps
(sample, eval). `option_parameter` turns a declared option (a metric's `MetricOption`, a family's
`SampleFlag`) into a parameter of a generated command.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dbconvert.solvers import solver_choices

RunOpt = Annotated[Optional[Path], typer.Option("--run", help="Run directory (default: the last run split here).")]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Recipe overrides, key.sub=value (e.g. train.lr=3e-4).", show_default=False),
]
TrainStepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1,
                                                      help="Train for this many steps (overrides the recipe).")]
EpochsOpt = Annotated[Optional[float], typer.Option("--epochs", min=0.0,
                                                    help="Train for this many epochs (overrides the recipe).")]
RestartOpt = Annotated[bool, typer.Option("--restart", help="Ignore the saved training state and start over.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Which model: blocks, e2e (same denoiser, all layers), "
                                                      "source (the unsplit converted source) or the family's plain "
                                                      "reference (ar for text, classifier for ViT).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")]
SampleStepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="Diffusion steps (default: recipe).")]
SolverOpt = Annotated[Optional[str], typer.Option("--solver", help=f"{solver_choices()} (default: recipe).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (default: recipe).")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="ema or model weights (default: recipe).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def option_parameter(option: Any, help: str | None = None, hidden: bool = False) -> inspect.Parameter:
    """A keyword parameter of a generated command from a declared option (`name`, `type`, `default`, `help`,
    `min`, `flag`): a `MetricOption` or a family's `SampleFlag`."""
    kind = option.type if option.default is not None else Optional[option.type]
    extra = {"min": option.min} if option.min is not None else {}
    annotation = Annotated[kind, typer.Option(option.flag, help=help or option.help, hidden=hidden, **extra)]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=annotation)


__all__ = ["EpochsOpt", "JsonOpt", "ModelOpt", "Overrides", "QuietOpt", "RestartOpt", "RunOpt", "SampleStepsOpt",
           "SeedOpt", "SolverOpt", "TrainStepsOpt", "WeightsOpt", "option_parameter"]
