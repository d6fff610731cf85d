"""The typed recipe sections shared by every family (no family imports here).

Family-specific model sections subclass `ModelConfig` in `families/<name>/config.py`; the
`Recipe` that assembles them lives in `config.py`. Keeping the sections here keeps the
import graph one-way: config -> families -> schema.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dbconvert.noise_process import NoiseProcess, process_class, process_names
from dbconvert.solvers import SOLVERS, solver_choices, solver_names


MAX_SEED = 2**63 - 1
"""The largest seed (recipe seeds, --seed): torch's generators take 64 bits, and a seed derived from one by
arithmetic (`fold_seed`) is folded back below 2^63."""
MAX_TRAIN_STEPS = 10**9
"""The most training steps (train.steps, --steps, train.epochs counted in steps): far beyond any real run, so a
typo such as an extra zero or `inf` is one line instead of a run that never ends or an overflow."""
MAX_EPOCHS = 10**6
MAX_SAMPLE_STEPS = 100_000
"""The most diffusion steps of sampling (sample.steps, --steps of sample and eval)."""


def fold_seed(value: int) -> int:
    """A seed derived from a user's (seed * 1_000_003 + i) as one torch's `manual_seed` takes: unchanged below 2^63,
    so every seed that worked before gives the same numbers."""
    return value % (MAX_SEED + 1)


def within(value: float, low: float, high: float, low_open: bool = False) -> bool:
    """low <= value <= high (low < value with `low_open`); NaN is never within, so a finite `high` means finite."""
    return (value > low if low_open else value >= low) and value <= high


def range_text(low: float, high: float, low_open: bool = False, unit: str = "") -> str:
    """`from 1 to 1000000000`: the whole allowed range, for one-line errors (recipe keys and CLI options alike)."""
    return (f"above {low} and at most {high}" if low_open else f"from {low} to {high}") + unit


def in_range(low: float, high: float, low_open: bool = False, unit: str = "") -> AfterValidator:
    """A recipe number check whose message says the whole allowed range (pydantic's names only the bound that
    failed, and lets `inf` through a lower bound)."""

    def check(value: Any) -> Any:
        if value is not None and not within(value, low, high, low_open):
            raise ValueError(f"must be {range_text(low, high, low_open, unit)}")
        return value

    return AfterValidator(check)


SEED_UNIT = " (2^63 - 1, the seeds torch takes)"
EPOCHS_UNIT = " (a finite number)"


Seed = Annotated[int, in_range(0, MAX_SEED, unit=SEED_UNIT)]
"""Every seed of a recipe (train.seed, sample.seed, data.split_seed, a family's model.init_seed)."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are re-validated, no number is inf or nan."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """true/false is never a number: pydantic would read `model.head_rank=true` as 1."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not Any and annotation is not bool and bool not in get_args(annotation):
                raise ValueError(f"expected {annotation_text(annotation)}, not {str(value).lower()}")
        return value


def annotation_text(annotation: Any) -> str:
    """`int`, `int or null`, ... : a field's type in words, for errors."""
    args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in get_args(annotation) else "")


class ModelConfig(Section):
    """Fields common to every family; each family subclasses this with its own fields."""

    family: str
    checkpoint: str | None = None
    storage_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype of the weights `split` writes: `auto` keeps a checkpoint's own (a bf16 checkpoint gives bf16
    blocks, half the disk and memory of float32); a fresh network is float32. Training computes in its own
    precision (float32 master weights by default) whatever the blocks are stored in."""

    data_modality: ClassVar[str] = ""
    """`image` or `text`: which of DataConfig's modality options (IMAGE_DATA_OPTIONS, TEXT_DATA_OPTIONS) the family
    reads; a recipe setting the other modality's options is refused instead of silently ignoring them."""


