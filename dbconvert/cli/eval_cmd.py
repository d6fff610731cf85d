"""`dbconvert eval fid | mauve | compare` (DESIGN 7): each writes RUN/eval/<name>.json and prints a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dbconvert.cli.app import ModelOpt, RunOpt, console, err_console, handle_errors

eval_app = typer.Typer(help="Evaluate a run: FID/KID (clean-fid) for images, MAUVE (mauve-text) for text, and compare.",
                       no_args_is_help=True)

SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (default: recipe).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="Diffusion steps (default: recipe).")]
SolverOpt = Annotated[Optional[str], typer.Option("--solver", help="euler or heun (default: recipe).")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="ema or model weights (default: recipe).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")]


def _log(quiet: bool):  # noqa: ANN202
    return (lambda msg: None) if quiet else (lambda msg: err_console.print(msg, highlight=False, markup=False))


def _check_choices(solver: Optional[str], weights: Optional[str]) -> None:
    from dbconvert.errors import DbconvertError

    if solver is not None and solver not in ("euler", "heun"):
        raise DbconvertError(f"--solver must be euler or heun, not {solver!r}")
    if weights is not None and weights not in ("ema", "model"):
        raise DbconvertError(f"--weights must be ema or model, not {weights!r}")


def _report(result: dict, run, as_json: bool) -> None:  # noqa: ANN001
    from dbconvert.evaluation.results import result_table, write_result

    path = write_result(run.root / "eval", result) if run is not None else None
    if as_json:
        typer.echo(json.dumps({**result, "file": str(path) if path else None}))
        return
    console.print(result_table(result))
    if path:
        console.print(f"written to [bold]{path}[/]; `dbconvert eval compare` lists every evaluation of the run")


@eval_app.command("fid")
@handle_errors
def fid_cmd(
    run: RunOpt = None,
    model: ModelOpt = "blocks",
    num: Annotated[Optional[int], typer.Option("--num", min=1, help="Samples to generate per repeat (default 10000; the paper: 50000).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Independent sample sets; reports each, the minimum (paper) and the mean.")] = 1,
    samples: Annotated[Optional[Path], typer.Option("--samples", help="Evaluate this image folder instead of generating.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Reference image folder instead of the data set.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Reference split of the recipe's data set (default: train "
                                                 "for cifar10, as published FIDs use; test otherwise).")] = None,
    features: Annotated[str, typer.Option("--features", help="auto (Inception for RGB, built-in CNN for grey), inception, builtin or builtin:SOURCE.")] = "auto",
    inception_weights: Annotated[Optional[Path], typer.Option("--inception-weights", help="clean-fid's inception-2015-12-05.pt, if not in /tmp.")] = None,
    feature_images: Annotated[int, typer.Option("--feature-images", min=0, help="Built-in features: train the CNN on at "
                                                "most this many images of the train split (0 = all of them).")] = 5000,
    steps: StepsOpt = None,
    solver: SolverOpt = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", min=0.0, help="Classifier-free guidance w (default: recipe).")] = None,
    seed: SeedOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """FID and KID (clean-fid, mode clean) of the run's samples against the data set's reference images."""
    from dbconvert.errors import DbconvertError
    from dbconvert.evaluation.fid import evaluate_fid
    from dbconvert.rundir import resolve_run

    _check_choices(solver, weights)
    try:
        opened = resolve_run(run)
    except DbconvertError:
        if run is not None or samples is None or reference is None:
            raise
        opened = None  # two folders need no run
    result = evaluate_fid(opened, model=model, num=num, repeats=repeats, samples=samples, reference=reference,
                          split=split, features=features, inception_weights=inception_weights, steps=steps,
                          solver=solver, guidance=guidance, seed=seed, weights=weights, log=_log(quiet or as_json),
                          feature_images=feature_images, progress=not quiet)
    _report(result, opened, as_json)


@eval_app.command("mauve")
@handle_errors
def mauve_cmd(
    run: RunOpt = None,
    model: ModelOpt = "blocks",
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", help="Prompts (default: up to 1000, the paper).")] = None,
    samples_per_prompt: Annotated[int, typer.Option("--samples-per-prompt", min=1, help="Continuations per prompt.")] = 5,
    prompt_tokens: Annotated[Optional[int], typer.Option("--prompt-tokens", min=1, help="Prompt length in tokens (default: SEDD's 50, or half the run's context when it is shorter than 100).")] = None,
    new_tokens: Annotated[Optional[int], typer.Option("--new-tokens", min=1, help="Continuation length in tokens (default: SEDD's 50, or what the context leaves).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Held-out split (default: val for local text, test for hub data).")] = None,
    featurizer: Annotated[str, typer.Option("--featurizer", help="auto, minilm, gpt2-large or a local Hugging Face encoder folder.")] = "auto",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="MAUVE k-means seeds to average over.")] = 3,
    steps: StepsOpt = None,
    solver: SolverOpt = None,
    seed: SeedOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """MAUVE (mauve-text) on SEDD's conditional protocol: 50-token prompts, 50-token continuations."""
    from dbconvert.evaluation.mauve import evaluate_mauve
    from dbconvert.rundir import resolve_run

    _check_choices(solver, weights)
    opened = resolve_run(run)
    result = evaluate_mauve(opened, model=model, num_prompts=num_prompts, samples_per_prompt=samples_per_prompt,
                            prompt_tokens=prompt_tokens, new_tokens=new_tokens, split=split, featurizer=featurizer,
                            seeds=seeds, steps=steps, solver=solver, seed=seed, weights=weights,
                            log=_log(quiet or as_json), progress=not quiet)
    _report(result, opened, as_json)


@eval_app.command("accuracy")
@handle_errors
def accuracy_cmd(run: RunOpt = None, model: ModelOpt = "blocks", steps: Annotated[Optional[int], typer.Option(
                 "--steps", min=1, help="Denoising steps (default: one per block).")] = None,
                 seed: SeedOpt = None, weights: WeightsOpt = None, as_json: JsonOpt = False) -> None:
    """Classifier runs (ViT): top-1, top-5, NLL, ECE on the test split and the top-1 after every denoising step."""
    from dbconvert.errors import DbconvertError
    from dbconvert.rundir import resolve_run

    _check_choices(None, weights)
    opened = resolve_run(run)
    evaluate = opened.family().metrics().get("accuracy")
    if evaluate is None:
        raise DbconvertError(f"eval accuracy applies to classifier runs; this {opened.family_name} run is scored by "
                             f"{opened.family().default_metric} (use eval {opened.family().default_metric})")
    result = evaluate(opened, model=model, steps=steps, weights=weights, seed=seed)
    typer.echo(json.dumps(result) if as_json else " ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if k not in ("sampler", "run")))


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
        console.print(table)
