"""A converted block's output temperature, calibrated when its training starts (docs/results/quality-llama.md,
"Why a converted LM block starts worse than a fresh one").

A block cut from a pretrained causal LM reads its noisy query's hidden state, after only its own slice of
layers, through the source's final norm and LM head, which were trained to read the last layer's output
of a clean token. Its head logits are then large and wrong, and the block starts far above a fresh
block (whose small random head gives near-uniform logits) and spends its first steps unlearning them.

The head logits are linear in the final norm's weight (no bias), so a factor a in (0, 1] on them is a softmax
temperature on the head's part of the logits; the likelihood term (the noisy target itself) is untouched and
the direction of what the head knows is kept. At a = 0 the head says nothing, which is where a fresh block
starts. Each block measures its step-0 training loss on a few batches of training rows (fixed noise draws, so
the choice is deterministic; the loss is convex in a). Only when the copied head makes the start worse than no
head at all (loss at a = 1 above the loss at a = 0) does it pick the a of a fixed grid in (0, 1] with the lowest
loss.

That a is NOT baked into a weight: baked (the first version: the copied norm scaled), the blocks started no worse
but stayed behind the unscaled ones for hundreds of steps (docs/results/quality-llama.md, "What converting a pretrained
language model buys"). It is a temperature that training undoes: the head's logits are multiplied by a at step 0, rising
linearly to 1 over the recipe's warm-up steps (`head_gain_at`, set before every step through
`Family.training_schedule`), after which the block is exactly a block with the checkpoint's weights; sampling and
export never see it. Only for runs converted from a checkpoint (`model.calibrate_output`, on by default); the
unsplit source is never changed.

When: at step 0 of the block's own training, on the training device, with the network training already holds
(the copied norm scaled in place and put back bit for bit): ten step-0 losses of a few rows, one block resident.
Until this version `split` measured it for every block on the CPU, which for a 1.1B checkpoint meant a quarter of
an hour of CPU forwards of the converted network before anything was written. The rows, noise draws and grid are
the same as split's were, so the chosen scale is the same (tested). Runs split by those versions keep their
`RUN/shared/output_temperature.json`; new runs write `RUN/blocks/block-XX/output_temperature.json` the first time
the block trains (so blocks training in parallel never write one file).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dbconvert.checkpoint import atomic_write_text

TEMPERATURE_FILE = "output_temperature.json"
"""RUN/shared/ (runs split before calibration moved to training): {block name: the head's starting scale} of the
blocks whose copied head starts worse than none. RUN/blocks/block-XX/: {"scale": a, "losses": {a: loss}}."""

GRID = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
BATCHES = 4
ROWS = 16
DOCUMENTS = 2000
"""Calibration rows are packed from at most this many training documents (never the whole data set)."""


@torch.no_grad()
def step0_loss(
    denoiser: Any, rows: torch.Tensor, train_range: tuple[float, float], weighting: str, chunk: int, seed: int = 0
) -> float:
    """The block's training loss at step 0 on `rows`, with fixed noise (BATCHES batches of ROWS rows)."""
    from dbconvert.families.llama.objective import diffusion_loss

    losses = []
    for k in range(BATCHES):
        batch = rows[k * ROWS : (k + 1) * ROWS]
        if len(batch) == 0:
            break
        loss, _ = diffusion_loss(
            denoiser, batch, train_range, torch.Generator().manual_seed(seed + k), (0, 1), weighting, chunk
        )
        losses.append(float(loss))
    return sum(losses) / len(losses)


def calibrate(loss_at: Callable[[float], float]) -> tuple[float, dict[float, float]]:
    """(the head's starting scale: 1 when the head does not make the step-0 loss worse than no head, else the
    grid scale with the lowest loss; the loss at every scale evaluated, 0 included). `loss_at(a)` is the block's
    step-0 loss with the copied final norm scaled by a."""
    losses = {a: loss_at(a) for a in (0.0, *GRID)}
    if losses[1.0] <= losses[0.0]:
        return 1.0, losses
    best = min(GRID, key=lambda a: (losses[a], -a))
    return best, losses


def scaled_norm_loss(
    network: Any, denoiser: Any, rows: torch.Tensor, train_range: tuple[float, float], weighting: str, chunk: int
) -> Callable[[float], float]:
    """`loss_at(a)` for `calibrate` on the network itself: its final norm's weight scaled by a in place, the
    step-0 loss taken in eval mode, and the weight and mode put back exactly as they were."""
    norm = network.norm.weight

    def loss_at(a: float) -> float:
        original, training = norm.detach().clone(), network.training
        try:
            with torch.no_grad():
                norm.copy_(original * a)
            network.eval()
            return step0_loss(denoiser, rows.to(norm.device), train_range, weighting, chunk)
        finally:
            with torch.no_grad():
                norm.copy_(original)
            network.train(training)

    return loss_at


def write_block_temperature(folder: Path, scale: float, losses: dict[float, float]) -> None:
    atomic_write_text(
        folder / TEMPERATURE_FILE,
        json.dumps({"scale": scale, "losses": {f"{a:g}": v for a, v in losses.items()}}, indent=1),
    )


def read_block_temperature(folder: Path) -> float | None:
    """The scale a block's first training step chose, or None when it has not trained yet."""
    from dbconvert.errors import RunError

    path = folder / TEMPERATURE_FILE
    if not path.is_file():
        return None
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["scale"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise RunError(
            f"{path} is damaged; delete it (the block's next training from step 0 measures it again) "
            "or train the block with --restart"
        ) from None


def read_temperatures(shared: Path) -> dict[str, float]:
    """The starting scales split wrote ({} for runs without calibration, or split before it was a schedule)."""
    from dbconvert.errors import RunError

    path = shared / TEMPERATURE_FILE
    if not path.is_file():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
        raise RunError(
            f"{path} is not a JSON object of block names and numbers (damaged?); split the run again "
            "or delete the file to train without the calibrated start"
        ) from None


def head_gain_at(start: float, step: int, steps: int) -> float:
    """The head's scale before training step `step` (0-based): `start` at step 0, rising linearly to 1 at `steps`."""
    if steps <= 0:
        return 1.0 if step > 0 else start
    return start + (1.0 - start) * min(1.0, step / steps)
