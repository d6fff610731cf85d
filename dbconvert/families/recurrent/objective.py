"""Huginn's own training (the reference, `train-e2e --objective recurrent`) and the denoiser of the recurrent net.

The denoiser is the Llama family's (`LlamaDenoiser`: head logits plus the exact Gaussian likelihood of z under each
target row, D = softmax @ T, the same train = sample function and clean-token rule) around a `RecurrentNet`, whose
diffusion forward is one application of core + coda + head (`model.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dbconvert import noise as nz
from dbconvert.families.contract import shard_slice
from dbconvert.families.llama.objective import LlamaDenoiser
from dbconvert.families.recurrent.model import RecurrentCache, RecurrentNet

LOGNORMAL_STD = 0.5
"""Std of log(rate) in Huginn's sampler of r (its `randomized_iteration_sampler`)."""


def sample_recurrence(mean: int, depth: int, generator: torch.Generator) -> tuple[int, int]:
    """(steps without gradient, steps with gradient) of one Huginn training step.

    Huginn: rate ~ LogNormal(log(mean) - 0.25 / 2, 0.5) (so E[rate] = mean), r = Poisson(rate) + 1; the last
    min(k, r) core applications get gradients, the r - k before them run without."""
    mu = math.log(mean) - LOGNORMAL_STD**2 / 2
    rate = torch.exp(mu + LOGNORMAL_STD * torch.randn((1,), generator=generator, dtype=torch.float64))
    r = int(torch.poisson(rate, generator=generator).item()) + 1
    return max(r - depth, 0), min(depth, r)


class HuginnLM(nn.Module):
    """The recurrent network as Huginn trains and decodes it (the `recurrent` reference and the `source`).

    forward(tokens, state, steps): logits (B, T, V). Without `steps`: r = mean recurrence (Huginn's inference);
    without `state`: Huginn's initial state, drawn from a generator seeded by `state_seed` (deterministic).
    `extend` decodes with a per-recurrence KV cache; `net` is itself, so the Llama family's ancestral decoder
    (`generate.ancestral`, which calls `model.net.extend`) decodes it unchanged.
    """

    def __init__(self, model: RecurrentNet, state_seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.state_seed = state_seed

    @property
    def net(self) -> "HuginnLM":
        return self

    def forward(
        self, tokens: torch.Tensor, state: torch.Tensor | None = None, steps: tuple[int, int] | None = None
    ) -> torch.Tensor:
        s = self.model.shape
        if state is None:
            gen = torch.Generator().manual_seed(self.state_seed)
            state = self.model.initial_state((*tokens.shape, s.hidden_size), gen, tokens.device)
        no_grad, grad = steps if steps is not None else (s.mean_recurrence, 0)
        return self.model.recurrent_logits(tokens, state, no_grad, grad)

    def column_state(self, start: int, m: int, batch: int, device: torch.device) -> torch.Tensor:
        """Initial states of columns start..start+m-1 (B, m, H): one generator per column, the same for every row,
        so a row decodes the same in any batch."""
        h = self.model.shape.hidden_size
        rows = [
            self.model.initial_state((h,), torch.Generator().manual_seed(self.state_seed * 1_000_003 + c))
            for c in range(start, start + m)
        ]
        return torch.stack(rows)[None].expand(batch, -1, -1).to(device)

    def extend(
        self, cache: RecurrentCache | None, tokens: torch.Tensor, start: int, pad: torch.Tensor | None = None
    ) -> tuple[RecurrentCache, torch.Tensor]:
        """Append tokens (B, m) at columns start.. (r = mean recurrence); returns (cache, logits of the last)."""
        state = self.column_state(start, tokens.shape[1], tokens.shape[0], tokens.device)
        return self.model.recurrent_extend(cache, tokens, start, self.model.shape.mean_recurrence, state, pad)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`) wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def step_generator(network: RecurrentNet) -> torch.Generator:
    """The generator of r and s_0 at the network's current training step (`RecurrentFamily.training_schedule` sets
    `train_step` and `train_seed` before every step): resume draws the same r as an uninterrupted run."""
    seed = getattr(network, "train_seed", 0) * 1_000_003 + 7_919 * getattr(network, "train_step", 0) + 424_242
    return torch.Generator().manual_seed(seed % (2**63))


def recurrent_loss(
    model: nn.Module, tokens: torch.Tensor, shard: tuple[int, int] = (0, 1)
) -> tuple[torch.Tensor, dict[str, float]]:
    """Huginn's training loss: next-token cross-entropy after r ~ Poisson-log-normal recurrences from a random
    state, gradients through the last k (model.backprop_depth) only. Randomness: the global batch's states are
    drawn and this rank's slice kept (`shard`), r is the same on every rank."""
    lm = unwrap(model)
    assert isinstance(lm, HuginnLM)
    net, s = lm.model, lm.model.shape
    gen = step_generator(net)
    no_grad, grad = sample_recurrence(s.mean_recurrence, s.backprop_depth, gen)
    inputs = tokens[:, :-1]
    n, keep = shard_slice(inputs.shape[0], shard)
    state = net.initial_state((n, inputs.shape[1], s.hidden_size), gen)[keep].to(tokens.device)
    logits = model(inputs, state, (no_grad, grad))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    return loss, {
        "ce": loss.item(),
        "ppl": math.exp(min(loss.item(), 50.0)),
        "recurrence": float(no_grad + grad),
        "backprop_steps": float(grad),
    }


class RecurrentDenoiser(LlamaDenoiser):
    """The Llama family's text denoiser around a RecurrentNet: D(z, sigma) = softmax(head + likelihood) @ T, with
    the network's one core + coda application as the denoising step (clean columns enter at c_in(0))."""

    def __init__(self, net: RecurrentNet, table: torch.Tensor, noise: nz.NoiseSettings) -> None:
        super().__init__(net, table, noise)  # type: ignore[arg-type]
        net.clean_gain = float(nz.c_in(torch.tensor(0.0), noise.sigma_data))


def layer_evaluations(shape: "object", tokens: int, kind: str, recurrence: float | None = None) -> float:
    """Training compute of one step in layer evaluations (the later paper's App. H accounting: a backward pass
    costs two forwards), for `tokens` tokens per step.

    recurrent (Huginn): forward prelude + r core + coda layers, backward through prelude + k core + coda;
    denoiser: prelude over the T clean tokens, core + coda over 2T columns ([clean ; noisy]), once, backward
    through all of it. r defaults to Huginn's expected r = mean_recurrence + 1 (Poisson + 1)."""
    p, c, d = shape.prelude_layers, shape.core_layers, shape.coda_layers  # type: ignore[attr-defined]
    if kind == "recurrent":
        r = shape.mean_recurrence + 1 if recurrence is None else recurrence  # type: ignore[attr-defined]
        k = shape.backprop_depth  # type: ignore[attr-defined]
        return tokens * ((p + c * r + d) + 2 * (p + c * k + d))
    return 3 * tokens * (p + 2 * (c + d))
