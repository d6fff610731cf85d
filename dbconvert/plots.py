"""Figures of a run, written as PNG files into RUN/plots/, so a run can be looked at, not read.

- `partition`: the training density over ln(sigma), each block's owned range (shaded) and its
  overlap-expanded training range (a bar above), with its probability mass (the paper's Figure 2);
  optionally equi-probability and uniform side by side.
- `loss`: every block's and the e2e baseline's loss curves from RUN/metrics/*.jsonl.
- `eval`: every RUN/eval/*.json result, one panel per (metric, features), since numbers computed
  with different features are not comparable.
- `samples`: the sample grids of RUN/samples/*/grid.png (images), or a Markdown page of the
  continuations in RUN/samples/*/samples.jsonl (text).

Figures are drawn on matplotlib's Agg canvas directly and pyplot is never imported: nothing
needs a display, and importing this module does not switch the backend of a notebook or of
any other program that uses it.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from dbconvert.checkpoint import atomic_write, atomic_write_text
from dbconvert.config import override_recipe
from dbconvert.errors import DbconvertError, RunError
from dbconvert.evaluation.metric import metric_of
from dbconvert.evaluation.results import collect_results
from dbconvert.noise_process import NoiseProcess
from dbconvert.rundir import Run
from dbconvert.split import plan_blocks

DPI = 120
FIGURES = ("partition", "loss", "eval", "samples")
"""Every figure `plot all` tries, in this order; `partition` exists for every run."""

PARTITION_TITLES = {"equiprobable": "equi-probability", "uniform": "uniform"}

MISSING = {
    "loss": "no training metrics in {dir}: train a block first (`dbconvert train-block 0`)",
    "eval": "no evaluation results in {dir}: run `dbconvert eval METRIC` first (the run's family lists its metrics)",
    "samples": "no samples in {dir}: run `dbconvert sample` first",
}
"""Why a figure cannot be drawn yet, and the command that provides its data."""

MODEL_COLORS = {"blocks": "tab:blue", "e2e": "black"}

PLAIN_PUNCTUATION = " .,;?'\"-/%"
"""Punctuation left unescaped in Markdown cells: it starts no inline construct there."""


# --- drawing helpers ---------------------------------------------------------------------


def plots_dir(run: Run) -> Path:
    return run.root / "plots"


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot: no display, no global backend state)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG through a temporary file and a rename, so readers never see half an image."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def block_color(index: int, num_blocks: int) -> tuple[float, float, float, float]:
    """The colour of block `index` in every figure (tab10 up to 10 blocks, then viridis)."""
    if num_blocks <= 10:
        return colormaps["tab10"](index)
    return colormaps["viridis"](index / max(num_blocks - 1, 1))


def run_title(run: Run) -> str:
    return f"{run.recipe.name} ({run.root.name})"


# --- partition -----------------------------------------------------------------------------


def partition_blocks(run: Run, partition: str) -> list[dict[str, Any]]:
    """The run's own blocks for its partition; for the other one, what `split` would have planned."""
    if partition == run.manifest["partition"]:
        return [b.to_dict() for b in run.blocks]
    recipe = override_recipe(run.recipe, [f"noise.partition={partition}"], ("noise",))
    return plan_blocks(recipe, run.num_layers)[1]


def layers_text(layers: list[int] | tuple[int, int] | None) -> str:
    """`[start, end)` source layers as people count them: "layer 3" or "layers 0-1"."""
    if not layers:
        return ""
    first, last = layers[0], layers[1] - 1
    return f"layer {first}" if first == last else f"layers {first}–{last}"


def mass_text(mass: float, percent: bool = False) -> str:
    """A block's probability mass with the digits that matter (uniform partitions reach 1e-4)."""
    value = 100 * mass if percent else mass
    if percent:
        text = f"{value:.1f}" if value >= 1 else f"{value:.2g}"
    else:
        text = f"{value:.3f}" if value >= 0.01 else f"{value:.2g}"
    return text + ("%" if percent else "")


