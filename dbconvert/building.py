"""Networks built without their weights (parameters on the meta device) and filled by assignment.

Building a network normally allocates and randomly initialises every parameter, only for a state dict to be
copied over them: twice a block's memory, and the time of the random init. Here the parameters are created on the
meta device (no memory, no init, no random numbers drawn) while buffers stay real (rotary tables, a head gain:
values the constructor computes and no state dict holds), and `load_state_dict(assign=True)` then makes the loaded
tensors the parameters themselves. `torch.device("meta")` alone would also put the buffers on meta, where
nothing could fill them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from dbconvert.checkpoint import check_state
from dbconvert.tensorio import spec_of, specs_of, to_dtype

M = TypeVar("M", bound=nn.Module)


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Inside: every parameter a module registers is replaced by a meta tensor of its shape (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_empty(factory: Callable[[], M]) -> M:
    """`factory()` with its parameters on the meta device (see the module docstring)."""
    with empty_parameters():
        return factory()


def assign_state(network: M, state: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype | None = None) -> M:
    """Make `state`'s tensors `network`'s parameters (strict: keys and shapes checked first, in one line).

    With `dtype`, floating tensors are converted on the way (one tensor at a time). Parameters keep the
    network's `requires_grad` (frozen tables stay frozen).
    """
    check_state(network.state_dict(), specs_of(state), what)  # specs: a lazy state is not read for the check
    tensors = {k: (to_dtype(v, dtype) if dtype is not None else v) for k, v in state.items()}
    network.load_state_dict(tensors, strict=True, assign=True)
    return network


def load_network(
    factory: Callable[[], M], state: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype | None = None
) -> M:
    """The network of `factory` holding `state`, without a second copy of its weights."""
    return assign_state(build_empty(factory), state, what, dtype)


def meta_specs(factory: Callable[[], nn.Module]) -> dict:
    """The state dict specs (dtype, shape) of `factory()`'s network, built on meta (no memory)."""
    return {k: spec_of(v) for k, v in build_empty(factory).state_dict().items()}
