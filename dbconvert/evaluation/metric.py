"""The metric registry: one object per metric, so a new metric touches nothing generic.

A metric knows its name, its direction (written once: `lower_is_better`), its own command-line options,
how to evaluate a run (`evaluate` -> a result record, written to RUN/eval/*.json) and how a result
renders: the rows of its own table (`detail_rows`), its columns in `eval compare` (`compare_columns`),
its headline number and spread in `ablate` tables and the eval figure (`headline`, `spread`).
A family lists the metrics that apply to a recipe's runs (`Family.metrics_for`, default first); `dbconvert eval METRIC`,
`eval compare`, `ablate` and `plot eval` go through this registry and never test a metric's name.

A result record is a dict with at least `metric`, `model`, `value`, `features` (what the numbers were
computed on, `-` when nothing applies), `num_samples`, `seconds`; optionally `values` (repeats / seeds),
`mean`, `std`, `split`, `sampler`, `seed`, `source`.

What `dbconvert eval NAME --help` shows of a metric (`MetricHelp`: title, help, options) lives in a torch-free
module named by the entry's optional second path, so `eval --help` lists the metrics without importing them
(issue 33: --help took 6-8 s importing torch); this module is torch-free too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dbconvert.errors import DbconvertError
from dbconvert.registry import Registry

if TYPE_CHECKING:
    from dbconvert.config import Recipe
    from dbconvert.families.contract import Family
    from dbconvert.rundir import Run

Log = Callable[[str], None]

METRICS: dict[str, tuple[str, ...]] = {
    "fid": ("dbconvert.evaluation.fid:FIDMetric", "dbconvert.evaluation.metric_help:FID"),
    "mauve": ("dbconvert.evaluation.mauve:MauveMetric", "dbconvert.evaluation.metric_help:MAUVE"),
    "genppl": ("dbconvert.evaluation.genppl:GenPPLMetric", "dbconvert.evaluation.metric_help:GENPPL"),
}
"""The generic metrics: name -> ("module:Class" of its `Metric` subclass (imported on first use)[, "module:attr"
of its `MetricHelp` in a torch-free module]). A family's own metrics (ViT's accuracy, masked text's bpc) are the
family's to name: `Family.own_metrics`."""

METRICS_ENV = "DBCONVERT_METRICS"
"""Metrics registered at run time, as JSON {name: "module:Class" or ["module:Class", "module:Help"]} (handed to
child processes)."""


def family_metrics() -> dict[str, str | tuple[str, ...]]:
    """The metrics the registered families bring (`Family.own_metrics`), read from the torch-free table a family's
    entry names where it has one (`families.own_metrics`), else from the family module."""
    from dbconvert.families import family_names, own_metrics

    return {name: entry for family in family_names() for name, entry in own_metrics(family).items()}


REGISTRY = Registry("metric", METRICS, METRICS_ENV, parts=2, optional=1, extra=family_metrics)
"""The metrics (`registry.Registry`): the generic ones, the families' own, the run-time registrations; an entry is
(metric class[, its `MetricHelp`])."""


@dataclass(frozen=True)
class MetricOption:
    """One command-line option of `dbconvert eval METRIC`, passed to `Metric.evaluate` by keyword `name`."""

    name: str
    type: type
    default: Any
    help: str
    min: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class MetricHelp:
    """What `dbconvert eval NAME --help` shows of a metric: its `Metric.title`, `Metric.help` and `Metric.options`.

    Kept in a torch-free module named by the metric's registry entry, so the help builds without importing the
    metric; the metric class takes its three attributes from it (the registry test checks they agree)."""

    title: str
    help: str = ""
    options: tuple[MetricOption, ...] = ()


SAMPLER_OPTIONS = ("seed", "steps", "solver", "weights")
"""Options every metric's `evaluate` takes (None = the recipe's): how the scored samples are drawn."""


def nolog(_: str) -> None:
    return None


