"""`dbconvert ablate`: the paper's three ablations (Tables 3-5) at a size a CPU can run.

    partition   equi-probability vs uniform partition, gamma = 0             (Table 3)
    overlap     gamma in {0, 0.05, 0.1, 0.15, 0.2}                           (Table 4)
    blocks      B in {1, 2, 3, 4, 6} at a fixed depth                        (Table 5)
    memory      fp32 AdamW + EMA vs bf16-true, adamw8bit, EMA off            (ours: what each memory option costs)

Every variant is the same recipe with one setting changed, the same training seed and the
same number of training steps per block, so every variant gets the same number of layer
updates: B blocks x S steps x L/B layers = S x L (the paper's matched layer updates). B = 1
is one block over the whole sigma range: the end-to-end baseline.

Each variant is an ordinary run directory, `OUT/<variant>/`, so an interrupted ablation
resumes: the variant is split only when its run does not exist yet, `train_block` continues
from each block's last checkpoint, and the FID is skipped when the variant's evaluation for
the same samples, sampler and trained steps is already on disk. Each variant is scored with
the evaluation FID (built-in digit features for digits) on the same number of samples with
the same sampling seed; the table goes to `OUT/ablation.md` and `OUT/ablation.json`.

Depth for `blocks` (decided here, documented in docs/evaluation.md, "Ablations"): B in {1, 2, 3, 4, 6} all divide
12 (DiT-S/2's depth, the paper's setting), not 8 (dit-tiny-digits). Unless the recipe sets
`blocks.uneven=true`, a fresh network (no checkpoint) whose depth is not divisible by every
B is deepened to the next multiple of their least common multiple (8 -> 12) through
`model.depth`, and the table says so. With `blocks.uneven=true` the recipe's depth is kept
and the first L mod B blocks get one extra layer. A checkpoint's depth cannot change, and an
explicit `model.depth` override is taken at its word: either one not divisible by every B,
without `blocks.uneven=true`, is a one-line error.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dbconvert.checkpoint import atomic_write_text, write_json
from dbconvert.config import Recipe, load_recipe, parse_overrides
from dbconvert.errors import DbconvertError, RecipeError, RunError
from dbconvert.evaluation.metric import get_metric
from dbconvert.rundir import MANIFEST, Run

KINDS = ("partition", "overlap", "blocks", "memory")

MEMORY_VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "bf16-true": ("train.precision=bf16-true",),
    "adamw8bit": ("train.optimizer=adamw8bit",),
    "ema-off": ("train.ema=off",),
}
"""The memory options `ablate memory` scores against the recipe's own settings (docs/memory.md)."""

DEFAULT_VALUES: dict[str, tuple[Any, ...]] = {
    "partition": ("equiprobable", "uniform"),
    "overlap": (0.0, 0.05, 0.1, 0.15, 0.2),
    "blocks": (1, 2, 3, 4, 6),
    "memory": tuple(MEMORY_VARIANTS),
}
VARIABLE = {"partition": "partition", "overlap": "gamma", "blocks": "B", "memory": "options"}
PAPER_TABLE = {"partition": "Table 3", "overlap": "Table 4", "blocks": "Table 5", "memory": "not in the paper"}
PAPER_FINDING = {
    "partition": "equi-probability beats uniform (gamma = 0)",
    "overlap": "gamma = 0.1 beats 0 and 0.2",
    "blocks": "blocks match or beat end-to-end (B = 1) at matched layer updates",
    "memory": "not in the paper: what each memory option costs against float32 AdamW with EMA",
}
DEFAULT_NUM = 500
VARIANT_RECORD = "ablation-variant.json"
# Settings a rerun may change without invalidating a variant's run (training continues to the new length).
RESUMABLE_KEYS = {
    "train.steps",
    "train.epochs",
    "train.log_every",
    "train.checkpoint_every",
    "train.device",
    "train.compile",
    "train.activation_checkpointing",
}


@dataclass(frozen=True)
class Variant:
    name: str  # folder name, e.g. gamma-0.1
    value: Any  # the variable's value, e.g. 0.1
    overrides: tuple[str, ...]


@dataclass
class Plan:
    kind: str
    variable: str
    variants: list[Variant]
    common: list[str]  # overrides every variant shares (e.g. model.depth=12)
    notes: list[str] = field(default_factory=list)


@dataclass
class AblationResult:
    kind: str
    out: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    markdown: Path
    json_path: Path


