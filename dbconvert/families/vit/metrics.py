"""The accuracy metric of a ViT run: top-1, top-5, NLL and expected calibration error on the test split, and
the top-1 accuracy after every denoising step (how the answer forms block by block).

`evaluate_accuracy(run, model)` returns the result record; `AccuracyMetric` is its entry in the metric
registry (`dbconvert eval accuracy`, which writes it to RUN/eval/ like every metric's result).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

import time
from collections.abc import Callable

from dbconvert.errors import DbconvertError
from dbconvert.evaluation.metric import Log, Metric, nolog
from dbconvert.families.vit.metric_help import ACCURACY, NAME
from dbconvert.rundir import Run

ECE_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the confidence-weighted gap |accuracy - confidence| over `bins` equal-width confidence bins."""
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(correct[inside].mean().item() - conf[inside].mean().item())
    return ece


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1, top5 (top-k with k = min(5, classes)), nll and ece of one set of logits."""
    probs = F.softmax(logits.float(), dim=-1)
    k = min(5, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    return {
        "top1": (topk[:, 0] == labels).float().mean().item(),
        "top5": (topk == labels[:, None]).any(dim=-1).float().mean().item(),
        "nll": F.cross_entropy(logits.float(), labels).item(),
        "ece": expected_calibration_error(probs, labels),
    }


def training_overlap(run: Run, split: str, x: torch.Tensor, log: Log) -> tuple[bool | None, int | None]:
    """(whether the scored images hold training images, how many): by the split's name, else pixel for pixel
    against the training split (a `data.test_source` copied from the training images is caught here)."""
    from dbconvert.data.images import load_images
    from dbconvert.data.overlap import overlapping_images, split_overlaps_training

    data_cfg = run.recipe.data
    if split_overlaps_training(data_cfg, split):
        return True, None
    try:
        count = overlapping_images(load_images(data_cfg, data_cfg.split).x, x)
    except DbconvertError as exc:  # e.g. hub training data offline: the overlap stays unknown, the score does not
        log(f"note: cannot compare split {split!r} with the training images ({exc}); overlap unknown")
        return None, None
    return count > 0, count


def evaluate_accuracy(
    run: Run,
    model: str = "blocks",
    steps: int | None = None,
    weights: str | None = None,
    seed: int | None = None,
    split: str = "test",
    num: int | None = None,
    solver: str | None = None,
    log: Log = nolog,
) -> dict[str, Any]:
    """Accuracy of `model` (blocks, e2e, classifier or source) on `split`: the result record (value = top-1).

    The denoisers step with `solver` (default: the recipe's sample.solver; `classify_steps`)."""
    from dbconvert.data.overlap import split_source
    from dbconvert.families.vit.data import load_labelled
    from dbconvert.families.vit.generate import denoiser_settings, step_logits

    start = time.time()
    AccuracyMetric().require(run)
    run.model_targets(model)  # one line naming the models this run has
    is_denoiser = model in ("blocks", "e2e")
    if not split.strip():
        raise DbconvertError(
            "--split is empty; name the labelled split to classify (test; train or all score "
            "the training images, and the result says so)"
        )
    steps, solver = denoiser_settings(run, model, steps, solver)
    weights = weights or run.recipe.sample.weights
    seed = run.recipe.sample.seed if seed is None else seed
    data = load_labelled(run.recipe.data, run.recipe.model, split, train_split=False)  # type: ignore[arg-type]
    n = len(data) if num is None else min(num, len(data))
    x, labels = data.x[:n], data.y[:n]
    overlaps, overlap_images = training_overlap(run, split, x, log)
    if overlaps:
        what = f"{overlap_images} of its {n} images are" if overlap_images else "it is"
        log(
            f"note: split {split!r} overlaps the training data ({what} training images): this accuracy is not a "
            "held-out figure (the result says so)"
        )
    logits = step_logits(run, model, x, steps, weights, seed, solver=solver or "euler")
    final = scores(logits[-1], labels)
    result: dict[str, Any] = {
        "metric": NAME,
        "model": model,
        "split": split,
        "images": n,
        "features": "pixels",
        "reference": f"{split_source(run.recipe.data, split)}:{split} labels",
        "source": {"kind": "run", "path": str(run.root.resolve())},
        "reference_overlaps_training": overlaps,
        **({"reference_overlap_images": overlap_images} if overlap_images is not None else {}),
        "num_samples": n,
        "seed": seed,
        **final,
        "per_step_top1": [(lg.argmax(-1) == labels).float().mean().item() for lg in logits],
        "sampler": {
            "steps": steps,
            "levels": "evenly spaced in the log-normal CDF",
            "weights": weights,
            "seed": seed,
            **({"solver": solver} if solver not in (None, "euler") else {}),
        },  # Euler's file names unchanged
        "run": str(run.root),
    }
    if is_denoiser:
        from dbconvert.families.vit.objective import cdf_levels

        result["per_step_sigma"] = cdf_levels(steps, run.noise())  # type: ignore[arg-type]
    result["stderr_top1"] = math.sqrt(max(final["top1"] * (1 - final["top1"]), 0.0) / max(n, 1))
    result["value"] = final["top1"]
    result["seconds"] = round(time.time() - start, 2)
    return result


class AccuracyMetric(Metric):
    """Top-1 accuracy on the test split (with top-5, NLL, ECE and the per-step top-1): the classifiers' metric."""

    name = NAME
    title = ACCURACY.title
    lower_is_better = False
    spread_label = "± s.e."
    help = ACCURACY.help
    options = ACCURACY.options

    def check(self, recipe: Any, family: Any, num: int) -> None:
        if num < 1:
            raise DbconvertError(f"--num (images to classify) must be at least 1, got {num}")

    def evaluate(
        self, run: Any, *, model: str = "blocks", log: Log = nolog, progress: bool = False, **options: Any
    ) -> dict[str, Any]:
        return evaluate_accuracy(run, model=model, log=log, **options)

    def spread(self, r: dict[str, Any]) -> float:
        return float(r.get("stderr_top1") or 0.0)

    def detail_rows(self, r: dict[str, Any]) -> list[tuple[str, str]]:
        return [
            ("top-1", f"{r['top1']:.4f} ± {r.get('stderr_top1', 0.0):.4f} (s.e.)"),
            ("top-5", f"{r['top5']:.4f}"),
            ("NLL", f"{r['nll']:.4f}"),
            ("ECE", f"{r['ece']:.4f}"),
            ("top-1 per denoising step", ", ".join(f"{v:.4f}" for v in r.get("per_step_top1", []))),
        ]

    def compare_columns(self) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
        return [
            ("top-1", lambda r: f"{r['top1']:.4f}"),
            ("± s.e.", lambda r: f"{r.get('stderr_top1', 0.0):.4f}"),
            ("top-5", lambda r: f"{r['top5']:.4f}"),
            ("NLL", lambda r: f"{r['nll']:.3f}"),
            ("ECE", lambda r: f"{r['ece']:.3f}"),
        ]
