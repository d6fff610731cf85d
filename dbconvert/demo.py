"""`dbconvert demo`: the whole image pipeline on the built-in digits, in one call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from dbconvert.config import load_recipe
from dbconvert.families import get_family
from dbconvert.rundir import Run
from dbconvert.sampling import SampleRequest, SampleResult
from dbconvert.split import split
from dbconvert.train import train_block, train_e2e

DEMO_RECIPE = "dit-tiny-digits"


@dataclass
class DemoResult:
    run: Run
    samples: SampleResult
    e2e_samples: SampleResult | None


def run_demo(
    out: Path = Path("dbconvert-demo"),
    steps: int | None = None,
    e2e: bool = False,
    force: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> DemoResult:
    """Split `dit-tiny-digits` into 4 blocks, train each, sample; optionally the e2e baseline too."""
    console = console or Console()
    overrides = [f"train.steps={steps}"] if steps else []
    run = split(load_recipe(DEMO_RECIPE, overrides), out=out, force=force)
    console.print(f"split {DEMO_RECIPE} into {run.num_blocks} blocks at {run.root}")
    for block in run.blocks:
        result = train_block(run, block.index, progress=progress)
        console.print(f"block {block.index}: {result.step} steps, loss {result.last_loss}")
    family = get_family(run.family_name)
    samples = family.sample(run, SampleRequest())
    e2e_samples = None
    if e2e:
        train_e2e(run, progress=progress)
        e2e_samples = family.sample(run, SampleRequest(model="e2e"))
    return DemoResult(run, samples, e2e_samples)
