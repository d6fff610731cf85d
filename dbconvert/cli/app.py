"""The Typer app: each command parses and validates, then calls one library function.

Errors a user can cause are `DbconvertError`s; `handle_errors` prints them as one line and
exits with status 2, with no traceback. So is a file-system error of any command (no permission, a read-only
file system, a full disk, a file where a folder is expected), worded by `errors.file_system_error`.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from dbconvert.cli.options import (
    EpochsOpt,
    ModelOpt,
    Overrides,
    QuietOpt,
    RestartOpt,
    RunOpt,
    SampleStepsOpt,
    SeedOpt,
    SolverOpt,
    TrainStepsOpt,
    WeightsOpt,
    in_range,
    tidy_help,
)
from dbconvert.errors import DbconvertError, file_system_error
from dbconvert.schema import MAX_TRAIN_STEPS

DYNAMIC_COMMANDS: dict[str, Callable[[], Any]] = {}
"""Commands built when the command line is read (`sample`: its flags come from the registered families)."""


class OneLineErrors(TyperGroup):
    """The command group: a command-line parse error (unknown option, bad value, missing argument) is one
    `error: ...` line on stderr and exit status 2, like every other user error, instead of a box of usage text."""

    listing = False
    """True while the group's own help is drawn: a command's line there needs its short help only, so a dynamic
    command stays its static placeholder (building `sample` would import every family, torch and timm)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in DYNAMIC_COMMANDS and not self.listing:
            return tidy_help(DYNAMIC_COMMANDS[cmd_name]())
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False

    def main(
        self,
        args: Any = None,
        prog_name: Any = None,
        complete_var: Any = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        import sys

        tidy_help(self)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)  # returns an Exit's status
        except CLICK_ERRORS as exc:
            if "NoArgsIsHelpError" in {cls.__name__ for cls in type(exc).__mro__}:
                from typer import rich_utils  # `dbconvert` alone: the help, shown as Typer shows it

                rich_utils.rich_format_error(exc)
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            err_console.print(Text.assemble(("error:", "bold red"), f" {message}{where}"), highlight=False)
            sys.exit(2)
        except ABORTS:
            err_console.print("aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


CLICK_ERRORS = tuple(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
"""The ClickException of the click Typer uses (click itself, or the copy newer Typers carry), reached through
Typer's public BadParameter so that either works."""
ABORTS = (typer.Abort,)


app = typer.Typer(
    cls=OneLineErrors,
    name="dbconvert",
    help="Turn residual networks (DiT, ViT, Llama-style, masked-diffusion and recurrent-depth LMs, or a family you "
    "register) into diffusion blocks, train each "
    "block alone, sample, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)
"""soft_wrap: long lines (paths, JSON, messages) are never cut into pieces at 80 columns when the output is
redirected; a terminal wraps them itself. Tables are still laid out to the terminal's width.
markup=False: text is printed literally, never read as Rich markup (a prompt `[/INST] ...`, a path with
`[/b]`, `pip install "dbconvert[tensorboard]"`); styles are given as `Text` (see `bold`)."""


def print_table(table: Any, to: Console | None = None) -> None:
    """Print a table; when the output is not a terminal (a pipe, a file), as wide as its content needs, so no
    number is ever cut to `112,778,…` at the 80 columns rich assumes there. A terminal gets its own width."""
    to = to or console
    from rich.measure import Measurement

    if to.is_terminal:
        to.print(table)
        return
    natural = Measurement.get(to, to.options.update_width(1_000_000), table).maximum  # unconstrained width
    wide = Console(
        file=to.file, width=max(to.width, natural), markup=False, soft_wrap=True, color_system=to.color_system
    )  # type: ignore[arg-type]
    wide.print(table)


def bold(text: object, style: str = "bold") -> Text:
    """`text` in a style, literally (no markup is read in it)."""
    return Text(str(text), style=style)


F = TypeVar("F", bound=Callable[..., Any])


def print_error(exc: BaseException) -> None:
    """`error: MESSAGE` on stderr, one line."""
    err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)


def handle_errors(func: F) -> F:
    """Turn user errors into one red line on stderr and exit code 2: `DbconvertError`s, and the OSErrors of the
    user's file system (any other OSError is a bug and keeps its traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DbconvertError as exc:
            print_error(exc)
            raise typer.Exit(2) from None
        except OSError as exc:
            user = file_system_error(exc)
            if user is None:
                raise
            print_error(user)
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


def version_line() -> str:
    """`dbconvert --version`: ours, and the versions a bug report needs, read from the installed metadata (no torch
    import, so it answers at once)."""
    import platform
    from importlib import metadata

    from dbconvert import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "timm"))
    return f"dbconvert {__version__} (python {platform.python_version()}, {libs})"


def show_version(value: bool) -> None:
    if value:
        console.print(version_line(), highlight=False)
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=show_version,
            is_eager=True,
            help="Print the version (and torch's, transformers', timm's) and exit.",
        ),
    ] = False,
) -> None:
    """Turn residual networks into diffusion blocks, train each block alone, sample, evaluate."""


def main() -> None:
    """Console-script entry point."""
    app()


# --- output helpers ------------------------------------------------------------------------


def _fmt_range(r: tuple[float, float] | list[float]) -> str:
    return f"{r[0]:.4g} – {r[1]:.4g}"


def blocks_table(run: Any) -> Table:
    from dbconvert.rundir import Run

    table = Table(
        title=f"{run.root}  ({run.family_name}, {run.num_layers} layers, {run.num_blocks} blocks, "
        f"{run.manifest['partition']}, gamma={run.manifest['gamma']})"
    )
    level = run.noise().level_name
    for col in ("block", "layers", f"owned {level}", f"training {level}", "mass", "params", "trained steps"):
        table.add_column(col, justify="right" if col in ("mass", "params", "trained steps") else "left")
    for b in run.blocks:
        status = run.status(Run.block_name(b.index))
        steps = f"{status.step}/{status.total_steps}" if status.total_steps else "-"
        table.add_row(
            str(b.index),
            f"[{b.layers[0]}, {b.layers[1]})",
            _fmt_range(b.owned_range),
            _fmt_range(b.train_range),
            f"{b.mass:.4f}",
            f"{b.params:,}",
            steps,
        )
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
    """Print the resolved configuration before a long run starts (a title wider than the terminal is a plain
    line: a rule would cut it, the run's path included, with an ellipsis)."""
    if len(title) + 6 > console.width:
        console.print(bold(title), soft_wrap=True)
    else:
        console.rule(bold(title))
    console.print_json(json.dumps(payload), indent=None)


# --- commands ------------------------------------------------------------------------------


@command("recipes")
def recipes_cmd(
    show: Annotated[Optional[str], typer.Option("--show", help="Print one recipe's YAML.")] = None,
    archs: Annotated[
        bool,
        typer.Option(
            "--archs",
            help="List every named model architecture (sizes, parameters, advice on patch size and CPU time).",
        ),
    ] = False,
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
    print_table(table)


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
        print_table(table)
        for note in listing.notes:
            console.print(f"- {note}", highlight=False, markup=False)


@command("split")
def split_cmd(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe name or a path to a YAML recipe.")],
    overrides: Overrides = None,
    blocks: Annotated[
        Optional[int], typer.Option("--blocks", "-b", help="Number of blocks B (overrides blocks.num).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Run directory (default: the recipe's output.dir).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run in the output folder.")] = False,
    copy_source: Annotated[
        bool,
        typer.Option(
            "--copy-source",
            help="Keep a copy of the converted source inside the run "
            "(a self-contained folder); by default the run points at the checkpoint.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a checkpoint (or a fresh config) into B diffusion blocks and write the run directory.

    A checkpoint is streamed: each block is read from it, written and freed in turn (peak memory about one block).
    """
    from dbconvert.config import load_recipe
    from dbconvert.split import split

    if blocks is not None and blocks < 1:
        raise_user(f"--blocks must be at least 1, got {blocks}")
    extra = [f"blocks.num={blocks}"] if blocks is not None else []
    resolved = load_recipe(recipe, [*(overrides or []), *extra])
    run = split(resolved, out=out, force=force, progress=not quiet, copy_source=copy_source)
    print_table(blocks_table(run))
    console.print(parameterization_line(run), highlight=False, markup=False, soft_wrap=True)
    for note in run.notes:
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    suffix = resolved.data_suffix() if out is None else None
    why = (
        (
            f" (named -{suffix} because data.source={resolved.data.source} is not the data of the shipped "
            f"{resolved.name}; --out DIR to choose)"
        )
        if suffix
        else ""
    )
    console.print(
        Text.assemble("run written to ", bold(run.root), f"{why} (now the current run); next: dbconvert train-block 0"),
        highlight=False,
    )


@command("info")
def info_cmd(
    run: RunOpt = None, as_json: Annotated[bool, typer.Option("--json", help="Print the blocks as JSON.")] = False
) -> None:
    """Show the current run's blocks: layers, sigma ranges, mass, parameters, training progress."""
    from dbconvert.rundir import resolve_run
    from dbconvert.source_ref import describe as describe_source

    opened = resolve_run(run)
    if as_json:
        typer.echo(json.dumps([b.to_dict() for b in opened.blocks], indent=2))
        return
    print_table(blocks_table(opened))
    console.print(parameterization_line(opened), highlight=False, markup=False, soft_wrap=True)
    console.print(describe_source(opened), highlight=False, markup=False, soft_wrap=True)
    for note in opened.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    e2e = opened.status("e2e")
    console.print(f"e2e baseline: {'%d/%s steps' % (e2e.step, e2e.total_steps) if e2e.trained else 'not trained'}")


def _train(
    run_dir: Optional[Path],
    index: int | None,
    overrides: list[str] | None,
    steps: int | None,
    epochs: float | None,
    restart: bool,
    quiet: bool,
    objective: str = "denoiser",
) -> None:
    from dbconvert.devices import busy_cpu_note, resolve_device
    from dbconvert.distributed import from_env
    from dbconvert.optimizers import describe
    from dbconvert.rundir import resolve_run
    from dbconvert.train import block_target, e2e_target, train, training_recipe

    run = resolve_run(run_dir)
    target = block_target(run, index) if index is not None else e2e_target(run, objective)  # validates first
    resolved = training_recipe(run, overrides, steps, epochs)  # the values that will be used, --steps included
    what = (
        f"block {index}"
        if index is not None
        else "e2e baseline"
        if target.name == "e2e"
        else f"{run.family().reference_title} ({target.name})"
    )
    dist = from_env()  # under torchrun only rank 0 talks
    if dist.is_main:
        announce(
            f"training {what} of {run.root}",
            {
                **({"world_size": dist.world_size} if dist.enabled else {}),
                "train": resolved.train.model_dump(mode="json"),
                "objective": target.objective,
                "layers": run.num_layers if index is None else list(run.block(index).layers),
                "train_range": list(target.train_range),
            },
        )
        t = resolved.train
        micro = t.batch_size // t.grad_accumulation
        batch = (
            f"effective batch {t.batch_size} = {t.grad_accumulation} x {micro}"
            if t.grad_accumulation > 1
            else f"batch {t.batch_size}"
        )
        if not quiet:
            console.print(f"memory options: {describe(t)}; {batch}", highlight=False, markup=False)
            busy = busy_cpu_note(resolve_device(t.device))
            if busy:
                console.print(busy, highlight=False, markup=False)
    result = train(
        run,
        target,
        steps=steps,
        epochs=epochs,
        restart=restart,
        overrides=overrides,
        progress=not quiet,
        note=lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True),
    )
    if not dist.is_main:
        return
    loss = f", last logged loss {result.last_loss:.4f}" if result.last_loss is not None else " (already finished)"
    console.print(f"{result.name}: step {result.step}/{result.total_steps}{loss}; weights in {result.directory}")


@command("train-block")
def train_block_cmd(
    index: Annotated[int, typer.Argument(help="Block index, 0 = first layers = highest noise.")],
    overrides: Overrides = None,
    run: RunOpt = None,
    steps: TrainStepsOpt = None,
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
    parallel: Annotated[
        int, typer.Option("--parallel", "-p", min=1, help="Blocks trained at the same time (one process each).")
    ] = 1,
    steps: TrainStepsOpt = None,
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
        console.print(
            f"left to other processes: {', '.join(f'block {j.index} ({j.detail})' for j in busy)}", highlight=False
        )
    if result.failed:
        raise_user(
            "; ".join(f"block {j.index} failed ({j.detail or j.returncode}), log {j.log}" for j in result.failed)
            + " (the other blocks went on; rerun to continue each from its last checkpoint)"
        )
    console.print(
        bold(f"every block of {opened.root} is trained", "bold green") if not busy else "the other blocks are trained",
        highlight=False,
    )


@command("train-e2e")
def train_e2e_cmd(
    overrides: Overrides = None,
    run: RunOpt = None,
    steps: TrainStepsOpt = None,
    epochs: EpochsOpt = None,
    restart: RestartOpt = False,
    quiet: QuietOpt = False,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="denoiser: the e2e baseline (the blocks' denoiser over "
            "all layers and the full sigma range); ar: the autoregressive reference "
            "(text), into RUN/ar/; classifier: the plain classifier (ViT), into "
            "RUN/classifier/.",
        ),
    ] = "denoiser",
) -> None:
    """Train the unsplit network end to end (the baseline), matched to the blocks in layer updates."""
    _train(run, None, overrides, steps, epochs, restart, quiet, objective)


SAMPLE_SHARED = [
    ("run", RunOpt, None),
    ("model", ModelOpt, "blocks"),
    ("steps", SampleStepsOpt, None),
    ("solver", SolverOpt, None),
    ("num", Annotated[Optional[int], typer.Option("--num", min=1, help="Number of samples.")], None),
    ("seed", SeedOpt, None),
    ("weights", WeightsOpt, None),
    ("out", Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: RUN/samples/...).")], None),
    ("quiet", QuietOpt, False),
]
"""The options of `dbconvert sample` every family shares; each family's own come from its `sample_options_type`."""


def family_sample_flags() -> dict[str, tuple[Any, list[str]]]:
    """option name -> (its `SampleFlag`, the registered families that take it), over every registered family."""
    from dbconvert.families import family_names, sample_options_type
    from dbconvert.families.sample_options import sample_flags

    out: dict[str, tuple[Any, list[str]]] = {}
    for name in family_names():
        for flag in sample_flags(sample_options_type(name)):
            out.setdefault(flag.name, (flag, []))[1].append(name)
    return out


def run_sample(
    run: Optional[Path],
    model: str,
    steps: Optional[int],
    solver: Optional[str],
    num: Optional[int],
    seed: Optional[int],
    weights: Optional[str],
    out: Optional[Path],
    quiet: bool,
    flags: dict[str, str],
    **given: Any,
) -> None:
    """What `dbconvert sample` does: resolve the run, build its family's options (an option of another family is
    one line), generate, report."""
    from dbconvert.rundir import resolve_run
    from dbconvert.sampling import SampleRequest, check_sampler_choices

    check_sampler_choices(solver, weights)
    opened = resolve_run(run)
    family = opened.family()
    options = family.sample_options(flags, **{k: v for k, v in given.items() if v is not None})
    request = SampleRequest(
        model=model,
        steps=steps,
        solver=solver,
        num=num,
        seed=seed,
        weights=weights,
        out=out,
        options=options,
        progress=not quiet,
    )
    result = family.generate(opened, request)
    for k, text in enumerate(result.text):  # completions hold newlines: each under its own numbered rule
        if len(result.text) > 1:
            console.print(f"--- sample {k + 1}/{len(result.text)} ---", highlight=False, markup=False)
        console.print(text, highlight=False, markup=False)
    if result.tokens_per_second is not None and not quiet:  # a measurement, not a result: stderr
        err_console.print(f"{result.tokens_per_second:.1f} new tokens/s", highlight=False)
    console.print(
        Text.assemble(
            f"wrote {len(result.files)} files to ",
            bold(result.directory),
            (f" (grid: {result.files[0]})" if result.files and result.files[0].suffix == ".png" else ""),
        )
    )


SAMPLE_HELP = (
    "Generate with the trained blocks (or --model e2e / source / the family's reference); writes the samples "
    "into the run. The options after --quiet are the families' own (`Family.sample_options_type`), each "
    "marked with the families that take it; `sample --help` on a run shows that run's family's only."
)


def sample_function(with_families: bool = True) -> Callable[..., None]:
    """The function behind `dbconvert sample`: the shared options, then every registered family's own."""
    from dbconvert.cli.options import option_parameter

    own = family_sample_flags() if with_families else {}
    flags = {name: flag.flag for name, (flag, _) in own.items()}

    def sample(**kwargs: Any) -> None:
        shared = {name: kwargs.pop(name) for name, _, _ in SAMPLE_SHARED}
        run_sample(**shared, flags=flags, **kwargs)

    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in SAMPLE_SHARED
    ]
    params += [option_parameter(flag, help=f"{flag.help} ({', '.join(names)} runs)") for flag, names in own.values()]
    sample.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    sample.__doc__ = SAMPLE_HELP
    sample.family_options = {name: names for name, (_, names) in own.items()}  # type: ignore[attr-defined]
    return sample


def run_family(args: list[str]) -> str | None:
    """The family of the run a command line names (--run DIR, else the current run), or None when there is none."""
    from dbconvert.rundir import recorded_family, run_root

    run = next((a.split("=", 1)[1] for a in args if a.startswith("--run=")), None)
    if run is None and "--run" in args[:-1]:
        run = args[args.index("--run") + 1]
    try:
        return recorded_family(run_root(run))
    except DbconvertError:
        return None


def sample_command() -> Any:
    """`dbconvert sample` as a click command, built when the command line is read (so a family registered at run
    time brings its flags); its --help on a run hides the options of the other families."""
    func = sample_function()
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    sub.command("sample")(handle_errors(func))
    cmd = typer.main.get_command(sub)
    parse = cmd.parse_args

    def parse_args(ctx: Any, args: list[str]) -> list[str]:
        family = run_family(args) if "--help" in args else None
        if family is not None:
            for param in cmd.params:
                names = func.family_options.get(param.name)  # type: ignore[attr-defined]
                if names is not None and family not in names:
                    param.hidden = True  # type: ignore[attr-defined]
            cmd.help = (
                SAMPLE_HELP.split(" The options after")[0] + f" Options of this {family} run's family follow --quiet."
            )
        return parse(ctx, args)

    cmd.parse_args = parse_args  # type: ignore[method-assign]
    return cmd


app.command("sample", help=SAMPLE_HELP)(handle_errors(sample_function(with_families=False)))  # its place in the list
DYNAMIC_COMMANDS["sample"] = sample_command


@command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo run.")] = Path("dbconvert-demo"),
    steps: Annotated[
        Optional[int],
        typer.Option(
            "--steps",
            callback=in_range(1, MAX_TRAIN_STEPS),
            help="Training steps per block and for the baseline (default: 1000).",
        ),
    ] = None,
    e2e: Annotated[
        bool, typer.Option("--e2e/--no-e2e", help="Also train the end-to-end baseline (and compare FIDs).")
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Start over instead of continuing an existing demo run.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """The built-in default: digits, tiny DiT, B=4; split -> train every block -> sample -> e2e -> FID of both."""
    from dbconvert.demo import run_demo

    result = run_demo(out=out, steps=steps, e2e=e2e, force=force, progress=not quiet, console=console)
    console.print(
        Text.assemble(
            bold("demo done", "bold green"),
            f": run {result.run.root} (the lines above name its grids, figures and what the FIDs mean)",
        )
    )


def raise_user(message: str) -> None:
    raise DbconvertError(message)


# --- bench ---------------------------------------------------------------------------------

bench_app = typer.Typer(
    help="Measure the claims: training memory and step time of one block vs the whole network.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")

RecipeArg = Annotated[str, typer.Argument(help="A shipped recipe name or a path to a YAML recipe.")]
BenchBlocksOpt = Annotated[
    int, typer.Option("--blocks", "-b", help="Number of blocks B to compare against the whole network.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="cpu, cuda, ... (default: the recipe's train.device).")
]
ContextOpt = Annotated[
    Optional[int], typer.Option("--context", min=2, help="Text recipes: sequence length (overrides model.context).")
]


CheckpointingOpt = Annotated[
    bool,
    typer.Option(
        "--checkpointing/--no-checkpointing",
        help="Also measure the deepest "
        "block and the whole network with train.activation_checkpointing "
        "(and, for families with one, the same network as a plain causal LM "
        "without and with it).",
    ),
]
EveryBlockOpt = Annotated[
    bool,
    typer.Option(
        "--every-block/--deepest-block",
        help="Measure every block of the split, or only the deepest one (blocks of equal depth cost the same).",
    ),
]


SkipOpt = Annotated[
    Optional[list[str]],
    typer.Option("--skip", help="A network not to measure, e.g. e2e when it would not fit in memory (repeatable)."),
]


def _print_report(lines: list) -> None:
    """A bench report: its tables as wide as their numbers, its lines literally."""
    for line in lines:
        if isinstance(line, Table):
            print_table(line)
        else:
            console.print(line, highlight=False, soft_wrap=True)


@bench_app.command("memory")
@handle_errors
def bench_memory_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    blocks: BenchBlocksOpt = 4,
    batch: Annotated[
        Optional[int], typer.Option("--batch", help="Training batch (default: the recipe's train.batch_size).")
    ] = None,
    context: ContextOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    static: Annotated[
        bool,
        typer.Option(
            "--static",
            help="Only the exact bytes of parameters, gradients, optimizer "
            "state and EMA, built on the meta device (any size; no activations).",
        ),
    ] = False,
    checkpointing: CheckpointingOpt = True,
    every_block: EveryBlockOpt = True,
    skip: SkipOpt = None,
    options: Annotated[
        bool,
        typer.Option(
            "--options",
            help="With --static: the static bytes of the deepest block "
            "and of e2e under each memory option (bf16-true, adamw8bit, EMA on the CPU "
            "or off, optimizer in backward), with bytes a parameter.",
        ),
    ] = False,
    fit_size: Annotated[
        Optional[str],
        typer.Option(
            "--fit",
            help="A memory size (24GiB, 80GB; G = GiB): the smallest "
            "B whose block fits, per memory option, beside e2e and "
            "e2e+checkpointing (static tensors + measured activations).",
        ),
    ] = None,
    headroom: Annotated[
        float,
        typer.Option(
            "--headroom", help="With --fit: the share of the size kept free for temporaries and allocator slack."
        ),
    ] = 0.10,
) -> None:
    """Peak memory of one training step: each block alone vs the whole network end to end, with and without
    activation checkpointing; --options: what each memory option holds; --fit SIZE: which B fits."""
    from dbconvert.bench import bench_memory, bench_static, memory_report, static_report
    from dbconvert.config import load_recipe

    if fit_size is not None:
        from dbconvert.bench_fit import fit, fit_report, parse_size

        budget = parse_size(fit_size)
        if static or options or skip:
            raise DbconvertError("--fit estimates every B itself: drop --static, --options and --skip")
        result = fit(load_recipe(recipe, list(overrides or [])), budget, batch, context, headroom)
        if as_json:
            typer.echo(json.dumps(result))
            return
        _print_report(fit_report(result))
        return
    if static:  # the meta device holds no activations: what sets them, or where they would live, does not apply
        given = [flag for flag, value in (("--batch", batch), ("--device", device)) if value is not None]
        if given:
            raise DbconvertError(
                f"{given[0]} does not apply to --static (exact tensor bytes on the meta device, no "
                "activations); drop it, or drop --static to measure a step"
            )
    if options and skip:
        raise DbconvertError("--options gives the deepest block and e2e under each memory option; drop --skip")
    resolved = load_recipe(recipe, [*(overrides or []), *([f"model.context={context}"] if context else [])])
    if options:
        from dbconvert.bench_fit import option_table, options_report

        if not static:
            raise DbconvertError(
                "--options gives the static figures (add --static); a measured step of one option "
                "is `bench memory RECIPE train.precision=bf16-true ...`"
            )
        result = option_table(resolved, blocks)
        if as_json:
            typer.echo(json.dumps(result))
            return
        _print_report(options_report(result))
        return
    if static:
        result = bench_static(resolved, blocks, checkpointing, every_block, skip=tuple(skip or ()))
        if as_json:
            typer.echo(json.dumps(result))
            return
        _print_report(static_report(result))
        return
    progress = (
        None
        if as_json
        else (
            lambda name, res: err_console.print(
                f"measured {name}: {res['peak_bytes'] / 2**20:,.1f} MiB", highlight=False
            )
        )
    )
    result = bench_memory(
        resolved,
        blocks,
        batch,
        device,
        on_result=progress,
        checkpointing=checkpointing,
        every_block=every_block,
        skip=tuple(skip or ()),
    )
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_report(memory_report(result))


@bench_app.command("split")
@handle_errors
def bench_split_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    blocks: BenchBlocksOpt = 2,
    dtype: Annotated[
        str, typer.Option("--dtype", help="dtype of the random checkpoint: bfloat16, float16 or float32.")
    ] = "bfloat16",
    train: Annotated[
        bool,
        typer.Option(
            "--train/--no-train",
            help="Also train the deepest block one step (skipped, "
            "with its static figure, when that cannot fit in the memory available).",
        ),
    ] = True,
    batch: Annotated[int, typer.Option("--batch", help="Batch of the training step.")] = 1,
    context: ContextOpt = None,
    directory: Annotated[
        Optional[Path],
        typer.Option(
            "--dir",
            help="Where the scratch checkpoint and run go (default: "
            "here); it needs about twice the checkpoint's size free.",
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the scratch folder (checkpoint and run) afterwards.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a random checkpoint of the recipe's size (e.g. tinyllama-1.1b-shape), split it and train one block
    step in fresh processes: wall time, peak RSS, run size on disk."""
    from dbconvert.bench_split import bench_split, split_report
    from dbconvert.config import load_recipe

    resolved = load_recipe(recipe, list(overrides or []))
    progress = None if as_json else (lambda msg: err_console.print(msg, highlight=False, markup=False))
    result = bench_split(resolved, blocks, dtype, train, batch, context, directory, keep, on_progress=progress)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_report(split_report(result))


@bench_app.command("speed")
@handle_errors
def bench_speed_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    blocks: BenchBlocksOpt = 4,
    batch: Annotated[
        Optional[int],
        typer.Option("--batch", help="Batch of the sampling and training steps (default: the recipe's sample.num)."),
    ] = None,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed repetitions per measurement (the median is reported).")
    ] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")] = 1,
    context: ContextOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    sampling_only: Annotated[bool, typer.Option("--sampling-only", help="Time sampling steps only.")] = False,
    checkpointing: CheckpointingOpt = True,
    every_block: EveryBlockOpt = True,
    skip: SkipOpt = None,
    decoding: Annotated[
        bool,
        typer.Option(
            "--decoding/--no-decoding",
            help="Text: also time whole decodes, blocks at the few-step protocol vs AR decoding (KV cache both).",
        ),
    ] = True,
    decode_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--decode-tokens",
            help="New tokens per row of the decoding rows (default: up to 64, what the context leaves after "
            "a quarter-context prompt).",
        ),
    ] = None,
) -> None:
    """Seconds per sampling step and per training step: each block vs all layers, with and without checkpointing."""
    from dbconvert.bench import bench_speed, speed_report
    from dbconvert.config import load_recipe

    resolved = load_recipe(recipe, [*(overrides or []), *([f"model.context={context}"] if context else [])])
    progress = None if as_json else (lambda msg: err_console.print(msg, highlight=False))
    result = bench_speed(
        resolved,
        blocks,
        batch,
        repeats,
        warmup,
        device,
        on_progress=progress,
        sampling_only=sampling_only,
        checkpointing=checkpointing,
        every_block=every_block,
        skip=tuple(skip or ()),
        decoding=decoding,
        decode_tokens=decode_tokens,
    )
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_report(speed_report(result))


# --- ablate --------------------------------------------------------------------------------

ablate_app = typer.Typer(
    help="The paper's ablations on a small scale: partition (Table 3), overlap gamma (Table 4), "
    "number of blocks (Table 5); each variant trained and scored by its family's default metric (FID for DiT).",
    no_args_is_help=True,
)
app.add_typer(ablate_app, name="ablate")

AblateStepsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--steps",
        callback=in_range(1, MAX_TRAIN_STEPS),
        help="Training steps of every block of every variant (default: the recipe's train.steps).",
    ),
]
AblateOutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", help="Ablation folder, one run per variant (default: runs/RECIPE-ablate-KIND)."),
]
AblateNumOpt = Annotated[
    int, typer.Option("--num", min=1, help="Samples the metric scores per variant (same sampling seed for all).")
]
AblateValuesOpt = Annotated[
    Optional[str], typer.Option("--values", help="Comma-separated values of the variable instead of the paper's set.")
]
AblateForceOpt = Annotated[bool, typer.Option("--force", help="Redo every variant from scratch instead of resuming.")]


def _ablate(
    kind: str,
    recipe: str,
    overrides: Optional[list[str]],
    steps: Optional[int],
    out: Optional[Path],
    num: int,
    values: Optional[str],
    force: bool,
    quiet: bool,
) -> None:
    from dbconvert.ablate import parse_values, rich_table, run_ablation

    result = run_ablation(
        kind,
        recipe,
        overrides,
        steps=steps,
        out=out,
        num=num,
        values=parse_values(kind, values),
        force=force,
        progress=not quiet,
        console=console,
    )
    print_table(rich_table(result.summary))
    console.print(
        Text.assemble("tables written to ", bold(result.markdown), " and ", bold(result.json_path)), highlight=False
    )


@ablate_app.command("partition")
@handle_errors
def ablate_partition_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    steps: AblateStepsOpt = None,
    out: AblateOutOpt = None,
    num: AblateNumOpt = 500,
    values: AblateValuesOpt = None,
    force: AblateForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Equi-probability vs uniform partition of the noise levels, gamma = 0 (the paper's Table 3)."""
    _ablate("partition", recipe, overrides, steps, out, num, values, force, quiet)


@ablate_app.command("overlap")
@handle_errors
def ablate_overlap_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    steps: AblateStepsOpt = None,
    out: AblateOutOpt = None,
    num: AblateNumOpt = 500,
    values: AblateValuesOpt = None,
    force: AblateForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Overlap gamma in {0, 0.05, 0.1, 0.15, 0.2} (the paper's Table 4)."""
    _ablate("overlap", recipe, overrides, steps, out, num, values, force, quiet)


@ablate_app.command("blocks")
@handle_errors
def ablate_blocks_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    steps: AblateStepsOpt = None,
    out: AblateOutOpt = None,
    num: AblateNumOpt = 500,
    values: AblateValuesOpt = None,
    force: AblateForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Number of blocks B in {1, 2, 3, 4, 6} at a fixed depth, matched layer updates (the paper's Table 5).

    A fresh network whose depth not every B divides is deepened to the next multiple of
    their least common multiple (dit-tiny-digits: 8 -> 12 layers); blocks.uneven=true keeps
    the depth with uneven blocks instead.
    """
    _ablate("blocks", recipe, overrides, steps, out, num, values, force, quiet)


@ablate_app.command("memory")
@handle_errors
def ablate_memory_cmd(
    recipe: RecipeArg,
    overrides: Overrides = None,
    steps: AblateStepsOpt = None,
    out: AblateOutOpt = None,
    num: AblateNumOpt = 500,
    values: AblateValuesOpt = None,
    force: AblateForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The memory options against float32 AdamW with EMA: fp32, bf16-true, adamw8bit, ema-off (not in the paper)."""
    _ablate("memory", recipe, overrides, steps, out, num, values, force, quiet)
