"""One training step, shared by `train` and `bench`: optimizer, precision, EMA and the step itself.

`bench` must measure exactly what `train-block` runs, so both build a `TrainingState` here
and call `TrainingState.step`; nothing else decides the order of forward, backward,
optimizer step and EMA update.
"""

from __future__ import annotations

from collections.abc import Mapping

import types
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from dbconvert.building import load_network
from dbconvert.config import Recipe
from dbconvert.errors import DbconvertError
from dbconvert.families.contract import Family
from dbconvert.noise_process import NoiseProcess


def make_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.betas[0], weight_decay=t.weight_decay)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    grad_clip: float | None,
) -> None:
    """Backward, optional clipping, optimizer step, then free the gradients.

    Freeing them right after the step (not before the next backward) keeps one gradient-sized
    buffer out of the next forward pass's peak memory.
    """
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def learning_rate(recipe: Recipe, step: int, total: int | None = None) -> float:
    """Linear warm-up over train.warmup_steps, then constant or (lr_schedule=cosine, `total` steps) cosine to 0."""
    warm = recipe.train.warmup_steps
    lr = recipe.train.lr * min(1.0, (step + 1) / warm) if warm else recipe.train.lr
    if recipe.train.lr_schedule == "cosine" and total and step >= warm:
        import math

        progress = (step - warm) / max(1, total - warm)
        lr = recipe.train.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


@torch.no_grad()
def ema_decay_at(decay: float, step: int, warmup: bool = True) -> float:
    """EMA decay of `step` (0-based): with warmup, min(decay, (1 + step) / (10 + step)).

    A plain 0.9999 EMA still holds 90% of the initial weights after 1000 steps; the warmup
    makes the EMA follow the model early and reach the full decay later (0.999 by ~9000 steps).
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p.detach(), 1.0 - decay)


def precision_context(precision: str, device: torch.device):  # noqa: ANN202
    """(autocast context factory, grad scaler) for fp32 / bf16 / fp16."""
    if precision == "fp32":
        return nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise DbconvertError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 here")
    return (lambda: torch.autocast(device.type, dtype=dtype)), torch.amp.GradScaler(device.type, enabled=precision == "fp16")




Objective = str
"""`denoiser` (blocks and the e2e baseline: the family's diffusion loss) or `ar` (the autoregressive reference)."""


@dataclass
class TrainingState:
    """What one training process holds: the network, its wrapper, the EMA copy, optimizer and precision."""

    family: Family
    recipe: Recipe
    network: nn.Module
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    autocast: Callable[[], AbstractContextManager[Any]]
    scaler: torch.amp.GradScaler
    objective: Objective = "denoiser"

    def loss(self, forward: nn.Module, batch: list[torch.Tensor], sigma_range: tuple[float, float],
             generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's loss of one batch through `forward` (the model, or its DDP / compiled wrapper)."""
        with self.autocast():
            if self.objective != "denoiser":  # the reference (ar, classifier)
                return self.family.reference_loss(forward, batch, self.recipe, shard)
            return self.family.training_loss(forward, batch, sigma_range, self.recipe, generator, shard)

    def heldout(self, batch: list[torch.Tensor], sigma_range: tuple[float, float], seed: int) -> dict[str, float]:
        """The family's held-out metrics of a fixed batch, in eval mode, with a fixed generator (comparable over steps)."""
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                return self.family.heldout_metrics(self.model, batch, sigma_range, self.recipe,
                                                   torch.Generator().manual_seed(seed), self.objective)
        finally:
            self.model.train()

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Backward, optimizer step, EMA update at `step`'s decay (train.py's order)."""
        t = self.recipe.train
        optimizer_step(loss, self.optimizer, self.scaler, self.trainable, t.grad_clip)
        ema_update(self.ema, self.network, ema_decay_at(t.ema_decay, step, t.ema_warmup))

    def step(self, batch: list[torch.Tensor], sigma_range: tuple[float, float], generator: torch.Generator,
             step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """One whole training step without data parallelism (what `bench` measures)."""
        self.model.train()
        loss, stats = self.loss(self.model, batch, sigma_range, generator)
        self.update(loss, step)
        return loss.detach(), stats


def share_frozen(ema: nn.Module, network: nn.Module) -> None:
    """The EMA of a frozen parameter is the parameter: let the EMA copy use the same tensor (no second copy)."""
    for (_, e), (_, p) in zip(ema.named_parameters(), network.named_parameters()):
        if not p.requires_grad:
            e.data = p.data


def checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A layer's own forward, recomputed in backward (non-reentrant checkpoint) when it trains with gradients.

    In eval mode or without gradients (held-out metrics, sampling, EMA) it is the plain forward.
    """
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_layers(layers: list[nn.Module]) -> None:
    """Make every layer's forward checkpointed (activation checkpointing), in place.

    Only the instance's `forward` is replaced (a bound method, so a deep copy rebinds it to the copy):
    parameters, buffers and state-dict keys are untouched, and so are the saved weights.
    """
    for layer in layers:
        layer.forward = types.MethodType(checkpointed_forward, layer)  # type: ignore[method-assign]


def build_state(family: Family, recipe: Recipe, depth: int, noise: NoiseProcess, device: torch.device,
                objective: Objective = "denoiser", initial: Mapping[str, torch.Tensor] | None = None,
                what: str = "initial weights") -> TrainingState:
    """Network of `depth` layers wrapped for `objective`, its EMA copy, optimizer and precision on `device`.

    With `initial` (the weights training starts from) the network is built on the meta device and the weights
    assigned, widened to float32 master weights one tensor at a time: no random init, no second copy. The EMA
    copy is assigned clones of the network's tensors (it starts equal to them) in the same way.
    """
    factory = lambda: family.block_network(recipe, depth)  # noqa: E731
    network = factory() if initial is None else load_network(factory, initial, what, torch.float32)
    if recipe.train.activation_checkpointing:
        checkpoint_layers(family.layers(network))
    model = family.reference_model(recipe, network) if objective != "denoiser" else family.denoiser(recipe, network, noise)
    model = model.to(device)
    ema = load_network(factory, {k: v.detach().clone() for k, v in network.state_dict().items()}, "EMA copy")
    ema = ema.to(device).requires_grad_(False)
    share_frozen(ema, network)
    trainable = [p for p in network.parameters() if p.requires_grad]
    autocast, scaler = precision_context(recipe.train.precision, device)
    return TrainingState(family, recipe, network, model, ema, make_optimizer(recipe, trainable), trainable,
                         autocast, scaler, objective)