def draw_partition(
    ax: Axes, noise: NoiseProcess, blocks: list[dict[str, Any]], gamma: float, title: str, legend: bool = True
) -> None:
    """Density curve, shaded owned ranges with their mass, and one training-range bar per block above the curve.

    Drawn on the noise process's own axis (`coordinate`: ln sigma for EDM) with its training density.
    """
    lo, hi = (float(noise.coordinate(v)) for v in noise.full_range())
    x = np.linspace(lo, hi, 800)
    y = noise.density(x)
    top = float(y.max())
    num = len(blocks)
    row = top * min(0.14, 1.2 / num)
    base = top * 1.12
    for b in blocks:
        i = b["index"]
        color = block_color(i, num)
        own_lo, own_hi = (float(noise.coordinate(s)) for s in b["owned_range"])
        tr_lo, tr_hi = (float(noise.coordinate(s)) for s in b["train_range"])
        xs = np.linspace(own_lo, own_hi, 200)
        ax.fill_between(xs, 0, noise.density(xs), color=color, alpha=0.35, linewidth=0)
        if own_hi - own_lo > 0.06 * (hi - lo):  # room for the mass inside the shaded area
            ax.text(
                (own_lo + own_hi) / 2,
                top * 0.04,
                mass_text(b["mass"], percent=True),
                ha="center",
                va="bottom",
                fontsize=8,
                color="0.15",
            )
        if b["owned_range"][0] > noise.full_range()[0]:
            ax.axvline(own_lo, color="0.4", linewidth=0.8, linestyle=":")
        level = base + (num - 1 - i) * row
        ax.plot([tr_lo, tr_hi], [level, level], color=color, linewidth=1.6, marker="|", markersize=9)
        ax.plot([own_lo, own_hi], [level, level], color=color, linewidth=6, solid_capstyle="butt")
        layers = layers_text(b.get("layers"))
        label = f"block {i}: mass {mass_text(b['mass'])}" + (f", {layers}" if layers else "")
        middle = min(max((own_lo + own_hi) / 2, lo + 0.13 * (hi - lo)), hi - 0.13 * (hi - lo))  # stay inside
        ax.text(middle, level + row * 0.22, label, ha="center", va="bottom", fontsize=8, color="0.1", clip_on=False)
    ax.plot(x, y, color="black", linewidth=1.6)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, base + num * row + row * 0.3)
    ax.set_xlabel(f"noise level {noise.coordinate_label}")
    ax.set_ylabel(f"training density of {noise.coordinate_label}")
    ax.set_title(title, fontsize=11)
    ticks = noise.ticks()
    sigma_axis = ax.secondary_xaxis("top")
    sigma_axis.set_xticks([float(noise.coordinate(v)) for v in ticks], labels=[f"{v:g}" for v in ticks])
    sigma_axis.set_xlabel(noise.level_symbol, fontsize=9)
    sigma_axis.tick_params(labelsize=8)
    if legend:
        ax.legend(
            handles=[
                Line2D([], [], color="black", label="training density"),
                Patch(color="0.55", alpha=0.45, label="owned range (sampling), % of the mass"),
                Line2D(
                    [],
                    [],
                    color="0.3",
                    linewidth=1.6,
                    marker="|",
                    markersize=9,
                    label=f"training range (overlap γ = {gamma:g})",
                ),
            ],
            loc="upper left",
            fontsize=8,
            framealpha=0.9,
        )


def plot_partition(run: Run, compare_uniform: bool = False) -> Path:
    """RUN/plots/partition.png; with `compare_uniform`, partition-compare.png (equi-probability | uniform)."""
    noise = run.noise()
    gamma = float(run.manifest["gamma"])
    own = str(run.manifest["partition"])
    desc = f"{noise.describe()}, B = {run.num_blocks}"
    if not compare_uniform:
        fig = new_figure(10, 5.4)
        draw_partition(
            fig.add_subplot(),
            noise,
            partition_blocks(run, own),
            gamma,
            f"{PARTITION_TITLES.get(own, own)} partition — {desc}",
        )
        fig.suptitle(f"{run_title(run)}: noise levels per block", fontsize=12)
        return save_figure(fig, plots_dir(run) / "partition.png")
    fig = new_figure(16, 5.6)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, partition in zip(axes, noise.partitions):
        mine = " (this run)" if partition == own else " (what split would give)"
        draw_partition(
            ax,
            noise,
            partition_blocks(run, partition),
            gamma,
            f"{PARTITION_TITLES.get(partition, partition)}{mine}",
            legend=partition == noise.partitions[0],
        )
    axes[1].set_ylabel("")
    fig.suptitle(f"{run_title(run)}: equi-probability vs uniform partition — {desc}", fontsize=12)
    return save_figure(fig, plots_dir(run) / "partition-compare.png")