class DataConfig(Section):
    """Where the training data comes from.

    `source` is a built-in name (`digits`), a Hugging Face hub data set name (`cifar10`),
    a local image folder, a `.npz` file or a folder of `.npz` shards, or text file(s).
    """

    source: str = "digits"
    kind: Literal["auto", "builtin", "hub", "imagefolder", "npz", "text"] = "auto"
    split: str = "train"
    image_key: str | None = None
    label_key: str | None = None
    text_key: str = "text"
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    split_seed: Seed = 0
    """Seeds the document order and the held-out `val` rows (text) or `test` images (`test_fraction`).
    Deliberately not train.seed: changing the training seed must never move held-out data into training."""
    # --- local image data only (a .npz file or shard folder, an image folder) ---
    test_source: str | None = None
    """The `test` split of a local image source: another .npz file, shard folder or image folder."""
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Hold out this share of a local image source, chosen by data.split_seed, as `test`; `train` is the rest."""
    # --- text data only (Llama family; image families ignore these) ---
    text_unit: Literal["line", "paragraph", "document"] = "line"
    """What one document of a local text file is (EOS goes between documents when packing)."""
    hub_config: str | None = None
    """Configuration name of a hub text data set (e.g. wikitext-103-raw-v1)."""


DATA_OPTIONS = {
    "image": ("image_key", "label_key", "test_source", "test_fraction"),
    "text": ("text_key", "val_fraction", "text_unit", "hub_config"),
}
"""The data options only one modality reads (the rest of DataConfig is shared)."""
DATA_KINDS = {"image": ("builtin", "imagefolder", "npz"), "text": ("text",)}
"""The data.kind values only one modality has (auto and hub are shared)."""


def foreign_data_option(data: DataConfig, modality: str) -> str | None:
    """The first data option set away from its default that a `modality` family would ignore, as `key=value`."""
    for other, keys in DATA_OPTIONS.items():
        if other == modality or not modality:
            continue
        for key in keys:
            value = getattr(data, key)
            if value != DataConfig.model_fields[key].default:
                return f"data.{key}={value}"
        if data.kind in DATA_KINDS[other]:
            return f"data.kind={data.kind}"
    return None


class NoiseConfig(Section):
    """DESIGN 2: the noise process (EDM's VE sigma by default), its settings, the partition and its overlap."""

    process: str = "edm"
    """The noise process (`noise_process.PROCESSES`): `edm` (continuous sigma) or a plug-in such as `masking`.
    The sigma_* and p_* keys are EDM's settings."""
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    partition: str = "equiprobable"
    """One of the process's `NoiseProcess.partitions` (EDM and masking: equiprobable, uniform)."""
    gamma: float = Field(0.1, ge=0.0, le=1.0)
    schedule: Literal["linear", "cosine"] = "linear"
    """masking only: alpha(t), the probability a token is still unmasked at time t (`masking.py`)."""
    t_min: float = Field(1e-3, gt=0.0, lt=1.0)
    """masking only: the lowest masking time trained and bounded (the ELBO weight 1/t stays finite)."""

    @field_validator("partition")
    @classmethod
    def _a_partition_of_the_process(cls, value: str, info: ValidationInfo) -> str:
        process = info.data.get("process")
        if process in process_names() and value not in process_class(process).partitions:
            raise ValueError(
                f"{value} is not a partition of the {process} noise process; choose one of "
                f"{', '.join(process_class(process).partitions)}"
            )
        return value

    @model_validator(mode="after")
    def _ordered(self) -> "NoiseConfig":
        if self.process not in process_names():
            raise ValueError(
                f"noise.process: unknown noise process {self.process!r}; choose one of {', '.join(process_names())}"
            )
        if self.sigma_min >= self.sigma_max:
            raise ValueError("noise.sigma_min must be smaller than noise.sigma_max")
        return self

    def settings(self) -> NoiseProcess:
        """The one place a recipe's noise section becomes the noise process the formulas take."""
        return process_class(self.process).from_config(self)


class BlocksConfig(Section):
    """How the source network's layers are cut: `num` blocks, evenly unless `uneven` allows otherwise."""

    num: int = Field(4, ge=1)
    uneven: bool = False


class TrainConfig(Section):
    optimizer: Literal["adamw", "adam", "sgd", "adamw8bit"] = "adamw"
    """adamw8bit: torchao's AdamW8bit (8-bit moments, the `memory` extra); see docs/memory.md, "Memory options"."""
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the linear warm-up: constant, or cosine decay to 0 at the last step (the paper's ViT recipe)."""
    grad_clip: float | None = Field(None, gt=0)
    batch_size: int = Field(256, ge=1)
    steps: Annotated[int | None, in_range(1, MAX_TRAIN_STEPS)] = None
    epochs: Annotated[float | None, in_range(0, MAX_EPOCHS, low_open=True, unit=EPOCHS_UNIT)] = None
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_warmup: bool = True
    """Use min(ema_decay, (1 + step) / (10 + step)), so short runs' EMA is not dominated by the init."""
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)
    seed: Seed = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16", "bf16-true"] = "fp32"
    """fp32; bf16 / fp16: autocast over float32 master weights; bf16-true: weights, gradients and optimizer state in
    bf16 (stochastic rounding; the EMA stays float32)."""
    ema: Literal["device", "cpu", "off"] = "device"
    """The EMA copy: on the training device, on the CPU (off the accelerator), or none (`sample` uses the weights)."""
    optimizer_in_backward: bool = False
    """Step each parameter in its gradient hook: a block's gradients never coexist (no clipping, no accumulation)."""
    grad_accumulation: int = Field(1, ge=1)
    """Micro-batches per optimizer step; train.batch_size is the effective batch (it must divide by this)."""
    compile: bool = False
    activation_checkpointing: bool = False
    """Recompute every layer of the trained network in backward (non-reentrant torch.utils.checkpoint): the
    activations of one layer at a time instead of all of them, for about one more forward pass of compute."""
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    tensorboard: bool = False
    loss_weight: Literal["default", "lambda", "uniform", "network-share"] = "default"
    """Per-sigma loss weight. default: the family's choice (DiT: EDM's lambda; text: see
    docs/results/quality-llama.md, "Loss weight")."""
    val_every: int = Field(0, ge=0)
    """Every this many steps, log held-out metrics (val_ce, per-bucket CE, ...) on a fixed batch; 0 = never."""
    """Also log the metrics to RUN/tensorboard/<block> for `tensorboard --logdir RUN/tensorboard` (the tensorboard
    extra)."""

    @field_validator("ema", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        """YAML 1.1 reads a bare `off` as false (and `on` as true)."""
        return {False: "off", True: "device"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.steps is None and self.epochs is None:
            raise ValueError("set train.steps or train.epochs")
        if self.optimizer_in_backward and self.grad_clip:
            raise ValueError(
                "train.optimizer_in_backward=true steps each parameter before the whole gradient exists, "
                "so it cannot clip by its norm: set train.grad_clip=null or drop the option"
            )
        if self.optimizer_in_backward and self.grad_accumulation > 1:
            raise ValueError(
                "train.optimizer_in_backward=true steps in every backward pass, so it cannot accumulate "
                "gradients: set train.grad_accumulation=1 or drop the option"
            )
        if self.optimizer_in_backward and self.precision == "fp16":
            raise ValueError(
                "train.optimizer_in_backward=true cannot use fp16's loss scaler (it checks all "
                "gradients before any step): use train.precision=bf16 or bf16-true"
            )
        if self.batch_size % self.grad_accumulation:
            raise ValueError(
                f"train.batch_size={self.batch_size} does not divide into "
                f"train.grad_accumulation={self.grad_accumulation} micro-batches: make it a multiple"
            )
        return self


class SampleConfig(Section):
    steps: Annotated[int, in_range(1, MAX_SAMPLE_STEPS)] = 50
    solver: str = next(iter(SOLVERS))
    """The sampling solver (`solvers.py`'s registry: euler, heun, or one registered at run time)."""
    guidance: float = Field(1.0, ge=0.0)
    rho: float = Field(7.0, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    """Autoregressive decoding (text `ar` / `source`): softmax temperature; 0 = greedy (never the default)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Autoregressive decoding: nucleus sampling keeps the smallest token set reaching this probability."""
    protocol: Literal["default", "few-step"] = "default"
    """Text decoding protocol (families/llama/protocol.py): default = sample.steps EDM steps per token; few-step =
    the later paper's (steps = B, one per block, greedy final token, AR baseline top-p 0.95)."""
    num: int = Field(64, ge=1)
    seed: Seed = 0
    weights: Literal["ema", "model"] = "ema"

    @field_validator("solver")
    @classmethod
    def _registered_solver(cls, value: str) -> str:
        if value not in solver_names():
            raise ValueError(f"must be {solver_choices()}")
        return value


class OutputConfig(Section):
    dir: str = "runs/{name}-B{blocks}"


def one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    loc = ".".join(p for p in loc.split(".") if not p.endswith("Config"))
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}' (remove it or fix its spelling; see `dbconvert recipes --show NAME`)"
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    where = f"key '{loc}': " if loc and not msg.startswith(f"{loc}.") else ""  # a message naming its key already
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}{msg}{got}{more}"