Log = Callable[[str], None]


# --- planning ------------------------------------------------------------------------------


def parse_values(kind: str, text: str | None) -> tuple[Any, ...]:
    """`--values 0,0.1` -> the variable's values (the paper's set when not given)."""
    if kind not in KINDS:
        raise DbconvertError(f"unknown ablation {kind!r}; choose one of {', '.join(KINDS)}")
    if text is None:
        return DEFAULT_VALUES[kind]
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise DbconvertError("--values is empty; give a comma-separated list, e.g. --values 0,0.1,0.2")
    out: list[Any] = []
    for item in items:
        if kind == "memory":
            if item not in MEMORY_VARIANTS:
                raise DbconvertError(f"--values for memory must be some of {', '.join(MEMORY_VARIANTS)}, not {item!r}")
            out.append(item)
        elif kind == "partition":
            if item not in DEFAULT_VALUES["partition"]:
                raise DbconvertError(f"--values for partition must be equiprobable and/or uniform, not {item!r}")
            out.append(item)
        elif kind == "overlap":
            try:
                gamma = float(item)
            except ValueError:
                raise DbconvertError(f"--values for overlap must be numbers in [0, 1], not {item!r}") from None
            if not 0.0 <= gamma <= 1.0:
                raise DbconvertError(f"--values for overlap must be in [0, 1], got {gamma:g}")
            out.append(gamma)
        else:
            if not item.isdigit() or int(item) < 1:
                raise DbconvertError(f"--values for blocks must be whole numbers >= 1, not {item!r}")
            out.append(int(item))
    if len(set(out)) != len(out):
        raise DbconvertError(f"--values repeats a value: {text}")
    return tuple(out)


def _depth(recipe: Recipe) -> int:
    from dbconvert.split import source_depth

    return source_depth(recipe)


