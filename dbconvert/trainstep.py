"""One training step, shared by `train` and `bench`: optimizer, precision, EMA and the step itself.

`bench` must measure exactly what `train-block` runs, so both build a `TrainingState` here
and call `TrainingState.step`; nothing else decides the order of forward, backward,
optimizer step and EMA update.
"""

from __future__ import annotations

from collections.abc import Mapping

import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
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
from dbconvert.optimizers import make_optimizer, set_rounding


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    grad_clip: float | None,
) -> None:
    """Optional clipping, optimizer step, then free the gradients (after the backward passes of a step).

    Freeing them right after the step (not before the next backward) keeps one gradient-sized
    buffer out of the next forward pass's peak memory. With train.optimizer_in_backward the step was taken in
    backward already (the optimizer's `step` does nothing) and no gradient is left to free.
    """
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
    """EMA <- decay * EMA + (1 - decay) * weights, in the EMA's dtype and on its device (float32; cpu or not)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p.detach().to(e.device, e.dtype), 1.0 - decay)  # a device-to-host copy must be complete


def precision_context(precision: str, device: torch.device):  # noqa: ANN202
    """(autocast context factory, grad scaler) for fp32 / bf16 / fp16 / bf16-true.

    bf16-true computes under bf16 autocast too: its weights are bf16 already, and autocast casts the float32 inputs
    (noise, images) to them and keeps the reductions autocast keeps in float32 (norms, softmax) there.
    """
    if precision == "fp32":
        return nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    if precision == "fp16" and device.type != "cuda":
        raise DbconvertError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 here")
    return (lambda: torch.autocast(device.type, dtype=dtype)), torch.amp.GradScaler(
        device.type, enabled=precision == "fp16"
    )


Objective = str
"""`denoiser` (blocks and the e2e baseline: the family's diffusion loss) or `ar` (the autoregressive reference)."""


@dataclass
class TrainingState:
    """What one training process holds: the network, its wrapper, the EMA copy, optimizer and precision."""

    family: Family
    recipe: Recipe
    network: nn.Module
    model: nn.Module
    ema: nn.Module | None
    """The EMA copy (train.ema=device|cpu), None with train.ema=off."""
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    autocast: Callable[[], AbstractContextManager[Any]]
    scaler: torch.amp.GradScaler
    objective: Objective = "denoiser"

    def loss(
        self,
        forward: nn.Module,
        batch: list[torch.Tensor],
        sigma_range: tuple[float, float],
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's loss of one batch through `forward` (the model, or its DDP / compiled wrapper)."""
        with self.autocast():
            if self.objective != "denoiser":  # the reference (ar, classifier)
                return self.family.reference_loss(forward, batch, self.recipe, shard)
            return self.family.training_loss(forward, batch, sigma_range, self.recipe, generator, shard)

    def heldout(self, batch: list[torch.Tensor], sigma_range: tuple[float, float], seed: int) -> dict[str, float]:
        """The family's held-out metrics of a fixed batch, in eval mode, with a fixed generator (comparable over
        steps)."""
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                return self.family.heldout_metrics(
                    self.model, batch, sigma_range, self.recipe, torch.Generator().manual_seed(seed), self.objective
                )
        finally:
            self.model.train()

    def train_step(
        self,
        forward: nn.Module,
        batch: list[torch.Tensor],
        sigma_range: tuple[float, float],
        generator: torch.Generator,
        step: int,
        shard: tuple[int, int] = (0, 1),
        check: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step over `batch`, in train.grad_accumulation micro-batches (train.py's order).

        Each micro-batch: forward, `check` of its loss (train.py: the mean over ranks, refused when not finite;
        before its backward, so an optimizer in backward never steps on it), backward of loss / N (DDP syncs the
        last only). Then the optimizer step (already taken in backward with train.optimizer_in_backward), the
        gradients freed and the EMA updated at `step`'s decay. Returns the mean loss and the mean statistics.
        """
        t = self.recipe.train
        set_rounding(self.optimizer, t.seed, step)
        parts = micro_batches(batch, t.grad_accumulation)
        losses: list[torch.Tensor] = []
        totals: dict[str, float] = {}
        device = self.trainable[0].device if self.trainable else torch.device("cpu")
        with seeded_global_rng(generator, shard[0], device):  # dropout draws from the global RNG
            for i, micro in enumerate(parts):
                sync = i == len(parts) - 1 or not hasattr(forward, "no_sync")
                with nullcontext() if sync else forward.no_sync():
                    loss, stats = self.loss(forward, micro, sigma_range, generator, shard)
                    losses.append(check(loss) if check else loss.detach())
                    self.scaler.scale(loss / len(parts)).backward()
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value / len(parts)
            self.update(step)
        return torch.stack(losses).mean(), totals

    def update(self, step: int) -> None:
        """After the backward passes: optimizer step, gradients freed, EMA update at `step`'s decay."""
        t = self.recipe.train
        optimizer_step(self.optimizer, self.scaler, self.trainable, t.grad_clip)
        if self.ema is not None:
            ema_update(self.ema, self.network, ema_decay_at(t.ema_decay, step, t.ema_warmup))

    def step(
        self, batch: list[torch.Tensor], sigma_range: tuple[float, float], generator: torch.Generator, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One whole training step without data parallelism (what `bench` measures)."""
        self.model.train()
        return self.train_step(self.model, batch, sigma_range, generator, step)


def global_rng_seed(generator: torch.Generator, rank: int = 0) -> int:
    """The global RNG's seed for one training step: a pure function of the step's own generator seed (itself one of
    (train.seed, step, target): `train.step_generator`) and the data-parallel rank, mixed so that the global stream
    is not the generator's own."""
    return (generator.initial_seed() * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407 + rank * 2_654_435_761) % (
        2**63 - 1
    )


@contextmanager
def seeded_global_rng(generator: torch.Generator, rank: int, device: torch.device) -> Iterator[None]:
    """Run one training step with torch's global RNG (the CPU's, and the training device's) seeded from the step.

    What draws from the global RNG inside a step (dropout: `nn.Dropout` takes no generator) is then deterministic
    by seed, and a resumed run draws what an uninterrupted one drew at the same step. The global state is restored
    afterwards, so nothing outside the step (and nothing of a run without dropout) draws anything different."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(global_rng_seed(generator, rank))
        yield


def micro_batches(batch: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    """`batch` cut into `n` equal micro-batches along the first dimension (the schema checks it divides)."""
    if n == 1:
        return [batch]
    rows = len(batch[0])
    if rows % n:
        raise DbconvertError(
            f"a batch of {rows} rows does not divide into train.grad_accumulation={n} micro-batches; "
            "make train.batch_size (per rank) a multiple of it"
        )
    return [list(chunk) for chunk in zip(*(t.chunk(n) for t in batch))]


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


def build_state(
    family: Family,
    recipe: Recipe,
    depth: int,
    noise: NoiseProcess,
    device: torch.device,
    objective: Objective = "denoiser",
    initial: Mapping[str, torch.Tensor] | None = None,
    what: str = "initial weights",
) -> TrainingState:
    """Network of `depth` layers wrapped for `objective`, its EMA copy, optimizer and precision on `device`.

    With `initial` (the weights training starts from) the network is built on the meta device and the weights
    assigned, widened to float32 master weights one tensor at a time: no random init, no second copy. The EMA
    copy is assigned clones of the network's tensors (it starts equal to them) in the same way.
    """
    t = recipe.train
    dtype = torch.bfloat16 if t.precision == "bf16-true" else torch.float32
    factory = lambda: family.block_network(recipe, depth)  # noqa: E731
    network = factory().to(dtype) if initial is None else load_network(factory, initial, what, dtype)
    if t.activation_checkpointing:
        checkpoint_layers(family.layers(network))
    model = (
        family.reference_model(recipe, network) if objective != "denoiser" else family.denoiser(recipe, network, noise)
    )
    model = model.to(device)
    ema = None
    if t.ema != "off":
        ema = load_network(
            factory, {k: v.detach().clone() for k, v in network.state_dict().items()}, "EMA copy", torch.float32
        )
        ema = ema.to(device if t.ema == "device" or device.type == "meta" else torch.device("cpu")).requires_grad_(
            False
        )
        if dtype == torch.float32 and t.ema == "device":
            share_frozen(ema, network)
    trainable = [p for p in network.parameters() if p.requires_grad]
    if (
        t.optimizer_in_backward
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise DbconvertError(
            "train.optimizer_in_backward=true steps before data parallelism averages the gradients: "
            "train on one process, or drop the option"
        )
    autocast, scaler = precision_context(t.precision, device)
    return TrainingState(
        family,
        recipe,
        network,
        model,
        ema,
        make_optimizer(t, trainable, device),
        trainable,
        autocast,
        scaler,
        objective,
    )