def folder_label(path: Path) -> str:
    """A local model folder as results name it: its name and a digest of its full path, so two folders of one
    name (two `judge/` folders) are never one column or one result file."""
    import hashlib

    return f"{path.name}@{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:6]}"


def overlap_text(r: dict[str, Any]) -> str:
    """Whether a result's reference holds training data, said so that it cannot be missed."""
    overlaps = r.get("reference_overlaps_training")
    if overlaps is None:
        recorded = "reference_overlaps_training" in r
        return "unknown (no run, or its training data unreadable)" if recorded else "not recorded"
    if not overlaps:
        return "no"
    count = r.get("reference_overlap_images")
    return "YES" + (f" ({count} training images)" if count else " (the training split)")


class Metric(ABC):
    """One evaluation metric. Stateless: every method takes the run or the result record."""

    name: ClassVar[str]
    title: ClassVar[str]
    """How the metric is written in tables and figures (`FID`, `MAUVE`, `top-1`)."""
    lower_is_better: ClassVar[bool]
    help: ClassVar[str] = ""
    options: ClassVar[tuple[MetricOption, ...]] = ()
    """The metric's own command-line options (beyond --run, --model, --seed, --steps, --solver, --weights)."""
    alone_options: ClassVar[tuple[str, ...]] = ()
    """Options that, all given, score files with no run (FID: samples and reference folders); empty: a run is needed."""
    alone_hint: ClassVar[str] = ""
    """What to give to score files alone, for a user who gave the first of `alone_options` but not the rest."""
    num_option: ClassVar[str] = "num"
    """The option that sets how much is generated (`ablate --num` and `demo` set it)."""
    spread_label: ClassVar[str] = "± std"
    depends_on_count: ClassVar[bool] = False
    """Whether the metric's value moves with the number of samples (FID's bias, MAUVE's quantisation): `eval
    compare` then flags a table whose rows were scored at different counts."""
    settings_keys: ClassVar[tuple[str, ...]] = ()
    """Keys of the metric's result records, beyond those every metric records (`results.SETTINGS_KEYS`), that
    decide what was measured: two results differing in one are different evaluations (own files, own rows)."""
    sampler_options: ClassVar[tuple[str, ...]] = SAMPLER_OPTIONS
    """The `SAMPLER_OPTIONS` that `evaluate` takes (a metric that draws no samples, as bpc's bound, takes fewer):
    `evaluation.evaluate` hands a metric only those, so `ablate` can score any family's runs with the recipe's
    sampler."""

    def check(self, recipe: "Recipe", family: "Family", num: int) -> None:
        """A one-line error, before any training, when this metric cannot score the recipe's runs with `num`."""
        if num < 2:
            raise DbconvertError(f"--num ({self.num_option} for {self.title}) must be at least 2, got {num}")

    def accepts(self, option: str) -> bool:
        """Whether `evaluate` takes `option` (the sampler options, or one of the metric's own)."""
        return option in self.sampler_options or any(o.name == option for o in self.options)

    def require(self, run: "Run") -> None:
        """A one-line error when the run's family does not list this metric."""
        family = run.family()
        applies = family.metrics_for(run.recipe)
        if self.name not in applies:
            raise DbconvertError(
                f"eval {self.name} does not apply to this {run.family_name} run; use eval "
                f"{applies[0]} (the metrics of its runs: {', '.join(applies)})"
            )

    @abstractmethod
    def evaluate(
        self, run: "Run | None", *, model: str = "blocks", log: Log = nolog, progress: bool = False, **options: Any
    ) -> dict[str, Any]:
        """Score `model` of `run`; `options` are the generic sampler settings (num, seed, steps, solver,
        guidance, weights; None = the recipe's) and the metric's own `options`. Returns the result record."""

    # -- rendering ---------------------------------------------------------------------------

    def headline(self, r: dict[str, Any]) -> float:
        """The one number of a result in ablate tables and the figure's annotations."""
        return float(r["value"])

    def spread(self, r: dict[str, Any]) -> float:
        """The number beside the headline (`spread_label`): the std over seeds by default."""
        return float(r.get("std") or 0.0)

    def values(self, r: dict[str, Any]) -> list[float]:
        return [float(v) for v in (r.get("values") or [r["value"]])]

    def summary_note(self, r: dict[str, Any]) -> str | None:
        """An extra line under a figure point (FID: the minimum over repeats, the paper's convention)."""
        return None

    def detail_rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        """The metric's rows at the top of the table one evaluation prints."""
        values = self.values(r)
        rows = [(self.title, f"{r['value']:.4f}")]
        if len(values) > 1:
            rows.append((f"{self.title} (mean ± std)", f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"))
            rows.append(("per seed", ", ".join(f"{v:.4f}" for v in values)))
        return rows

    def extra_rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        """Rows after the reference: whether it holds training data (every metric that records it)."""
        return [("reference overlaps training", overlap_text(r))] if "reference_overlaps_training" in r else []

    def compare_columns(self) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
        """(header, cell) of the metric's columns in `eval compare`."""

        def std(r: dict[str, Any]) -> str:
            n = len(self.values(r))
            return f"{self.spread(r):.4f}" + (f" x{n}" if n > 1 else "")

        return [(self.title, lambda r: f"{self.headline(r):.4f}"), ("std", std)]

    def reference_column(self) -> tuple[str, Callable[[dict[str, Any]], str]]:
        """(header, cell) of what a result was measured against, flagged when it holds training data."""
        return (
            "split",
            lambda r: (
                str(r.get("split") or "-") + (" OVERLAPS TRAINING" if r.get("reference_overlaps_training") else "")
            ),
        )

    def better_text(self) -> str:
        return "lower is better" if self.lower_is_better else "higher is better"


class UnknownMetric(Metric):
    """How a result of a metric not registered in this process renders (a plug-in not loaded): its value only."""

    lower_is_better = False

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]
        self.title = name.upper()  # type: ignore[misc]

    def better_text(self) -> str:
        return "direction unknown: its metric is not registered here"

    def evaluate(self, run: "Run | None", **options: Any) -> dict[str, Any]:
        raise DbconvertError(f"unknown metric {self.name!r}; choose one of {', '.join(metric_names())}")


def metric_names() -> list[str]:
    return REGISTRY.names()


def register_metric(name: str, path: str, help: str | None = None) -> None:
    """Register a metric by "module:Class" (plug-ins and tests; a family's own metrics need no registering:
    `Family.own_metrics`); child processes inherit it. `help`, the "module:attr" of its `MetricHelp` in a
    torch-free module, lets `eval --help` skip importing the metric."""
    REGISTRY.register(name, path, *([help] if help else []))


def unregister_metric(name: str) -> None:
    REGISTRY.unregister(name)


def get_metric(name: str) -> Metric:
    """The registered metric `name` (a one-line error naming the choices otherwise)."""
    return REGISTRY.get(name)


def metric_help(name: str) -> MetricHelp:
    """What `eval NAME --help` shows of metric `name`: its entry's torch-free `MetricHelp` where it has one, else
    read from the metric (imported)."""
    paths = REGISTRY.paths(name)
    if len(paths) > 1:
        return REGISTRY.load(name, 1)
    metric = get_metric(name)
    return MetricHelp(metric.title, metric.help, metric.options)


def metric_of(result: dict[str, Any]) -> Metric:
    """The metric that renders a stored result (its value alone when that metric is not registered here)."""
    name = str(result["metric"])
    return get_metric(name) if name in REGISTRY else UnknownMetric(name)


__all__ = [
    "METRICS",
    "METRICS_ENV",
    "REGISTRY",
    "SAMPLER_OPTIONS",
    "Metric",
    "MetricHelp",
    "MetricOption",
    "UnknownMetric",
    "family_metrics",
    "folder_label",
    "get_metric",
    "metric_help",
    "metric_names",
    "metric_of",
    "nolog",
    "overlap_text",
    "register_metric",
    "unregister_metric",
]
