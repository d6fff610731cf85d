"""`dbconvert export OUT [--model source|e2e|ar|classifier] [--block I]`: a run's network in its family's reference
format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.text import Text

from dbconvert.cli.app import RunOpt, bold, command, console, err_console

OutArg = Annotated[
    Path,
    typer.Argument(
        help="Where to write: DiT a .pt or .safetensors file; ViT a timm .pth, .pt or "
        ".safetensors file or a Hugging Face folder; Llama and recurrent a "
        "Hugging Face folder."
    ),
]
ExportModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="source (the converted source, as split wrote it), "
        "e2e (the trained baseline), or the family's plain "
        "reference: ar (text) or classifier (ViT).",
    ),
]
BlockOpt = Annotated[
    Optional[int], typer.Option("--block", min=0, help="Export block I instead (a stand-alone network of L/B layers).")
]
WeightsOpt = Annotated[str, typer.Option("--weights", help="ema or model weights of a trained network.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]


@command("export")
def export_cmd(
    out: OutArg,
    run: RunOpt = None,
    model: ExportModelOpt = "source",
    block: BlockOpt = None,
    weights: WeightsOpt = "ema",
    force: ForceOpt = False,
) -> None:
    """Export the run's source, e2e baseline, plain reference (AR model, ViT classifier) or one block to its family's
    reference format (DiT .pt / .safetensors, ViT timm file or Hugging Face folder, Llama Hugging Face folder), e.g.
    to split it again or to use it elsewhere."""
    from dbconvert.export import export_model
    from dbconvert.rundir import resolve_run

    opened = resolve_run(run)
    result = export_model(opened, out, model=model, block=block, weights=weights, force=force)
    for note in result.notes:
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(
        Text.assemble(f"exported {result.name} ({result.weights.name}) of {opened.root} to ", bold(result.path)),
        highlight=False,
        soft_wrap=True,
    )
