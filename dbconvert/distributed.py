"""Data parallelism on PyTorch's own stack: the process group comes from torchrun's environment.

`torchrun --nproc-per-node N -m dbconvert train-block I` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `setup()` turns that into a
`torch.distributed` process group (NCCL on CUDA, gloo on CPU). Without that environment
training runs as one process, exactly as before.

The global batch of the recipe is split across ranks: every rank computes the same global
batch indices and the same per-step random draws (noise levels, noise, label dropout) for
the whole global batch, and keeps its own contiguous slice. Gradients are averaged by
`DistributedDataParallel`, so N ranks compute the same update as one process would on the
global batch (to float rounding of the all-reduce).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from dbconvert.errors import DbconvertError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank r of world_size (1 = single process, no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): which slice of the global batch this process computes."""
        return self.rank, self.world_size

    def local_batch(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            raise DbconvertError(
                f"train.batch_size={global_batch} (the global batch) does not divide by the world size "
                f"{self.world_size}; use a multiple of {self.world_size}"
            )
        return global_batch // self.world_size

    def slice(self, global_batch: int) -> slice:
        b = self.local_batch(global_batch)
        return slice(self.rank * b, (self.rank + 1) * b)


SINGLE = Dist()


def from_env(env: dict[str, str] | None = None) -> Dist:
    """Read torchrun's environment (no WORLD_SIZE, or 1: single process)."""
    env = dict(os.environ if env is None else env)
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DbconvertError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        return SINGLE
    if not 0 <= rank < world:
        raise DbconvertError(f"RANK={rank} is outside WORLD_SIZE={world}")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise DbconvertError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; start with torchrun")
    return Dist(rank, world, local, None)


def setup(device_name: str = "auto") -> tuple[Dist, str]:
    """Join the process group described by the environment; returns (dist, device name for this rank).

    On CUDA each rank takes device LOCAL_RANK and uses NCCL; otherwise gloo on the CPU.
    Calling it again in a process that already has a group reuses that group.
    """
    import torch.distributed as td

    info = from_env()
    if not info.enabled:
        return info, device_name
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    device = f"cuda:{info.local_rank}" if use_cuda else ("cpu" if device_name == "auto" else device_name)
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not td.is_initialized():
        td.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return Dist(td.get_rank(), td.get_world_size(), info.local_rank, backend), device


def teardown(info: Dist) -> None:
    import torch.distributed as td

    if info.enabled and td.is_initialized():
        td.destroy_process_group()


def barrier(info: Dist) -> None:
    import torch.distributed as td

    if info.enabled:
        td.barrier()


def broadcast_error(info: Dist, message: str | None) -> None:
    """Rank 0 tells every rank whether it may go on; a non-None message stops all ranks with it."""
    import torch.distributed as td

    if not info.enabled:
        if message:
            raise DbconvertError(message)
        return
    box: list[Any] = [message]
    td.broadcast_object_list(box, src=0)
    if box[0]:
        raise DbconvertError(box[0] if info.is_main else f"rank 0 stopped: {box[0]}")


def mean_across(info: Dist, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging and the NaN check: every rank sees the same value)."""
    import torch.distributed as td

    if not info.enabled:
        return value.detach()
    out = value.detach().float().clone()
    td.all_reduce(out)
    return out / info.world_size


def reduce_stats(info: Dist, stats: dict[str, float]) -> dict[str, float]:
    """Logged statistics of the global batch: `*_min` keys by min, `*_max` by max, the rest by mean."""
    import torch.distributed as td

    if not info.enabled or not stats:
        return stats
    keys = sorted(stats)
    out = {}
    for op, pick in (
        (td.ReduceOp.MIN, lambda k: k.endswith("_min")),
        (td.ReduceOp.MAX, lambda k: k.endswith("_max")),
        (td.ReduceOp.SUM, lambda k: not k.endswith(("_min", "_max"))),
    ):
        chosen = [k for k in keys if pick(k)]
        if not chosen:
            continue
        values = torch.tensor([float(stats[k]) for k in chosen], dtype=torch.float64)
        td.all_reduce(values, op=op)
        if op == td.ReduceOp.SUM:
            values /= info.world_size
        out.update(zip(chosen, values.tolist()))
    return out


class DDP(torch.nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel that also exposes the wrapped denoiser's attributes.

    The families' losses read `denoiser.noise`, `denoiser.null_class`, `denoiser.table`.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(info: Dist, module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """`module` under DistributedDataParallel when there are several ranks, else itself."""
    if not info.enabled:
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)
