"""The Typer app: each command parses and validates, then calls one library function.

Errors a user can cause are `DbconvertError`s; `handle_errors` prints them as one line and
exits with status 2, with no traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dbconvert.errors import DbconvertError

app = typer.Typer(
    name="dbconvert",
    help="Turn residual networks (DiT, Llama) into diffusion blocks, train each block alone, sample, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
"""soft_wrap: long lines (paths, JSON, messages) are never cut into pieces at 80 columns when the output is
redirected; a terminal wraps them itself. Tables are still laid out to the terminal's width."""

F = TypeVar("F", bound=Callable[..., Any])

# --- shared options (defined once) ---------------------------------------------------------

RunOpt = Annotated[Optional[Path], typer.Option("--run", help="Run directory (default: the last run split here).")]
Overrides = Annotated[
    Optional[list[str]], typer.Argument(help="Recipe overrides, key.sub=value (e.g. train.lr=3e-4).", show_default=False)
]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="Train for this many steps (overrides the recipe).")]
EpochsOpt = Annotated[Optional[float], typer.Option("--epochs", min=0.0, help="Train for this many epochs (overrides the recipe).")]
RestartOpt = Annotated[bool, typer.Option("--restart", help="Ignore the saved training state and start over.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Which model: blocks, e2e (same denoiser, all layers), "
                                                      "source (the unsplit converted source) or ar (text: the AR reference).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def handle_errors(func: F) -> F:
    """Turn user errors into one red line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DbconvertError as exc:
            from rich.markup import escape  # a message may hold brackets (pip install 'dbconvert[gguf]')

            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; rerun the same command to resume from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def command(name: str, **kwargs: Any) -> Callable[[F], F]:
    """Register a Typer command with the shared error handling."""

    def deco(func: F) -> F:
        app.command(name, **kwargs)(handle_errors(func))
        return func

    return deco


def main() -> None:
    """Console-script entry point."""
    app()


# --- output helpers ------------------------------------------------------------------------


def _fmt_range(r: tuple[float, float] | list[float]) -> str:
    return f"{r[0]:.4g} – {r[1]:.4g}"


def blocks_table(run: Any) -> Table:
    from dbconvert.rundir import Run

    table = Table(title=f"{run.root}  ({run.family_name}, {run.num_layers} layers, {run.num_blocks} blocks, "
                        f"{run.manifest['partition']}, gamma={run.manifest['gamma']})")
    level = run.noise().level_name
    for col in ("block", "layers", f"owned {level}", f"training {level}", "mass", "params", "trained steps"):
        table.add_column(col, justify="right" if col in ("mass", "params", "trained steps") else "left")
    for b in run.blocks:
        status = run.status(Run.block_name(b.index))
        steps = f"{status.step}/{status.total_steps}" if status.total_steps else "-"
        table.add_row(str(b.index), f"[{b.layers[0]}, {b.layers[1]})", _fmt_range(b.owned_range),
                      _fmt_range(b.train_range), f"{b.mass:.4f}", f"{b.params:,}", steps)
    return table


def parameterization_line(run: Any) -> str:
    """`parameterization: ddpm-eps (beta_start=0.0001, ...)`: what the run's networks output, and its settings."""
    record = run.parameterization
    name = record.pop("name")

    def fmt(value: Any) -> str:
        if isinstance(value, list):
            return "..".join(f"{v:.4g}" for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    details = ", ".join(f"{k}={fmt(v)}" for k, v in record.items())
    return f"parameterization: {name}" + (f" ({details})" if details else "")


def announce(title: str, payload: dict[str, Any]) -> None:
    """Print the resolved configuration before a long run starts."""
    console.rule(f"[bold]{title}")
    console.print_json(json.dumps(payload), indent=None)


# --- commands ------------------------------------------------------------------------------


@command("recipes")
def recipes_cmd(
    show: Annotated[Optional[str], typer.Option("--show", help="Print one recipe's YAML.")] = None,
    archs: Annotated[bool, typer.Option("--archs", help="List every named model architecture (sizes, parameters, "
                                                       "advice on patch size and CPU time).")] = False,
) -> None:
    """List the shipped recipes (or print one with --show NAME, or the architectures with --archs)."""
    from dbconvert.config import read_recipe_text, shipped_recipes

    if show:
        text = read_recipe_text(show)[0]
        typer.echo(text, nl=not text.endswith("\n"))  # verbatim: `recipes --show NAME > mine.yaml` is a valid recipe
        return
    if archs:
        architectures_tables()
        return
    table = Table(title="shipped recipes (dbconvert split NAME)")
    table.add_column("name")
    table.add_column("description")
    for name, desc in shipped_recipes().items():
        table.add_row(name, desc)
    console.print(table)


def architectures_tables() -> None:
    """One table per family that names its architectures (through the Family contract), then its notes."""
    from dbconvert.families import family_names, get_family

    for name in family_names():
        listing = get_family(name).architectures()
        if not listing.rows:
            continue
        columns = list(listing.rows[0])
        table = Table(title=listing.title or name, box=None, pad_edge=False)  # fits 80 columns
        for col in columns:
            table.add_column(col, justify="left" if col == columns[0] else "right", no_wrap=col == columns[0])
        for row in listing.rows:
            table.add_row(*(str(row.get(col, "")) for col in columns))
        console.print(table)
        for note in listing.notes:
            console.print(f"- {note}", highlight=False, markup=False)


@command("split")
def split_cmd(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe name or a path to a YAML recipe.")],
    overrides: Overrides = None,
    blocks: Annotated[Optional[int], typer.Option("--blocks", "-b", help="Number of blocks B (overrides blocks.num).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default: the recipe's output.dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run in the output folder.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a checkpoint (or a fresh config) into B diffusion blocks and write the run directory."""
    from dbconvert.config import load_recipe
    from dbconvert.split import split

    if blocks is not None and blocks < 1:
        raise_user(f"--blocks must be at least 1, got {blocks}")
    extra = [f"blocks.num={blocks}"] if blocks is not None else []
    resolved = load_recipe(recipe, [*(overrides or []), *extra])
    run = split(resolved, out=out, force=force, progress=not quiet)
    console.print(blocks_table(run))
    console.print(parameterization_line(run), highlight=False, markup=False, soft_wrap=True)
    for note in run.notes:
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    suffix = resolved.data_suffix() if out is None else None
    why = (f" (named -{suffix} because data.source={resolved.data.source} is not the data of the shipped "
           f"{resolved.name}; --out DIR to choose)") if suffix else ""
    console.print(f"run written to [bold]{run.root}[/]{why} (now the current run); next: dbconvert train-block 0",
                  highlight=False)


@command("info")
def info_cmd(run: RunOpt = None, as_json: Annotated[bool, typer.Option("--json", help="Print the blocks as JSON.")] = False) -> None:
    """Show the current run's blocks: layers, sigma ranges, mass, parameters, training progress."""
    from dbconvert.rundir import resolve_run

    opened = resolve_run(run)
    if as_json:
        typer.echo(json.dumps([b.to_dict() for b in opened.blocks], indent=2))
        return
    console.print(blocks_table(opened))
    console.print(parameterization_line(opened), highlight=False, markup=False, soft_wrap=True)
    for note in opened.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    e2e = opened.status("e2e")
    console.print(f"e2e baseline: {'%d/%s steps' % (e2e.step, e2e.total_steps) if e2e.trained else 'not trained'}")


def _train(run_dir: Optional[Path], index: int | None, overrides: list[str] | None,
           steps: int | None, epochs: float | None, restart: bool, quiet: bool, objective: str = "denoiser") -> None:
    from dbconvert.distributed import from_env
    from dbconvert.rundir import resolve_run
    from dbconvert.train import block_target, e2e_target, train, training_recipe

    run = resolve_run(run_dir)
    target = block_target(run, index) if index is not None else e2e_target(run, objective)  # validates first
    resolved = training_recipe(run, overrides, steps, epochs)  # the values that will be used, --steps included
    what = f"block {index}" if index is not None else {"e2e": "e2e baseline", "ar": "AR reference"}[target.name]
    dist = from_env()  # under torchrun only rank 0 talks
    if dist.is_main:
        announce(f"training {what} of {run.root}", {
            **({"world_size": dist.world_size} if dist.enabled else {}),
            "train": resolved.train.model_dump(mode="json"),
            "objective": target.objective, "layers": run.num_layers if index is None else list(run.block(index).layers),
            "train_range": list(target.train_range),
        })
    result = train(run, target, steps=steps, epochs=epochs, restart=restart, overrides=overrides, progress=not quiet,
                   note=lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True))
    if not dist.is_main:
        return
    loss = f", last logged loss {result.last_loss:.4f}" if result.last_loss is not None else " (already finished)"
    console.print(f"{result.name}: step {result.step}/{result.total_steps}{loss}; weights in {result.directory}")


@command("train-block")
def train_block_cmd(
    index: Annotated[int, typer.Argument(help="Block index, 0 = first layers = highest noise.")],
    overrides: Overrides = None,
    run: RunOpt = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    restart: RestartOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train one block alone on its noise range; resumes from its last checkpoint when rerun."""
    _train(run, index, overrides, steps, epochs, restart, quiet)


@command("train-all")
def train_all_cmd(
    overrides: Overrides = None,
    run: RunOpt = None,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, help="Blocks trained at the same time (one process each).")] = 1,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train every untrained or unfinished block, up to --parallel at a time, one process (and device) each."""
    from dbconvert.rundir import resolve_run
    from dbconvert.train import training_recipe
    from dbconvert.train_all import BUSY, train_all

    opened = resolve_run(run)
    training_recipe(opened, overrides, steps, epochs)  # bad overrides fail here, not in every block's process
    result = train_all(opened, parallel, steps, epochs, overrides, console=console, live=not quiet)
    busy = [j for j in result.jobs if j.state == BUSY]
    if busy:
        console.print(f"left to other processes: {', '.join(f'block {j.index} ({j.detail})' for j in busy)}", highlight=False)
    if result.failed:
        raise_user("; ".join(f"block {j.index} failed ({j.detail or j.returncode}), log {j.log}" for j in result.failed)
                   + " (the other blocks went on; rerun to continue each from its last checkpoint)")
    console.print(f"[bold green]every block of {opened.root} is trained[/]" if not busy
                  else "the other blocks are trained", highlight=False)


@command("train-e2e")
def train_e2e_cmd(
    overrides: Overrides = None,
    run: RunOpt = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    restart: RestartOpt = False,
    quiet: QuietOpt = False,
    objective: Annotated[str, typer.Option("--objective", help="denoiser: the e2e baseline (the blocks' denoiser over "
                                           "all layers and the full sigma range); ar: the autoregressive reference "
                                           "(text), into RUN/ar/.")] = "denoiser",
) -> None:
    """Train the unsplit network end to end (the baseline), matched to the blocks in layer updates."""
    _train(run, None, overrides, steps, epochs, restart, quiet, objective)


@command("sample")
def sample_cmd(
    run: RunOpt = None,
    model: ModelOpt = "blocks",
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Diffusion steps (default: recipe).")] = None,
    solver: Annotated[Optional[str], typer.Option("--solver", help="euler or heun (default: recipe).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale w (1 = none).")] = None,
    num: Annotated[Optional[int], typer.Option("--num", min=1, help="Number of samples.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
    class_label: Annotated[Optional[int], typer.Option("--class", help="Generate this class only.")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="ema or model weights.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: RUN/samples/...).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Text prompt (language models).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="File of prompts, one per line.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Tokens to generate (default 64).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0.0, help="AR decoding (ar, text source): "
                                                         "softmax temperature, 0 = greedy (default: recipe, 1).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="AR decoding: nucleus probability (default: recipe, 1).")] = None,
    protocol: Annotated[Optional[str], typer.Option("--protocol", help="Language models: default (sample.steps steps "
                                                    "per token) or few-step (the later paper's: steps = B, greedy final "
                                                    "token, AR top-p 0.95) (default: recipe's sample.protocol).")] = None,
    context: Annotated[Optional[str], typer.Option("--context", help="Language models: the longest text, recipe "
                                                   "(model.context, default), checkpoint (--model source of a converted "
                                                   "checkpoint: its own max_position_embeddings) or N tokens.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Generate with the trained blocks (or --model e2e / source / ar); writes the samples into the run."""
    from dbconvert.rundir import resolve_run
    from dbconvert.sampling import SampleRequest, check_sampler_choices

    check_sampler_choices(solver, weights)
    opened = resolve_run(run)
    family = opened.family()
    given = {"guidance": guidance, "class_label": class_label, "prompt": prompt, "prompt_file": prompt_file,
             "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "context": context,
             "protocol": protocol}
    options = family.sample_options({"class_label": "--class"}, **{k: v for k, v in given.items() if v is not None})
    request = SampleRequest(model=model, steps=steps, solver=solver, num=num, seed=seed, weights=weights, out=out,
                            options=options, progress=not quiet)
    result = family.generate(opened, request)
    for text in result.text:
        console.print(text, highlight=False, markup=False)
    if result.tokens_per_second is not None:
        console.print(f"{result.tokens_per_second:.1f} new tokens/s", highlight=False)
    console.print(f"wrote {len(result.files)} files to [bold]{result.directory}[/]"
                  + (f" (grid: {result.files[0]})" if result.files and result.files[0].suffix == ".png" else ""))


@command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo run.")] = Path("dbconvert-demo"),
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Training steps per block and for the baseline (default: 1000).")] = None,
    e2e: Annotated[bool, typer.Option("--e2e/--no-e2e", help="Also train the end-to-end baseline (and compare FIDs).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Start over instead of continuing an existing demo run.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """The built-in default: digits, tiny DiT, B=4; split -> train every block -> sample -> e2e -> FID of both."""
    from dbconvert.demo import run_demo

    result = run_demo(out=out, steps=steps, e2e=e2e, force=force, progress=not quiet, console=console)
    console.print(f"[bold green]demo done[/]: run {result.run.root}; samples {result.samples.directory}")
    for path in result.samples.files[:1]:
        console.print(f"look at the grid: {path}")


def raise_user(message: str) -> None:
    raise DbconvertError(message)


# --- bench ---------------------------------------------------------------------------------

bench_app = typer.Typer(help="Measure the claims: training memory and step time of one block vs the whole network.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

RecipeArg = Annotated[str, typer.Argument(help="A shipped recipe name or a path to a YAML recipe.")]
BenchBlocksOpt = Annotated[int, typer.Option("--blocks", "-b", help="Number of blocks B to compare against the whole network.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, ... (default: the recipe's train.device).")]
ContextOpt = Annotated[Optional[int], typer.Option("--context", min=2, help="Text recipes: sequence length "
                                                   "(overrides model.context).")]


def _mib(n: float) -> str:
    mib = n / 2**20
    return f"{mib:,.1f}" if abs(mib) < 100 else f"{mib:,.0f}"


@bench_app.command("memory")
@handle_errors
def bench_memory_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    blocks: BenchBlocksOpt = 4,
    batch: Annotated[Optional[int], typer.Option("--batch", help="Training batch (default: the recipe's train.batch_size).")] = None,
    context: ContextOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    static: Annotated[bool, typer.Option("--static", help="Only the exact bytes of parameters, gradients, optimizer "
                                         "state and EMA, built on the meta device (any size; no activations).")] = False,
) -> None:
    """Peak memory of one training step: each block alone vs the whole network end to end."""
    from dbconvert.bench import bench_memory, bench_static
    from dbconvert.config import load_recipe

    resolved = load_recipe(recipe, [*(overrides or []), *([f"model.context={context}"] if context else [])])
    if static:
        result = bench_static(resolved, blocks)
        if as_json:
            typer.echo(json.dumps(result))
            return
        table = Table(title=f"static training memory, GiB ({result['recipe']}, B={result['blocks']}, meta device)")
        for col in ("network", "layers", "params", "grads", "optim", "EMA", "total"):
            table.add_column(col, justify="left" if col == "network" else "right")
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        for name, row in result["breakdown"].items():
            table.add_row(name, f"{row['layers'][0]}-{row['layers'][1]}", gib(row["parameters"]), gib(row["gradients"]),
                          gib(row["optimizer_state"]), gib(row["ema"]), gib(row["total_bytes"]))
        console.print(table)
        console.print(f"ratio e2e / largest block (static part only): [bold]{result['ratio']:.2f}x[/]")
        return
    progress = None if as_json else (lambda name, res: err_console.print(f"measured {name}: {_mib(res['peak_bytes'])} MiB"))
    result = bench_memory(resolved, blocks, batch, device, on_result=progress)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"peak training-step memory, MiB ({result['recipe']}, {result['layers']} layers, "
                        f"B={result['blocks']}, batch {result['batch']}, {result['device']})")
    cols = ("peak_bytes", "parameters", "gradients", "optimizer_state", "ema", "resident_before_step", "step_peak",
            "saved_activations")
    heads = ("peak", "params", "grads", "optim", "EMA", "held", "step", "saved")
    table.add_column("network")
    table.add_column("layers", justify="right")
    for head in heads:
        table.add_column(head, justify="right")
    for name, row in result["breakdown"].items():
        table.add_row(name, f"{row['layers'][0]}-{row['layers'][1]}", *(_mib(row[c]) for c in cols))
    console.print(table)
    console.print(f"ratio e2e / largest block: [bold]{result['ratio']:.2f}x[/]")
    console.print(f"method: {result['method']}. layers: source layers [start, end). params, grads, optim (optimizer "
                  "state) and EMA are exact tensor bytes; held = measured memory held between steps; step = measured "
                  "growth during the step (activations, gradients, temporaries at its worst moment), peak = held + "
                  "step; saved = bytes autograd kept for backward, exact (a lower bound of step).", highlight=False,
                  soft_wrap=True)


@bench_app.command("speed")
@handle_errors
def bench_speed_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    blocks: BenchBlocksOpt = 4,
    batch: Annotated[Optional[int], typer.Option("--batch", help="Batch of the sampling and training steps (default: the recipe's sample.num).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repetitions per measurement (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")] = 1,
    context: ContextOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    sampling_only: Annotated[bool, typer.Option("--sampling-only", help="Time sampling steps only.")] = False,
) -> None:
    """Seconds per sampling step and per training step: each block vs all layers."""
    from dbconvert.bench import bench_speed
    from dbconvert.config import load_recipe

    resolved = load_recipe(recipe, [*(overrides or []), *([f"model.context={context}"] if context else [])])
    progress = None if as_json else (lambda msg: err_console.print(msg, highlight=False))
    result = bench_speed(resolved, blocks, batch, repeats, warmup, device, on_progress=progress,
                         sampling_only=sampling_only)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"median seconds per step ({result['recipe']}, {result['layers']} layers, B={result['blocks']}, "
                        f"batch {result['batch']}, {result['device']}, {result['threads']} threads)")
    for col in ("network", "sampling step", "training step"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for i, (s, t) in enumerate(zip(result["block_sample_step_s"], result["block_train_step_s"])):
        table.add_row(f"block-{i}", f"{s:.4f}", f"{t:.4f}")
    table.add_row("e2e", f"{result['e2e_sample_step_s']:.4f}", f"{result['e2e_train_step_s']:.4f}")
    console.print(table)
    console.print(f"e2e / slowest block: sampling step [bold]{result['sample_step_ratio']:.2f}x[/], "
                  f"training step [bold]{result['train_step_ratio']:.2f}x[/]  (median of {result['repeats']} after "
                  f"{result['warmup']} warm-up; batch {result['batch']}, guidance {result['guidance']:g})")
    unit = result["unit"]
    console.print(f"generation with {result['sample_steps']} steps per {unit}: blocks {result['block_units_per_s']:.1f} "
                  f"{unit}s/s, e2e {result['e2e_units_per_s']:.1f} {unit}s/s (denoising steps only)", highlight=False)
    console.print(f"the paper's evaluation protocol ({result['protocol_units']:,} {unit}s) at these rates and this batch: "
                  f"blocks {result['block_protocol_hours']:.1f} h, e2e {result['e2e_protocol_hours']:.1f} h "
                  f"on {result['device']}", highlight=False)


# --- ablate --------------------------------------------------------------------------------

ablate_app = typer.Typer(help="The paper's ablations on a small scale: partition (Table 3), overlap gamma (Table 4), "
                              "number of blocks (Table 5); each variant trained and scored by FID.",
                         no_args_is_help=True)
app.add_typer(ablate_app, name="ablate")

AblateStepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="Training steps of every block of every variant (default: the recipe's train.steps).")]
AblateOutOpt = Annotated[Optional[Path], typer.Option("--out", help="Ablation folder, one run per variant (default: runs/RECIPE-ablate-KIND).")]
AblateNumOpt = Annotated[int, typer.Option("--num", min=1, help="FID samples per variant (same sampling seed for all).")]
AblateValuesOpt = Annotated[Optional[str], typer.Option("--values", help="Comma-separated values of the variable instead of the paper's set.")]
AblateForceOpt = Annotated[bool, typer.Option("--force", help="Redo every variant from scratch instead of resuming.")]


def _ablate(kind: str, recipe: str, overrides: Optional[list[str]], steps: Optional[int], out: Optional[Path],
            num: int, values: Optional[str], force: bool, quiet: bool) -> None:
    from dbconvert.ablate import parse_values, rich_table, run_ablation

    result = run_ablation(kind, recipe, overrides, steps=steps, out=out, num=num, values=parse_values(kind, values),
                          force=force, progress=not quiet, console=console)
    console.print(rich_table(result.summary))
    console.print(f"tables written to [bold]{result.markdown}[/] and [bold]{result.json_path}[/]", highlight=False)


@ablate_app.command("partition")
@handle_errors
def ablate_partition_cmd(recipe: RecipeArg, overrides: Overrides = None, steps: AblateStepsOpt = None,
                         out: AblateOutOpt = None, num: AblateNumOpt = 500, values: AblateValuesOpt = None,
                         force: AblateForceOpt = False, quiet: QuietOpt = False) -> None:
    """Equi-probability vs uniform partition of the noise levels, gamma = 0 (the paper's Table 3)."""
    _ablate("partition", recipe, overrides, steps, out, num, values, force, quiet)


@ablate_app.command("overlap")
@handle_errors
def ablate_overlap_cmd(recipe: RecipeArg, overrides: Overrides = None, steps: AblateStepsOpt = None,
                       out: AblateOutOpt = None, num: AblateNumOpt = 500, values: AblateValuesOpt = None,
                       force: AblateForceOpt = False, quiet: QuietOpt = False) -> None:
    """Overlap gamma in {0, 0.05, 0.1, 0.15, 0.2} (the paper's Table 4)."""
    _ablate("overlap", recipe, overrides, steps, out, num, values, force, quiet)


@ablate_app.command("blocks")
@handle_errors
def ablate_blocks_cmd(recipe: RecipeArg, overrides: Overrides = None, steps: AblateStepsOpt = None,
                      out: AblateOutOpt = None, num: AblateNumOpt = 500, values: AblateValuesOpt = None,
                      force: AblateForceOpt = False, quiet: QuietOpt = False) -> None:
    """Number of blocks B in {1, 2, 3, 4, 6} at a fixed depth, matched layer updates (the paper's Table 5).

    A fresh network whose depth not every B divides is deepened to the next multiple of
    their least common multiple (dit-tiny-digits: 8 -> 12 layers); blocks.uneven=true keeps
    the depth with uneven blocks instead.
    """
    _ablate("blocks", recipe, overrides, steps, out, num, values, force, quiet)
