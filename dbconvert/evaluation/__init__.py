"""Evaluation (DESIGN 7): metrics as plug-ins (`metric.py`), FID/KID through clean-fid and MAUVE through mauve-text.

- `metric`: the registry: one `Metric` object per metric (name, direction, options, evaluate, rendering).
- `features`: which image features FID uses: clean-fid's Inception (where it applies) or a
  small built-in CNN trained once on the data set's training split (tiny grey images, offline).
- `fid`: image folders -> features -> FID and KID, reference statistics cached per
  data set / split / features, samples generated with the run's blocks or e2e baseline.
- `mauve`: SEDD's conditional protocol (prompt of 50 tokens, continuations of 50 tokens),
  featurised by GPT-2 (mauve's default), a local Hugging Face encoder or the packaged MiniLM.
- `results`: RUN/eval/*.json and the tables of `dbconvert eval ...`.
"""

from __future__ import annotations

from typing import Any

from dbconvert.evaluation.metric import Log, Metric, get_metric, metric_names, nolog, register_metric
from dbconvert.evaluation.results import collect_results, write_result

LAZY = {"evaluate_fid": "dbconvert.evaluation.fid", "evaluate_mauve": "dbconvert.evaluation.mauve"}
"""Names imported on first use: fid and mauve bring torch, and `dbconvert --help` imports this package."""


def __getattr__(name: str) -> Any:
    if name in LAZY:
        from importlib import import_module

        return getattr(import_module(LAZY[name]), name)
    raise AttributeError(f"module 'dbconvert.evaluation' has no attribute {name!r}")


def evaluate(
    run: Any, metric: str | None = None, *, model: str = "blocks", num: int, log: Log | None = None, **sampler: Any
) -> dict[str, Any]:
    """The run's family's default metric (or `metric`) of `model` with `num` generated units (images, prompts...).

    `sampler` holds seed / steps / solver / weights / guidance (None = the recipe's); a metric gets those
    it takes. Callers that score whatever family a run holds (ablate, demo) use this, never a metric's name.
    """
    chosen = get_metric(metric or run.family().default_metric(run.recipe))
    chosen.require(run)
    options = {k: v for k, v in sampler.items() if chosen.accepts(k)}
    return chosen.evaluate(run, model=model, log=log or nolog, **{chosen.num_option: num}, **options)


__all__ = [
    "Metric",
    "collect_results",
    "evaluate",
    "evaluate_fid",
    "evaluate_mauve",
    "get_metric",
    "metric_names",
    "register_metric",
    "write_result",
]
