"""The optimizers a block trains with, and the memory levers on them (docs/memory.md, "Memory options").

* `train.optimizer=adamw|adam|sgd`: torch's own, state in the weights' dtype.
* `train.optimizer=adamw8bit`: torchao's `AdamW8bit` (block-wise 8-bit moments, about 2 bytes a parameter
  instead of 8); torchao is the library that runs both on the CPU here and on CUDA (bitsandbytes' 8-bit optimizers
  are CUDA-first).
* `train.precision=bf16-true`: weights, gradients and moments in bf16. A bf16 weight cannot move by lr x update
  (~1e-4 relative) with round-to-nearest: the update is lost below bf16's 2^-8 resolution, and so is the beta2 =
  0.999 moment's. `StochasticAdamW` does the update in float32 and rounds weights and moments to bf16
  stochastically (unbiased: the expected weight follows the float32 trajectory), as torchao's bf16 optimizers do.
  Rounding draws from a generator seeded by (train.seed, step), so a resumed run repeats the same rounding.
* `train.optimizer_in_backward=true`: one optimizer per parameter, stepped in the parameter's gradient hook
  (`InBackwardOptimizer`), so a block's gradients never coexist; torchtune's `optimizer_in_bwd`.

The checkpoint of any of them is a flat set of tensors (`flatten_state` / `unflatten_state`): torchao's 8-bit
moments are tensor subclasses, saved as their inner tensors and rebuilt from them, bit-exact.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dbconvert.errors import DbconvertError

OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit")
EIGHT_BIT_BLOCK = 256
"""Elements per scale of torchao's 8-bit moments (its default block size)."""


def rounding_seed(seed: int, step: int) -> int:
    """Seed of `step`'s stochastic rounding (a resumed run draws the same)."""
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def stochastic_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bf16 rounded up with probability equal to the dropped fraction (unbiased).

    A float32 is a bf16 plus 16 low bits; adding uniform 16-bit noise to those bits and truncating rounds up with
    exactly that probability. Non-finite values are left to plain rounding.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x.float()).to(torch.bfloat16)


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay; Adam with `decoupled=False`) for bf16 weights: float32 arithmetic, weights and
    both moments stored in bf16 with stochastic rounding. Float32 parameters are updated exactly, as torch's."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        eps: float = 1e-8,
        decoupled: bool = True,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps, "decoupled": decoupled}
        )
        self.seed = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                w, g = p.float(), p.grad.float()
                if group["weight_decay"] and not group["decoupled"]:
                    g = g + group["weight_decay"] * w
                m = state["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["weight_decay"] and group["decoupled"]:
                    w = w.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                w = w.addcdiv_(m, denom, value=-group["lr"] / (1 - b1**t))
                if p.dtype == torch.bfloat16:
                    gen = generators.get(p.device)
                    if gen is None:
                        gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(self.seed)
                    p.copy_(stochastic_bf16(w, gen))
                    state["exp_avg"].copy_(stochastic_bf16(m, gen))
                    state["exp_avg_sq"].copy_(stochastic_bf16(v, gen))
                else:
                    p.copy_(w)
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)


class SeededRounding(torch.optim.Optimizer):
    """torchao's optimizers round bf16 stochastically from the global generator: step them inside a forked,
    seeded generator so the rounding is a function of (train.seed, step), not of what ran before."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:  # noqa: D107 - a wrapper, not a new optimizer
        self.inner = inner
        self.seed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        devices = sorted(
            {p.device.index for g in self.inner.param_groups for p in g["params"] if p.device.type == "cuda"}
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def eight_bit_adamw(
    params: list[nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    bf16: bool,
    device: torch.device,
) -> torch.optim.Optimizer:
    """torchao's AdamW8bit (bf16 stochastic rounding for bf16 weights), or a one-line error saying why not."""
    if device.type not in ("cpu", "cuda", "meta"):
        raise DbconvertError(
            f"train.optimizer=adamw8bit runs on cpu or cuda (torchao), not {device.type}; "
            "use train.optimizer=adamw or train.device=cpu"
        )
    import warnings

    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")  # torchao's, harmless
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise DbconvertError(
            "train.optimizer=adamw8bit needs torchao: pip install 'dbconvert[memory]' "
            "(or pip install torchao), or use train.optimizer=adamw"
        ) from None
    inner = AdamW8bit(
        params, lr=lr, betas=betas, weight_decay=weight_decay, block_size=EIGHT_BIT_BLOCK, bf16_stochastic_round=bf16
    )
    return SeededRounding(inner)


