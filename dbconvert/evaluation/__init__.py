"""Evaluation (DESIGN 7): FID/KID through clean-fid and MAUVE through mauve-text.

- `features`: which image features FID uses: clean-fid's Inception (where it applies) or a
  small built-in CNN trained once on the data set's training split (tiny grey images, offline).
- `fid`: image folders -> features -> FID and KID, reference statistics cached per
  data set / split / features, samples generated with the run's blocks or e2e baseline.
- `mauve`: SEDD's conditional protocol (prompt of 50 tokens, continuations of 50 tokens),
  featurised by GPT-2 (mauve's default), a local Hugging Face encoder or the packaged MiniLM.
- `results`: RUN/eval/*.json and the tables of `dbconvert eval ...`.
"""

from dbconvert.evaluation.fid import evaluate_fid
from dbconvert.evaluation.mauve import evaluate_mauve
from dbconvert.evaluation.results import collect_results, write_result

__all__ = ["evaluate_fid", "evaluate_mauve", "collect_results", "write_result"]

LOWER_IS_BETTER = {"fid": True, "mauve": False}
"""Which direction is better for each metric a family can name as its default."""


def evaluate(run, metric: str | None = None, *, model: str = "blocks", num: int, seed: int | None = None,  # noqa: ANN001
             steps: int | None = None, solver: str | None = None, guidance: float | None = None,
             weights: str | None = None, log=None) -> dict:  # noqa: ANN001
    """The run's family's default metric (or `metric`) of `model`: FID on `num` samples, or MAUVE on `num` prompts.

    Callers that score whatever family a run holds (ablate, demo) use this, never the family's name.
    """
    metric = metric or run.family().default_metric
    extra = {"log": log} if log is not None else {}
    if metric == "fid":
        return evaluate_fid(run, model=model, num=num, steps=steps, solver=solver, guidance=guidance, seed=seed,
                            weights=weights, **extra)
    if metric == "mauve":
        return evaluate_mauve(run, model=model, num_prompts=num, steps=steps, solver=solver, seed=seed,
                              weights=weights, **extra)
    raise ValueError(f"unknown metric {metric!r}")


__all__ = ["LOWER_IS_BETTER", "collect_results", "evaluate", "evaluate_fid", "evaluate_mauve", "write_result"]
