"""The accuracy metric of a ViT run: top-1, top-5, NLL and expected calibration error on the test split, and
the top-1 accuracy after every denoising step (how the answer forms block by block).

`evaluate_accuracy(run, model)` writes RUN/eval/accuracy-<model>.json (`-<N>steps` added for a denoiser
evaluated with N steps other than one per block) and returns the same dict. It is
self-contained (no evaluation-registry imports) so the registry can wrap it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dbconvert.checkpoint import write_json
from dbconvert.errors import DbconvertError
from dbconvert.rundir import Run

ECE_BINS = 15
NAME = "accuracy"
DIRECTION = "higher"
"""Top-1 accuracy: higher is better."""


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


def evaluate_accuracy(run: Run, model: str = "blocks", steps: int | None = None, weights: str | None = None,
                      seed: int | None = None, split: str = "test", num: int | None = None,
                      out_dir: Path | None = None) -> dict[str, Any]:
    """Accuracy of `model` (blocks, e2e, classifier or source) on `split`; writes RUN/eval/accuracy-<model>.json
    (accuracy-<model>-<N>steps.json for a denoiser evaluated with other than one step per block)."""
    from dbconvert.families.vit.data import load_labelled
    from dbconvert.families.vit.generate import default_steps, step_logits

    if run.family().default_metric != NAME:
        raise DbconvertError(f"eval accuracy applies to classifier runs; this {run.family_name} run is scored by "
                             f"{run.family().default_metric} (use eval {run.family().default_metric})")
    is_denoiser = model in ("blocks", "e2e")
    if steps is not None and not is_denoiser:
        raise DbconvertError(f"--steps applies to the denoisers (blocks, e2e), not to the {model} classifier")
    weights = weights or run.recipe.sample.weights
    seed = run.recipe.sample.seed if seed is None else seed
    data = load_labelled(run.recipe.data, run.recipe.model, split, train_split=False)  # type: ignore[arg-type]
    n = len(data) if num is None else min(num, len(data))
    x, labels = data.x[:n], data.y[:n]
    steps = (steps or default_steps(run, model)) if is_denoiser else None
    logits = step_logits(run, model, x, steps, weights, seed)
    final = scores(logits[-1], labels)
    result: dict[str, Any] = {
        "metric": NAME, "direction": DIRECTION, "model": model, "split": split, "images": n,
        "num_samples": n, "seed": seed,
        **final,
        "per_step_top1": [(lg.argmax(-1) == labels).float().mean().item() for lg in logits],
        "sampler": {"steps": steps, "levels": "evenly spaced in the log-normal CDF", "weights": weights, "seed": seed},
        "run": str(run.root),
    }
    if is_denoiser:
        from dbconvert.families.vit.objective import cdf_levels

        result["per_step_sigma"] = cdf_levels(steps, run.noise())  # type: ignore[arg-type]
    result["stderr_top1"] = math.sqrt(max(final["top1"] * (1 - final["top1"]), 0.0) / max(n, 1))
    suffix = f"-{steps}steps" if is_denoiser and steps != default_steps(run, model) else ""
    path = (out_dir or run.root / "eval") / f"accuracy-{model}{suffix}.json"
    write_json(path, result)
    result["file"] = str(path)
    return result