def single_optimizer(train: Any, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer over `params` (train: the recipe's train section)."""
    bf16 = train.precision == "bf16-true"
    args = {"lr": train.lr, "betas": tuple(train.betas), "weight_decay": train.weight_decay}
    if train.optimizer == "adamw8bit":
        return eight_bit_adamw(params, bf16=bf16, device=device, **args)
    if train.optimizer in ("adamw", "adam") and bf16:
        return StochasticAdamW(params, decoupled=train.optimizer == "adamw", **args)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **args)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, **args)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.betas[0], weight_decay=train.weight_decay)


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, each stepped (and its gradient freed) in that parameter's post-accumulate-grad
    hook: the gradients of a whole block never exist at once. `step` and `zero_grad` have nothing left to do.

    `param_groups` lists every inner optimizer's group (so a learning-rate schedule reaches them all) and the
    state dict is keyed by parameter index, as a single optimizer's is.
    """

    def __init__(
        self,
        make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],  # noqa: D107
        params: list[nn.Parameter],
    ) -> None:
        self.params = params
        self.inner = [make([p]) for p in params]
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(opt)) for p, opt in zip(params, self.inner)]

    @staticmethod
    def _hook(opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(_: torch.Tensor) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for opt in self.inner for g in opt.param_groups]

    @property
    def state(self) -> dict[nn.Parameter, Any]:  # type: ignore[override]
        return {p: s for opt in self.inner for p, s in opt.state.items()}

    @property
    def seed(self) -> int:
        return getattr(self.inner[0], "seed", 0) if self.inner else 0

    @seed.setter
    def seed(self, value: int) -> None:
        for i, opt in enumerate(self.inner):
            if hasattr(opt, "seed"):
                opt.seed = rounding_seed(value, i)  # every parameter its own stream

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state, groups = {}, []
        for i, opt in enumerate(self.inner):
            sd = opt.state_dict()
            if sd["state"]:
                state[i] = sd["state"][0]
            groups.append({**sd["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.inner):
            raise DbconvertError(
                f"the saved optimizer has {len(groups)} parameters, this network {len(self.inner)}; "
                "rerun with --restart"
            )
        for i, opt in enumerate(self.inner):
            st = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            opt.load_state_dict({"state": {0: st} if st else {}, "param_groups": [{**groups[i], "params": [0]}]})


def make_optimizer(train: Any, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer a block trains with: the recipe's, in the backward pass when train.optimizer_in_backward."""
    if train.optimizer_in_backward:
        return InBackwardOptimizer(lambda ps: single_optimizer(train, ps, device), params)
    return single_optimizer(train, params, device)


def set_rounding(optimizer: torch.optim.Optimizer, seed: int, step: int) -> None:
    """Seed the stochastic rounding of `step` (optimizers without any ignore it)."""
    if hasattr(optimizer, "seed"):
        optimizer.seed = rounding_seed(seed, step)


# --- checkpoints: the optimizer state as flat tensors ----------------------------------------------------------


def flatten_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors `optim.{param}.{key}` (a tensor subclass: `optim.{param}.{key}.{inner}`) and the rest as JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    subclasses: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            subclass = type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__")
            if isinstance(value, torch.Tensor) and subclass:
                names, ctx = value.__tensor_flatten__()
                for name in names:
                    tensors[f"optim.{pid}.{key}.{name}"] = getattr(value, name)
                cls = type(value)
                subclasses[f"{pid}.{key}"] = {
                    "class": f"{cls.__module__}.{cls.__qualname__}",
                    "inner": list(names),
                    "ctx": [_encode(c) for c in ctx],
                    "shape": list(value.shape),
                    "stride": list(value.stride()),
                }
            elif isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    groups = [{k: _encode(v) for k, v in g.items()} for g in sd["param_groups"]]  # torchao keeps lr as a tensor
    return tensors, json.dumps({"param_groups": groups, "scalars": scalars, "subclasses": subclasses})