# --- loss ----------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per line (a line cut short by a kill is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of one metrics file that have a step and a loss."""
    records = [
        r
        for r in read_jsonl(path)
        if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float))
    ]
    return sorted(records, key=lambda r: r["step"])


def training_curves(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Metrics per trained target, blocks in index order, then the e2e baseline."""
    folder = run.root / "metrics"
    curves = {p.stem: read_metrics(p) for p in sorted(folder.glob("*.jsonl"))} if folder.is_dir() else {}
    order = [Run.block_name(b.index) for b in run.blocks] + ["e2e"]
    known = [name for name in order if curves.get(name)]
    return {name: curves[name] for name in known + sorted(set(curves) - set(order)) if curves[name]}


def ema_smooth(values: list[float], weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard draws it), so early points are not pulled to
    0."""
    out, acc = [], 0.0
    for k, v in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * v
        out.append(acc / (1.0 - weight**k))
    return np.asarray(out)


def smoothing_weight(num_points: int) -> float:
    """An EMA whose memory is about a tenth of the curve: curves of 10 points or fewer are not smoothed."""
    return max(0.0, min(0.98, 1.0 - 10.0 / max(num_points, 1)))


def curve_label(run: Run, name: str) -> str:
    if name == "e2e":
        return "e2e baseline (all layers)"
    if name.startswith("block-"):
        try:
            lo, hi = run.block(int(name.split("-")[-1])).train_range
            return f"block {int(name.split('-')[-1])} (trains on σ {lo:.3g}–{hi:.3g})"
        except (ValueError, DbconvertError):
            pass
    return name


def curve_color(run: Run, name: str) -> Any:
    if name.startswith("block-"):
        try:
            return block_color(int(name.split("-")[-1]), run.num_blocks)
        except ValueError:
            pass
    return "black" if name == "e2e" else "0.5"


def plot_loss(run: Run) -> Path:
    """RUN/plots/loss.png: raw loss faint, EMA-smoothed bold, one colour per block (and ce for text)."""
    return save_figure(loss_figure(run), plots_dir(run) / "loss.png")


def loss_figure(run: Run) -> Figure:
    """The figure of `plot_loss`: steps on an integer axis from 0, and a short run's few logged steps said."""
    curves = training_curves(run)
    if not curves:
        raise RunError(MISSING["loss"].format(dir=run.root / "metrics"))
    fields = ["loss"] + [f for f in ("ce",) if any(f in r for rs in curves.values() for r in rs)]
    ylabels = {"loss": "loss", "ce": "cross-entropy (nats)"}
    titles = {"loss": "training loss", "ce": "cross-entropy of the next token"}
    fig = new_figure(7.5 * len(fields) + 2.5, 5.4)
    axes = fig.subplots(1, len(fields), squeeze=False)[0]
    for ax, field in zip(axes, fields):
        plotted: list[float] = []
        for name, records in curves.items():
            rows = [r for r in records if isinstance(r.get(field), (int, float)) and math.isfinite(r[field])]
            if not rows:
                continue
            steps = [r["step"] for r in rows]
            values = [float(r[field]) for r in rows]
            color = curve_color(run, name)
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(
                steps,
                ema_smooth(values, smoothing_weight(len(values))),
                color=color,
                linewidth=2.2,
                label=curve_label(run, name),
                marker="o" if len(values) < 3 else None,
            )
            plotted += values
        positive = [v for v in plotted if v > 0]
        if positive and len(positive) == len(plotted) and max(positive) / min(positive) > 10:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0)
        ax.set_ylabel(ylabels[field] + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.set_title(f"{titles[field]} (raw faint, EMA-smoothed bold)", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.grid(True, which="minor", alpha=0.08)
        ax.legend(fontsize=8, loc="best")
    title = f"{run_title(run)}: training curves from metrics/*.jsonl"
    most = max(len(records) for records in curves.values())
    if most < 3:
        every = run.recipe.train.log_every
        title += (
            f"\n(only {most} logged step{'s' if most > 1 else ''} a curve: a line is logged every "
            f"{every} steps and at the end; train.log_every=N logs more often)"
        )
    fig.suptitle(title, fontsize=12)
    return fig


# --- eval ----------------------------------------------------------------------------------


def result_spread(result: dict[str, Any]) -> tuple[list[float], float, float]:
    """(every value, mean, standard deviation) of one result; a single value has spread 0."""
    values = [float(v) for v in (result.get("values") or [result["value"]])]
    mean = float(result["mean"]) if isinstance(result.get("mean"), (int, float)) else float(np.mean(values))
    if isinstance(result.get("std"), (int, float)):
        std = float(result["std"])
    else:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return values, mean, std


def result_label(result: dict[str, Any]) -> str:
    """Tick label of one result: the model, then the settings that tell two results of one model apart."""
    sampler = result.get("sampler") or {}
    setting = " ".join(str(p) for p in (sampler.get("solver"), sampler.get("steps")) if p)
    parts = [str(result["model"]), f"n={result.get('num_samples', '?')}"] + ([setting] if setting else [])
    weights = sampler.get("weights") or result.get("weights")
    if weights not in (None, "ema"):
        parts.append(f"{weights} weights")
    if result.get("seed") is not None:
        parts.append(f"seed {result['seed']}")
    if result.get("split"):
        parts.append(f"split {result['split']}")
    if result.get("reference_overlaps_training"):
        parts.append("ON TRAINING DATA")
    return "\n".join(parts)


def plot_eval(run: Run) -> Path:
    """RUN/plots/eval.png: each result's values as dots and mean ± std as an error bar, per (metric, features)."""
    return save_figure(eval_figure(run), plots_dir(run) / "eval.png")


def eval_figure(run: Run) -> Figure:
    """The figure of `plot_eval`."""
    eval_dir = run.root / "eval"
    results = collect_results(eval_dir)
    if not results:
        raise RunError(MISSING["eval"].format(dir=eval_dir))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((str(r["metric"]), str(r["features"])), []).append(r)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    widest = max(len(rows) for rows in groups.values())
    width = ncols * max(5.0, 1.3 * widest + 2.0)
    fig = new_figure(width, nrows * 4.6 + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    order = {"blocks": 0, "e2e": 1}
    for ax, ((name, features), rows) in zip(axes, sorted(groups.items())):
        metric = metric_of(rows[0])
        rows = sorted(rows, key=lambda r: (order.get(r["model"], 2), str(r["model"]), r.get("num_samples") or 0))
        for x, r in enumerate(rows):
            values, mean, std = result_spread(r)
            color = MODEL_COLORS.get(r["model"], "tab:gray")
            if len(values) > 1:  # every value left of the error bar, the numbers right of it
                ax.scatter(
                    x - 0.16 + np.linspace(-0.05, 0.05, len(values)), values, s=18, color=color, alpha=0.5, zorder=2
                )
            ax.errorbar([x], [mean], yerr=[std], fmt="o", color=color, markersize=7, capsize=5, linewidth=1.8, zorder=3)
            text = f"{mean:.4g}" if len(values) == 1 else f"mean {mean:.4g} ± {std:.2g}"
            note = metric.summary_note(r)
            if note:
                text += f"\n{note}"
            ax.annotate(text, (x, mean), xytext=(10, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xticks(range(len(rows)), labels=[result_label(r) for r in rows], fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.margins(y=0.25)
        ax.set_ylabel(f"{metric.title} ({metric.better_text()})")
        ax.set_xlabel("model and settings")
        ax.set_title(
            "\n".join(textwrap.wrap(f"{metric.title}, features {features}", 48, break_on_hyphens=False)), fontsize=10
        )
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    title = f"{run_title(run)}: evaluations (dots: every value; bar: mean ± std)"
    fig.suptitle(
        "\n".join(textwrap.wrap(title, int(width * 8.5), break_on_hyphens=False)), fontsize=12
    )  # never clipped
    return fig


# --- samples -------------------------------------------------------------------------------


def sample_folders(run: Run) -> tuple[list[Path], list[Path]]:
    """(grid.png files, samples.jsonl files) under RUN/samples/*/."""
    folder = run.root / "samples"
    return sorted(folder.glob("*/grid.png")), sorted(folder.glob("*/samples.jsonl"))


def markdown_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: HTML specials as entities, other punctuation backslash-escaped.

    Every ASCII punctuation character may be backslash-escaped in CommonMark, so no prompt or
    completion can open a link, emphasis, code span, mention or math, or end the cell; only
    punctuation that means nothing inside a cell (`PLAIN_PUNCTUATION`) stays as it is, for
    readability. Newlines become <br>.
    """
    entities = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
    out = []
    for ch in text:
        if ch in entities:
            out.append(entities[ch])
        elif ch == "\n":
            out.append("<br>")
        elif ch in "\r\t":
            out.append(" ")
        elif ch.isascii() and not ch.isalnum() and ch.isprintable() and ch not in PLAIN_PUNCTUATION:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def text_samples_page(run: Run, files: list[Path]) -> str:
    """A Markdown page: one section per sample folder, one table row per prompt and continuation."""
    lines = [
        f"# Samples of {markdown_cell(run_title(run))}",
        "",
        "Continuations written by `dbconvert sample`, one section per folder of `samples/`.",
        "",
    ]
    for path in files:
        records = read_jsonl(path)
        lines += [
            f"## {markdown_cell(path.parent.name)}",
            "",
            "| # | prompt | continuation | new tokens | stopped by |",
            "| ---: | --- | --- | ---: | --- |",
        ]
        for k, r in enumerate(records):
            prompt = markdown_cell(str(r.get("prompt", ""))) or "*(empty)*"
            completion = markdown_cell(str(r.get("completion", r.get("text", ""))))
            lines.append(
                f"| {k} | {prompt} | {completion} | {markdown_cell(str(r.get('new_tokens', '')))} | "
                f"{markdown_cell(str(r.get('stopped_by', '')))} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_samples(run: Run) -> list[Path]:
    """RUN/plots/samples.png (a strip of the image grids) and/or samples.md (text continuations)."""
    from PIL import Image

    grids, texts = sample_folders(run)
    if not grids and not texts:
        raise RunError(MISSING["samples"].format(dir=run.root / "samples"))
    written = []
    if grids:
        ncols = min(4, len(grids))
        nrows = math.ceil(len(grids) / ncols)
        fig = new_figure(4.2 * ncols, 4.4 * nrows + 0.5)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, path in zip(axes, grids):
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            ax.imshow(pixels, interpolation="nearest")
            ax.set_title(path.parent.name, fontsize=9)
            ax.set_axis_off()
        for ax in axes[len(grids) :]:
            ax.set_visible(False)
        fig.suptitle(f"{run_title(run)}: sample grids (samples/*/grid.png)", fontsize=12)
        written.append(save_figure(fig, plots_dir(run) / "samples.png"))
    if texts:
        path = plots_dir(run) / "samples.md"
        atomic_write_text(path, text_samples_page(run, texts))
        written.append(path)
    return written


# --- every figure --------------------------------------------------------------------------


def has_data(run: Run, figure: str) -> bool:
    """Whether `figure` can be drawn now (the partition always can)."""
    if figure == "loss":
        return bool(training_curves(run))
    if figure == "eval":
        return bool(collect_results(run.root / "eval"))
    if figure == "samples":
        return any(sample_folders(run))
    return True


def missing_note(run: Run, figure: str) -> str:
    folder = {"loss": "metrics", "eval": "eval", "samples": "samples"}[figure]
    return f"skipped {figure}: " + MISSING[figure].format(dir=run.root / folder)


def make_figures(
    run: Run, which: str = "all", compare_uniform: bool = False, note: Callable[[str], None] | None = None
) -> list[Path]:
    """Draw one figure (an error says which command provides its data) or, for `all`, every one with data.

    `all` never fails for lack of data: the partition exists from `split` on, and each figure
    without data yet is skipped with a `note` naming the command that provides it.
    """
    if which not in (*FIGURES, "all"):
        raise DbconvertError(f"unknown figure {which!r}; choose one of {', '.join(FIGURES)} or all")
    note = note or (lambda msg: None)
    drawers: dict[str, Callable[[], Path | list[Path]]] = {
        "partition": lambda: plot_partition(run, compare_uniform),
        "loss": lambda: plot_loss(run),
        "eval": lambda: plot_eval(run),
        "samples": lambda: plot_samples(run),
    }
    written: list[Path] = []
    for figure in FIGURES if which == "all" else (which,):
        if which == "all" and not has_data(run, figure):
            note(missing_note(run, figure))
            continue
        out = drawers[figure]()
        written += out if isinstance(out, list) else [out]
    return written