def _blocks_depth(base: Recipe, overrides: list[str] | None, counts: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """(common overrides, notes) that make every B in `counts` a valid split of the network."""
    from dbconvert.families import get_family

    depth = _depth(base)
    key = get_family(base.model.family).depth_key
    if max(counts) > depth and key is None:
        raise RecipeError(f"B = {max(counts)} exceeds the network's {depth} layers")
    bad = [b for b in counts if depth % b]
    if base.blocks.uneven:
        if max(counts) > depth:
            raise RecipeError(f"B = {max(counts)} exceeds the network's {depth} layers")
        note = (
            f"depth {depth} (the recipe's); blocks.uneven=true: the first L mod B blocks get one more layer"
            if bad
            else f"depth {depth} (the recipe's)"
        )
        return [], [note]
    if not bad and max(counts) <= depth:
        return [], [f"depth {depth} (the recipe's), divisible by every B"]
    explicit = any(path == ["model", key] for path, _ in parse_overrides(overrides))
    lcm = math.lcm(*counts)
    if base.model.checkpoint or explicit or key is None:
        why = "the checkpoint's" if base.model.checkpoint else "the requested"
        raise RecipeError(
            f"B = {', '.join(map(str, bad))} cannot divide {why} {depth} layers; set blocks.uneven=true "
            f"(uneven blocks), or use a depth divisible by {lcm}, or choose --values that divide {depth}"
        )
    new = lcm * math.ceil(depth / lcm)
    return [f"model.{key}={new}"], [
        f"depth {new} instead of the recipe's {depth} (model.{key}={new}) so that every B in "
        f"{{{', '.join(map(str, counts))}}} divides it; blocks.uneven=true keeps {depth} with uneven blocks"
    ]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan_ablation(
    kind: str, base: Recipe, overrides: list[str] | None = None, values: tuple[Any, ...] | None = None
) -> Plan:
    """The variants of one ablation: their folder names and the overrides each adds to the recipe."""
    values = values if values is not None else parse_values(kind, None)
    variable = VARIABLE[kind]
    common: list[str] = []
    notes: list[str] = []
    variants: list[Variant] = []
    if kind == "partition":
        common = ["noise.gamma=0"]
        notes = ["gamma = 0 for both (as in the paper's Table 3)"]
        variants = [Variant(f"partition-{v}", v, (f"noise.partition={v}",)) for v in values]
    elif kind == "overlap":
        notes = [f"partition {base.noise.partition}, B = {base.blocks.num}"]
        variants = [Variant(f"gamma-{_fmt(v)}", v, (f"noise.gamma={v}",)) for v in values]
    elif kind == "memory":
        notes = [f"B = {base.blocks.num}; every variant from the same split weights, seed and steps"]
        variants = [Variant(f"options-{v}", v, MEMORY_VARIANTS[v]) for v in values]
    else:
        common, notes = _blocks_depth(base, overrides, tuple(values))
        variants = [Variant(f"B-{v}", v, (f"blocks.num={v}",)) for v in values]
    return Plan(kind, variable, variants, common, notes)


def default_out(base: Recipe, kind: str) -> Path:
    """runs/<recipe>-ablate-<kind> (beside the recipe's own run folder)."""
    return base.output_dir().parent / f"{base.name}-ablate-{kind}"


def _check_metric(recipe: Recipe, num: int) -> str:
    """The family's default metric, and a one-line error where it cannot score this recipe's variants."""
    from dbconvert.families import get_family

    family = get_family(recipe.model.family)
    get_metric(family.default_metric(recipe)).check(recipe, family, num)
    return family.default_metric(recipe)


# --- one variant ---------------------------------------------------------------------------


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mismatch(existing: Recipe, wanted: Recipe) -> str | None:
    """The first setting (outside sample.* and the resumable train keys) where two recipes differ."""
    a, b = _flat(existing.to_dict()), _flat(wanted.to_dict())
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_KEYS or key.startswith(("sample.", "output.", "description")):
            continue
        if a.get(key) != b.get(key):
            return f"{key} is {a.get(key)!r} there, {b.get(key)!r} now"
    return None


def _open_or_split(recipe: Recipe, folder: Path, force: bool, log: Log) -> Run:
    from dbconvert.split import split

    if (folder / MANIFEST).exists() and not force:
        from dbconvert.families import get_family

        run = Run.open(folder)
        family = get_family(recipe.model.family)
        family.resolve(recipe)  # `auto` settings as split recorded them in the run
        if getattr(recipe.model, "storage_dtype", None) == "auto":  # as split settles it: float32 for a fresh network
            if recipe.model.checkpoint is None:
                recipe.model.storage_dtype = "float32"
            else:
                family.source(recipe)  # the checkpoint's dtype (its headers; no block is read)
        diff = _mismatch(run.recipe, recipe)
        if diff:
            raise RunError(
                f"{folder} holds this variant with other settings ({diff}); "
                "pass --force to redo the ablation or --out DIR for a new one"
            )
        log(f"{folder.name}: continuing the existing run")
        return run
    log(f"{folder.name}: splitting into {recipe.blocks.num} blocks")
    return split(recipe, out=folder, force=force, make_current=False)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


# --- the ablation --------------------------------------------------------------------------


def run_ablation(
    kind: str,
    recipe: str,
    overrides: list[str] | None = None,
    *,
    steps: int | None = None,
    out: Path | None = None,
    num: int = DEFAULT_NUM,
    values: tuple[Any, ...] | None = None,
    force: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> AblationResult:
    """Train and score every variant of ablation `kind` of `recipe`; write and return its table.

    `steps` is the number of training steps of every block of every variant (default: the
    recipe's train.steps). `num` samples per variant, all with the recipe's sampling seed.
    """
    console = console or Console(soft_wrap=True)
    if kind not in KINDS:
        raise DbconvertError(f"unknown ablation {kind!r}; choose one of {', '.join(KINDS)}")
    base = load_recipe(recipe, overrides)
    metric = _check_metric(base, num)
    plan = plan_ablation(kind, base, overrides, values)
    length = [f"train.steps={steps}", "train.epochs=null"] if steps is not None else []
    out = Path(out) if out is not None else default_out(base, kind)
    out.mkdir(parents=True, exist_ok=True)
    recipes = [load_recipe(recipe, [*(overrides or []), *plan.common, *v.overrides, *length]) for v in plan.variants]
    for v, r in zip(plan.variants, recipes):
        if kind == "blocks":
            from dbconvert.split import layer_ranges

            layer_ranges(_depth(r), r.blocks.num, r.blocks.uneven)  # one-line error before any training
    sampler = {
        "solver": base.sample.solver,
        "steps": base.sample.steps,
        "guidance": base.sample.guidance,
        "seed": base.sample.seed,
        "weights": base.sample.weights,
    }

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )

    def log(msg: str) -> None:
        (prog.console if progress else console).print(msg, highlight=False, markup=False)

    rows: list[dict[str, Any]] = []
    started = time.time()
    with prog:
        overall = prog.add_task(f"ablate {kind}", total=len(plan.variants))
        stage = prog.add_task("", total=None)
        for variant, vrecipe in zip(plan.variants, recipes):
            rows.append(
                _run_variant(
                    plan, variant, vrecipe, out / variant.name, steps, num, sampler, force, prog, stage, log, metric
                )
            )
            prog.advance(overall)
        prog.update(stage, visible=False)
    summary = {
        "kind": kind,
        "variable": plan.variable,
        "paper": {"table": PAPER_TABLE[kind], "finding": PAPER_FINDING[kind]},
        "recipe": base.name,
        "overrides": [*(overrides or []), *plan.common, *length],
        "notes": plan.notes,
        "train_seed": base.train.seed,
        "batch_size": base.train.batch_size,
        "sampler": sampler,
        "num_samples": num,
        "features": rows[0]["features"] if rows else None,
        "reference": rows[0]["reference"] if rows else None,
        "metric": metric,
        "best": (min if get_metric(metric).lower_is_better else max)(rows, key=lambda r: r["score"])["value"]
        if rows
        else None,
        "rows": rows,
        "seconds_this_call": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    json_path = out / "ablation.json"
    write_json(json_path, summary)
    md = out / "ablation.md"
    atomic_write_text(md, markdown_table(summary))
    return AblationResult(kind, out, rows, summary, md, json_path)


def _run_variant(
    plan: Plan,
    variant: Variant,
    recipe: Recipe,
    folder: Path,
    steps: int | None,
    num: int,
    sampler: dict[str, Any],
    force: bool,
    prog: Any,
    stage: Any,
    log: Log,
    metric: str,
) -> dict[str, Any]:
    from dbconvert.evaluation import evaluate
    from dbconvert.evaluation.results import write_result
    from dbconvert.train import train_block

    run = _open_or_split(recipe, folder, force, log)
    record_path = folder / VARIANT_RECORD
    record = _read_json(record_path)
    if force or record.get("name") != variant.name:
        record = {"name": variant.name, "train_seconds": {}}
    per_block = steps if steps is not None else recipe.train.steps  # None when the recipe counts epochs
    for block in run.blocks:
        name = Run.block_name(block.index)
        before = run.status(name)
        if per_block is not None and before.step >= per_block:
            continue  # finished: not even its data is loaded again
        prog.update(stage, description=f"{variant.name}: train {name}", total=per_block, completed=before.step)

        def on_step(rec: dict[str, Any]) -> None:
            prog.update(stage, completed=rec["step"])

        t0 = time.time()
        result = train_block(run, block.index, steps=per_block, progress=False, on_step=on_step)
        if result.step != before.step:
            secs = record["train_seconds"].get(name, 0.0) + (time.time() - t0)
            record["train_seconds"][name] = round(secs, 2)
            log(f"{variant.name}: {name} trained to step {result.step}/{result.total_steps}")
        write_json(record_path, record)

    statuses = [run.status(Run.block_name(b.index)) for b in run.blocks]
    trained = [s.step for s in statuses]
    scorer = get_metric(metric)
    fid_key = {"num": num, "sampler": sampler, "trained_steps": trained, "metric": metric}  # record keys kept: resume
    fid_file = folder / "eval" / str(record.get("fid_file", ""))
    if record.get("fid_key") == fid_key and record.get("fid_file") and fid_file.is_file():
        res = _read_json(fid_file)
        log(f"{variant.name}: {scorer.title} already evaluated ({fid_file.name}); skipped")
    else:
        prog.update(stage, description=f"{variant.name}: {scorer.title} on {num} samples", total=None, completed=0)
        res = evaluate(
            run,
            metric,
            model="blocks",
            num=num,
            steps=sampler["steps"],
            solver=sampler["solver"],
            guidance=sampler["guidance"],
            seed=sampler["seed"],
            weights=sampler["weights"],
            log=lambda m: log(f"{variant.name}: {m}"),
        )
        res["trained_steps_per_block"] = trained
        path = write_result(run.root / "eval", res)
        record.update({"fid_file": path.name, "fid_key": fid_key})
        write_json(record_path, record)
        log(f"{variant.name}: {scorer.title} {res['value']:.4f}")
    layers = [b.layers[1] - b.layers[0] for b in run.blocks]
    train_s = sum(record["train_seconds"].values())
    return {
        "variant": variant.name,
        "variable": plan.variable,
        "value": variant.value,
        "metric": metric,
        "score": scorer.headline(res),
        "spread": scorer.spread(res),
        "steps_per_block": trained[0] if len(set(trained)) == 1 else trained,
        "blocks": run.num_blocks,
        "layers": run.num_layers,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "layer_updates": sum(s * n for s, n in zip(trained, layers)),
        "partition": run.manifest["partition"],
        "gamma": run.manifest["gamma"],
        "samples": res["num_samples"],
        "train_seconds": round(train_s, 1),
        "eval_seconds": res["seconds"],
        "seconds": round(train_s + float(res["seconds"]), 1),
        "features": res["features"],
        "reference": res["reference"],
        "run": str(run.root),
    }


# --- tables --------------------------------------------------------------------------------

COLUMNS = ("steps/block", "blocks", "layers/block", "layer updates", "samples", "time")


def _metric_columns(metric: str) -> tuple[str, str]:
    """The metric's headline and the number beside it (FID: KID; MAUVE: its spread over k-means seeds)."""
    scorer = get_metric(metric)
    return scorer.title, scorer.spread_label


def _cells(row: dict[str, Any]) -> list[str]:
    def join(v: Any) -> str:
        return "/".join(map(str, v)) if isinstance(v, list) else str(v)

    return [
        f"{row['score']:.3f}",
        f"{row['spread']:.4f}",
        join(row["steps_per_block"]),
        str(row["blocks"]),
        join(row["layers_per_block"]),
        f"{row['layer_updates']:,}",
        str(row["samples"]),
        f"{row['seconds']:.0f}s",
    ]


def _title(s: dict[str, Any]) -> str:
    paper = s["paper"]
    if paper["table"] == "not in the paper":
        return f"ablate {s['kind']}: {s['recipe']} ({paper['finding']})"
    return f"ablate {s['kind']}: {s['recipe']} ({paper['table']}; paper: {paper['finding']})"


def markdown_table(s: dict[str, Any]) -> str:
    sm = s["sampler"]
    lines = [
        f"### {_title(s)}",
        "",
        f"| {s['variable']} | " + " | ".join((*_metric_columns(s["metric"]), *COLUMNS)) + " |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for row in s["rows"]:
        best = row["value"] == s["best"]
        value = f"**{_fmt(row['value'])}**" if best else _fmt(row["value"])
        lines.append(f"| {value} | " + " | ".join(_cells(row)) + " |")
    lines += [
        "",
        f"{_metric_columns(s['metric'])[0]} ({get_metric(s['metric']).better_text()}; "
        f"best in bold) and {_metric_columns(s['metric'])[1]} on features `{s['features']}` against {s['reference']}; "
        f"{s['num_samples']} samples per variant, {_sampler_text(sm, get_metric(s['metric']))}. Training seed "
        f"{s['train_seed']}, batch {s['batch_size']}; "
        f"every block of every variant trains the same number of steps (matched layer updates). "
        f"Time = training + {get_metric(s['metric']).title} on this machine.",
        f"Settings: {'; '.join(s['notes'])}. Overrides: `{' '.join(s['overrides']) or '(none)'}`.",
        "",
    ]
    return "\n".join(lines)


def _sampler_text(sm: dict[str, Any], metric: Any) -> str:
    """The sampler settings the metric used (a bound such as bpc's takes no steps, solver or guidance)."""
    parts = []
    if metric.accepts("steps"):
        parts.append(f"{sm['solver']} {sm['steps']} steps" if metric.accepts("solver") else f"{sm['steps']} steps")
    if metric.accepts("guidance") and sm.get("guidance") is not None:
        parts.append(f"guidance {sm['guidance']:g}")
    return ", ".join([*parts, f"{sm['weights']} weights", f"sampling seed {sm['seed']}"])


def rich_table(s: dict[str, Any]) -> Table:
    table = Table(
        title=_title(s),
        caption=f"features {s['features']}; {s['num_samples']} samples, sampling seed "
        f"{s['sampler']['seed']}; {'; '.join(s['notes'])}",
    )
    table.add_column(s["variable"])
    for col in (*_metric_columns(s["metric"]), *COLUMNS):
        table.add_column(col, justify="right")
    for row in s["rows"]:
        style = "bold green" if row["value"] == s["best"] else None
        table.add_row(_fmt(row["value"]), *_cells(row), style=style)
    return table
