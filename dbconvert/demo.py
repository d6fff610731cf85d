"""`dbconvert demo`: the whole image pipeline on the built-in digits, in one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError, RunError, first_line
from dbconvert.rundir import MANIFEST, Run, set_current
from dbconvert.sampling import SampleRequest, SampleResult
from dbconvert.split import split
from dbconvert.train import train_block, train_e2e

DEMO_RECIPE = "dit-tiny-digits"
DEMO_STEPS = 1000
"""Training steps per block (and for the e2e baseline, matched to one block) unless --steps is given:
fewer than the recipe's 1500 so that blocks + baseline + FID stay under 10 minutes on 2 CPU cores
(at 500 the samples are still speckled; at 1000 they read as clean digits)."""
DEMO_FID_SAMPLES = 1000


@dataclass
class DemoResult:
    run: Run
    samples: SampleResult
    e2e_samples: SampleResult | None
    fid: dict[str, dict] = field(default_factory=dict)  # model -> result of eval fid (built-in features)
    figures: list[Path] = field(default_factory=list)  # RUN/plots/*.png: partition, loss, eval


def run_demo(
    out: Path = Path("dbconvert-demo"),
    steps: int | None = None,
    e2e: bool = True,
    force: bool = False,
    progress: bool = True,
    console: Console | None = None,
    fid: bool = True,
    fid_samples: int = DEMO_FID_SAMPLES,
) -> DemoResult:
    """Split `dit-tiny-digits` into 4 blocks, train each, sample, train the e2e baseline, then FID of both.

    Rerunning continues an existing demo run in `out` (training resumes where it stopped);
    `force` starts over.

    The FID uses the built-in digits features (a small CNN trained once on the digits train split,
    cached) against the digits test split; both models get the same number of samples and seed.
    """
    console = console or Console(soft_wrap=True)
    if (Path(out) / MANIFEST).exists() and not force:
        run = Run.open(out)
        if run.recipe.name != DEMO_RECIPE:
            raise RunError(f"{out} holds a run of {run.recipe.name!r}, not the demo; choose another --out")
        set_current(run.root)
        console.print(f"continuing the demo run in {run.root} (--force starts over)")
    else:
        run = split(load_recipe(DEMO_RECIPE, [f"train.steps={DEMO_STEPS}"]), out=out, force=force)
        console.print(f"split {DEMO_RECIPE} into {run.num_blocks} blocks at {run.root}")
    for block in run.blocks:
        result = train_block(run, block.index, steps=steps, progress=progress)
        loss = f"last logged loss {result.last_loss:.4f}" if result.last_loss is not None else "already trained"
        console.print(f"block {block.index}: {result.step} steps, {loss}")
    family = run.family()
    samples = family.generate(run, SampleRequest(progress=progress))
    e2e_samples = None
    if e2e:
        train_e2e(run, steps=steps, progress=progress)
        e2e_samples = family.generate(run, SampleRequest(model="e2e", progress=progress))
    result = DemoResult(run, samples, e2e_samples)
    if fid:
        from dbconvert.evaluation.fid import evaluate_fid
        from dbconvert.evaluation.results import compare_tables, result_table, write_result

        def log(msg: str) -> None:
            console.print(msg, highlight=False, markup=False)

        for model in ["blocks", "e2e"] if e2e else ["blocks"]:
            res = evaluate_fid(run, model=model, num=fid_samples, features="builtin", log=log, progress=progress)
            write_result(run.root / "eval", res)
            console.print(result_table(res))
            result.fid[model] = res
        for table in compare_tables(list(result.fid.values()), run.root):
            console.print(table)
    try:  # figures are a bonus: a plotting problem must not cost the user the trained demo
        from dbconvert.plots import has_data, make_figures

        result.figures = [
            p for name in ("partition", "loss", "eval") if has_data(run, name) for p in make_figures(run, name)
        ]
    except (ImportError, DbconvertError) as exc:
        console.print(f"figures skipped: {first_line(exc)}", highlight=False, markup=False)
    for path in result.figures:
        console.print(f"look at the figure: {path}", highlight=False, markup=False, soft_wrap=True)
    for line in summary_lines(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return result


def summary_lines(result: DemoResult) -> list[str]:
    """What the demo made and what its numbers mean: both grids, the FID/KID's features and scale, and which
    model is ahead at this budget, said plainly whichever it is."""
    lines = [f"samples of the blocks: {path}" for path in result.samples.files if path.name == "grid.png"]
    if result.e2e_samples is not None:
        lines += [
            f"samples of the e2e baseline: {path}" for path in result.e2e_samples.files if path.name == "grid.png"
        ]
    if result.fid:
        lines.append(
            "FID and KID here use the built-in digits features (a small CNN trained on the digits train "
            "split), not Inception: they compare these models with each other, not with published FIDs; "
            "KID is clean-fid's raw value (not x1000; its size follows the features' scale); lower is "
            "better for both"
        )
    if {"blocks", "e2e"} <= set(result.fid):
        blocks, e2e = result.fid["blocks"]["value"], result.fid["e2e"]["value"]
        ahead = "the blocks are" if blocks < e2e else "the e2e baseline is"
        lines.append(
            f"at this budget {ahead} ahead: FID {blocks:.2f} (blocks) vs {e2e:.2f} (e2e), one sample set "
            "each, so a small gap is within the noise of a rerun"
        )
    return lines
