"""Bits per character of a masked-diffusion run: the ELBO bound on held-out text, blocks or e2e.

`evaluate_bpc(run, model="blocks")` estimates -log p(x) <= sum over blocks of |owned range| * E[w(t) * masked
CE] + the reconstruction term at t_min (`masked.sequence_bound`) on every held-out row, `repeats` times with
fresh Monte-Carlo draws (times, stratified in each range with `draws` per block, and masks), and returns the
result record: the mean, the spread over repetitions and the pieces per block. `BPCMetric` is its entry in the
metric registry (`dbconvert eval bpc`, which writes it to RUN/eval/ like every metric's result).

Units: nats per token / ln 2. With a character-level tokenizer a token is a character, so this is bits per
character (`bpc`); otherwise the result is bits per token and the per-token perplexity exp(nats per token)
(`ppl`). The e2e network is one range, [t_min, 1], with B * `draws` times: the same number of network
evaluations per row as the blocks (each of 1/B the layers).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dbconvert.data.text import text_split_overlaps_training
from dbconvert.devices import resolve_device
from dbconvert.errors import DbconvertError
from dbconvert.evaluation.metric import Log, Metric, nolog
from dbconvert.families.llama.metric_help import BPC
from dbconvert.families.llama.masked import MaskedDenoiser, sequence_bound
from dbconvert.rundir import Run
from dbconvert.sampling import load_models
from dbconvert.schema import fold_seed
from dbconvert.tokenizer import run_tokenizer


def heldout_split(run: Run, split: str | None) -> str:
    """`val` when the run holds rows out (data.val_fraction), else the data set's `test` split."""
    if split:
        return split
    return "val" if run.recipe.data.val_fraction > 0 else "test"


@torch.no_grad()
def evaluate_bpc(
    run: Run | str | Path,
    model: str = "blocks",
    *,
    split: str | None = None,
    draws: int = 4,
    repeats: int = 3,
    seed: int | None = None,
    batch_size: int = 32,
    max_rows: int | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """The bound of `model` (blocks or e2e) on the held-out rows: the result record (value = bits per token)."""
    run = run if isinstance(run, Run) else Run.open(run)
    seed = run.recipe.sample.seed if seed is None else seed
    weights = weights or run.recipe.sample.weights
    if model not in ("blocks", "e2e"):
        raise DbconvertError(f"bpc evaluates the masked-diffusion bound of blocks or e2e, not {model!r}")
    if getattr(run.recipe.model, "objective", "continuous") != "masked":
        raise DbconvertError(
            "bpc is the masked-diffusion bound; this run's model.objective is not masked "
            "(split a recipe with model.objective=masked, e.g. md4-tiny-shakespeare)"
        )
    if draws < 1 or repeats < 1:
        raise DbconvertError(f"draws and repeats must be at least 1, got {draws} and {repeats}")
    device = resolve_device(run.recipe.train.device)
    models: list[MaskedDenoiser] = load_models(run, model, weights, device)  # type: ignore[assignment]
    noise = run.noise()
    owned = run.owned_ranges() if model == "blocks" else [noise.full_range()]
    per_range = draws if model == "blocks" else draws * run.num_blocks
    split = heldout_split(run, split)
    overlaps = text_split_overlaps_training(run.recipe.data, split)  # an unknown split of local text: one line
    data = run.family().load_data(run.recipe, split)
    tokens = data.tokens if max_rows is None else data.tokens[:max_rows]
    rows, length = tokens.shape
    start = time.perf_counter()
    per_repeat: list[float] = []
    pieces_sum = torch.zeros(len(owned) + 1, dtype=torch.float64)
    for rep in range(repeats):
        gen = torch.Generator().manual_seed(fold_seed(seed * 1_000_003 + rep))
        total = 0.0
        for lo in range(0, rows, batch_size):
            batch = tokens[lo : lo + batch_size].to(device)
            bound, pieces = sequence_bound(models, owned, batch, per_range, gen)
            total += float(bound.sum())
            pieces_sum += torch.stack([p.sum().cpu() for p in pieces])
        per_repeat.append(total / (rows * length))
    nats = statistics.fmean(per_repeat)
    spread = statistics.stdev(per_repeat) if repeats > 1 else float("nan")
    char = run_tokenizer(run.shared_dir).character_level()
    ln2 = math.log(2.0)
    result: dict[str, Any] = {
        "metric": "bpc",
        "value": nats / ln2,
        "values": [v / ln2 for v in per_repeat],
        "mean": nats / ln2,
        "std": spread / ln2 if repeats > 1 else 0.0,
        "features": "bits per character" if char else "bits per token",
        "num_samples": rows,
        "reference": f"{run.recipe.data.source}:{split} "
        + ("(TRAINING rows: not held out)" if overlaps else "(held-out rows)"),
        "reference_overlaps_training": overlaps,
        "source": {"kind": "run", "path": str(run.root.resolve())},
        "sampler": {"name": f"{per_range} Monte-Carlo times per range", "steps": None},
        "model": model,
        "split": split,
        "character_level": char,
        "nats_per_token": nats,
        "bits_per_token": nats / ln2,
        "bpc": nats / ln2 if char else None,
        "ppl": math.exp(nats),
        "std_over_repeats_bits": spread / ln2,
        "stderr_bits": spread / ln2 / math.sqrt(repeats) if repeats > 1 else float("nan"),
        "repeats_bits": [v / ln2 for v in per_repeat],
        "pieces_bits_per_token": [float(p) / (repeats * rows * length) / ln2 for p in pieces_sum],
        "pieces": [f"t in ({a:.4g}, {b:.4g}]" for a, b in owned] + [f"reconstruction at t_min={noise.t_min:g}"],
        "rows": rows,
        "tokens_per_row": length,
        "draws_per_range": per_range,
        "repeats": repeats,
        "seed": seed,
        "weights": weights,
        "seconds": round(time.perf_counter() - start, 2),
        "bound": "MD4 continuous-time ELBO from t_min plus the reconstruction term at t_min (an upper bound on "
        "-log p per token), estimated by Monte Carlo",
    }
    return result


class BPCMetric(Metric):
    """Bits per character (per token where the tokenizer is not character-level): the masked objective's bound."""

    name = "bpc"
    settings_keys = ("draws_per_range", "repeats")
    title = BPC.title
    lower_is_better = True
    num_option = "max_rows"
    sampler_options = ("seed", "weights")  # a bound over times, not a sampler: no steps, no solver
    help = BPC.help
    options = BPC.options

    def check(self, recipe: Any, family: Any, num: int) -> None:
        if num < 1:
            raise DbconvertError(f"--num (held-out rows for the bound) must be at least 1, got {num}")

    def evaluate(
        self, run: Any, *, model: str = "blocks", log: Log = nolog, progress: bool = False, **options: Any
    ) -> dict[str, Any]:
        for unused in ("steps", "solver"):  # the bound is an expectation over times, not a sampler
            if options.pop(unused, None) is not None:
                raise DbconvertError(f"--{unused} does not apply to eval bpc (it integrates over t; use --draws)")
        result = evaluate_bpc(run, model, **options)
        if result["reference_overlaps_training"]:
            log(
                f"note: split {result['split']!r} holds the rows the run trains on: this bound is a training "
                "figure, not a held-out one (the result says so)"
            )
        return result