def unflatten_state(tensors: dict[str, torch.Tensor], meta: str) -> dict[str, Any]:
    """The inverse of `flatten_state`: an optimizer state dict (tensor subclasses rebuilt from their inner tensors)."""
    info = json.loads(meta)
    subclasses = info.get("subclasses", {})
    state: dict[int, dict[str, Any]] = {}
    inner: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        head = name.split(".", 1)[0]
        if f"{pid}.{head}" in subclasses:
            inner.setdefault(f"{pid}.{head}", {})[name.split(".", 1)[1]] = value
        else:
            state.setdefault(int(pid), {})[name] = value
    for key, spec in subclasses.items():
        pid, name = key.split(".", 1)
        module, _, cls_name = spec["class"].rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        ctx = [_decode(c) for c in spec["ctx"]]
        value = cls.__tensor_unflatten__(inner[key], ctx, tuple(spec["shape"]), tuple(spec["stride"]))
        state.setdefault(int(pid), {})[name] = value
    for key, value in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: _decode(v) for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _encode(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return {"scalar_tensor": value.item(), "tensor_dtype": str(value.dtype).removeprefix("torch.")}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "dtype" in value:
        return getattr(torch, value["dtype"])
    if isinstance(value, dict) and "scalar_tensor" in value:
        return torch.tensor(value["scalar_tensor"], dtype=getattr(torch, value["tensor_dtype"]))
    return value


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (in place where the optimizer keeps it as a tensor, as torchao's do)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# --- static memory: bytes a parameter, by option ----------------------------------------------------------------


def moment_bytes(train: Any) -> float:
    """Optimizer-state bytes per trainable parameter once it has stepped (moments and their scales)."""
    if train.optimizer == "adamw8bit":
        return 2 * (1 + 4 / EIGHT_BIT_BLOCK)  # two int8 moments, a float32 scale per block of each
    count = 1 if train.optimizer == "sgd" else 2
    return count * (2 if train.precision == "bf16-true" else 4)


def eight_bit_eligible(numel: int) -> bool:
    """Does torchao keep this parameter's moments in 8 bits? (as bitsandbytes: at least 4096 values, whole blocks;
    smaller ones keep moments in the weights' dtype)."""
    return numel >= 4096 and numel % EIGHT_BIT_BLOCK == 0


def optimizer_state_bytes(train: Any, sizes: list[int]) -> float:
    """Exact optimizer-state bytes of trainable parameters of these element counts, once they have stepped
    (Adam's also keep a float32 step count a parameter)."""
    steps = 0 if train.optimizer == "sgd" else 4 * len(sizes)
    if train.optimizer != "adamw8bit":
        return moment_bytes(train) * sum(sizes) + steps
    dense = 2 * weight_bytes(train)
    qmap = 2 * 256 * 4  # each 8-bit moment carries its 256-entry float32 code book
    return sum(n * moment_bytes(train) + qmap if eight_bit_eligible(n) else n * dense for n in sizes) + steps


def weight_bytes(train: Any) -> int:
    """Bytes of a trained weight (and of its gradient): bf16 with bf16-true, else float32 master weights."""
    return 2 if train.precision == "bf16-true" else 4


def ema_bytes(train: Any) -> int:
    """EMA bytes per trainable parameter (float32 whatever the weights: a bf16 EMA cannot move by 1 - decay)."""
    return 0 if train.ema == "off" else 4


def bytes_per_parameter(train: Any, largest_fraction: float = 1.0) -> dict[str, float]:
    """Static bytes per trainable parameter, by part, on the accelerator; `largest_fraction` is the share of the
    largest parameter (optimizer in backward holds only that one's gradient)."""
    w = weight_bytes(train)
    grads = w * (largest_fraction if train.optimizer_in_backward else 1.0)
    on_device_ema = ema_bytes(train) if train.ema == "device" else 0
    return {
        "parameters": w,
        "gradients": grads,
        "optimizer_state": moment_bytes(train),
        "ema": on_device_ema,
        "ema_host": ema_bytes(train) if train.ema == "cpu" else 0,
    }


def describe(train: Any) -> str:
    """The memory options of a train section, as a short label (`fp32 adamw ema`, `bf16-true adamw8bit no-ema`)."""
    parts = [train.precision, train.optimizer, {"device": "ema", "cpu": "ema-cpu", "off": "no-ema"}[train.ema]]
    if train.optimizer_in_backward:
        parts.append("opt-in-bwd")
    if train.grad_accumulation > 1:
        parts.append(f"accum{train.grad_accumulation}")
    return " ".join(parts)
