"""A converted block's output temperature, calibrated at split (README "Why a converted LM block starts worse").

A block cut from a pretrained causal LM reads its noisy query's hidden state, after only its own slice of
layers, through the source's final norm and LM head, which were trained to read the last layer's output
of a clean token. Its head logits are then large and wrong, and the block starts far above a fresh
block (whose small random head gives near-uniform logits) and spends its first steps unlearning them.

The head logits are linear in the final norm's weight (no bias), so scaling a block's copy of
`norm.weight` by a factor a in (0, 1] is a softmax temperature on the head's part of the logits; the
likelihood term (the noisy target itself) is untouched, the direction of what the head knows is kept,
and the weight is trained as before. At a = 0 the head says nothing, which is where a fresh block starts.
`split` measures, per block, the step-0 training loss on a few batches of training rows (fixed noise draws,
so the choice is deterministic; the loss is convex in a). Only when the copied head makes the start worse
than no head at all (loss at a = 1 above the loss at a = 0) does it scale, by the a of a fixed grid in
(0, 1] with the lowest loss; otherwise the block keeps the source's weights exactly, because a head that
already helps at step 0 helped further in training too (README). Only for runs converted from a checkpoint
(`model.calibrate_output`, off by default since a converged source showed it costs the later advantage: README
"What converting a pretrained language model buys"); the unsplit source is never changed.
"""

from __future__ import annotations

from typing import Any

import torch

GRID = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
BATCHES = 4
ROWS = 16
DOCUMENTS = 2000
"""Calibration rows are packed from at most this many training documents (never the whole data set)."""


@torch.no_grad()
def step0_loss(denoiser: Any, rows: torch.Tensor, train_range: tuple[float, float], weighting: str, chunk: int,
               seed: int = 0) -> float:
    """The block's training loss at step 0 on `rows`, with fixed noise (BATCHES batches of ROWS rows)."""
    from dbconvert.families.llama.objective import diffusion_loss

    losses = []
    for k in range(BATCHES):
        batch = rows[k * ROWS:(k + 1) * ROWS]
        if len(batch) == 0:
            break
        loss, _ = diffusion_loss(denoiser, batch, train_range, torch.Generator().manual_seed(seed + k), (0, 1),
                                 weighting, chunk)
        losses.append(float(loss))
    return sum(losses) / len(losses)


def calibrate(make_denoiser: Any, state: dict[str, torch.Tensor], rows: torch.Tensor, train_range: tuple[float, float],
              weighting: str, chunk: int) -> tuple[float, dict[float, float]]:
    """(the scale of `norm.weight`: 1 when the head does not make the step-0 loss worse than no head, else the
    grid scale with the lowest loss; the loss at every scale evaluated, 0 included).

    `make_denoiser(state)` builds the block's denoiser from a state dict."""
    losses = {}
    for a in (0.0, *GRID):
        scaled = dict(state)
        scaled["norm.weight"] = state["norm.weight"] * a
        losses[a] = step0_loss(make_denoiser(scaled).eval(), rows, train_range, weighting, chunk)
    if losses[1.0] <= losses[0.0]:
        return 1.0, losses
    best = min(GRID, key=lambda a: (losses[a], -a))
    return best, losses
