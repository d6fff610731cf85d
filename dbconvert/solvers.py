"""The sampling solvers (DESIGN 4): one function per solver, all with one signature (as k-diffusion's samplers).

A solver takes one step of the probability-flow ODE from noise level `t` to `t_next`:

    solver(denoised, z, t, t_next) -> z at t_next

where `denoised(z, level)` is D(z, level) of the block that owns `level` (`sampling.edm_sample` dispatches).
Euler: `d = (z - D(z, t)) / t`, `z + (t_next - t) * d`; Heun adds the trapezoid correction whenever
`t_next > 0`, evaluated with the block that owns `t_next`.

The registry below is the one list of solvers: the recipe's `sample.solver` choices, `--solver`'s check and
help derive from it; a new solver is one function and one entry (or `register_solver` at run time, which
`$DBCONVERT_SOLVERS` hands to the processes dbconvert starts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dbconvert.errors import DbconvertError
from dbconvert.registry import Registry

if TYPE_CHECKING:
    import torch  # annotations only: the CLI's help path never imports torch

Denoised = Callable[["torch.Tensor", float], "torch.Tensor"]
"""(z, level) -> D(z, level), computed by the block that owns `level`."""
Solver = Callable[[Denoised, "torch.Tensor", float, float], "torch.Tensor"]


def euler(denoised: Denoised, z: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step from t to t_next."""
    d = (z - denoised(z, t)) / t
    return z + (t_next - t) * d


def heun(denoised: Denoised, z: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Heun step: Euler, then the trapezoid correction at t_next (none at t_next = 0)."""
    d = (z - denoised(z, t)) / t
    z_next = z + (t_next - t) * d
    if t_next > 0:
        d_next = (z_next - denoised(z_next, t_next)) / t_next
        z_next = z + (t_next - t) * 0.5 * (d + d_next)
    return z_next


SOLVERS: dict[str, str] = {
    "euler": "dbconvert.solvers:euler",
    "heun": "dbconvert.solvers:heun",
}
"""solver name -> "module:function" (the first is the recipe's default)."""

SOLVERS_ENV = "DBCONVERT_SOLVERS"
"""Solvers registered at run time, as JSON {name: "module:function"} (handed to child processes)."""

REGISTRY = Registry("solver", SOLVERS, SOLVERS_ENV, noun="function")


def solver_names() -> list[str]:
    """The registered solvers, the built-in ones first in their order, then the run-time ones."""
    return [*SOLVERS, *(n for n in REGISTRY.names() if n not in SOLVERS)]


def solver_choices() -> str:
    """`euler or heun`: the choices, as help and errors write them."""
    return " or ".join(solver_names())


def check_solver(solver: str, what: str = "--solver") -> str:
    """`solver` if it is registered, else a one-line error naming the choices."""
    if solver not in REGISTRY:
        raise DbconvertError(f"{what} must be {solver_choices()}, not {solver!r}")
    return solver


def get_solver(name: str) -> Solver:
    """The solver function called `name` (a one-line error naming the choices otherwise)."""
    check_solver(name, "the solver")
    return REGISTRY.load(name)


def register_solver(name: str, path: str) -> None:
    """Register a solver by "module:function"; child processes inherit it."""
    REGISTRY.register(name, path)


def unregister_solver(name: str) -> None:
    REGISTRY.unregister(name)


__all__ = [
    "REGISTRY",
    "SOLVERS",
    "SOLVERS_ENV",
    "Denoised",
    "Solver",
    "check_solver",
    "euler",
    "get_solver",
    "heun",
    "register_solver",
    "solver_choices",
    "solver_names",
    "unregister_solver",
]
