"""Recipes: YAML files validated against a typed schema, with `key.sub=value` overrides.

A recipe is the whole description of a run: model, data, noise settings, training,
sampling and output folder. Unknown keys, wrong types and out-of-range values are
rejected with a one-line error that names the key.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from dbconvert.errors import RecipeError


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    """Fields common to every family; each family subclasses this with its own fields."""

    family: str
    checkpoint: str | None = None


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
    # --- text data only (Llama family; image families ignore these) ---
    text_unit: Literal["line", "paragraph", "document"] = "line"
    """What one document of a local text file is (EOS goes between documents when packing)."""
    hub_config: str | None = None
    """Configuration name of a hub text data set (e.g. wikitext-103-raw-v1)."""


class NoiseConfig(Section):
    """DESIGN 2: VE noise levels, the training log-normal, the partition and its overlap."""

    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    partition: Literal["equiprobable", "uniform"] = "equiprobable"
    gamma: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> "NoiseConfig":
        if self.sigma_min >= self.sigma_max:
            raise ValueError("noise.sigma_min must be smaller than noise.sigma_max")
        return self


class BlocksConfig(Section):
    """How the source network's layers are cut: `num` blocks, evenly unless `uneven` allows otherwise."""

    num: int = Field(4, ge=1)
    uneven: bool = False


class TrainConfig(Section):
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    batch_size: int = Field(256, ge=1)
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_warmup: bool = True
    """Use min(ema_decay, (1 + step) / (10 + step)), so short runs' EMA is not dominated by the init."""
    label_dropout: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    tensorboard: bool = False
    """Also log the metrics to RUN/tensorboard/<block> for `tensorboard --logdir RUN/tensorboard` (the tensorboard extra)."""

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.steps is None and self.epochs is None:
            raise ValueError("set train.steps or train.epochs")
        return self


class SampleConfig(Section):
    steps: int = Field(50, ge=1)
    solver: Literal["euler", "heun"] = "euler"
    guidance: float = Field(1.0, ge=0.0)
    rho: float = Field(7.0, gt=0)
    num: int = Field(64, ge=1)
    seed: int = 0
    weights: Literal["ema", "model"] = "ema"


class OutputConfig(Section):
    dir: str = "runs/{name}-B{blocks}"


class Recipe(Section):
    """A complete, validated recipe."""

    name: str
    description: str = ""
    model: SerializeAsAny[ModelConfig]
    data: DataConfig = Field(default_factory=DataConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    blocks: BlocksConfig = Field(default_factory=BlocksConfig)
    train: TrainConfig
    sample: SampleConfig = Field(default_factory=SampleConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _family_model(cls, raw: Any) -> Any:
        """Validate `model` against the schema of the family it names (via the registry)."""
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            from dbconvert.families import get_family

            family = get_family(raw["model"].get("family", ""))
            raw = {**raw, "model": family.config_cls.model_validate(raw["model"])}
        return raw

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def output_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name, blocks=self.blocks.num))


# --- loading ------------------------------------------------------------------------------


def shipped_recipes() -> dict[str, str]:
    """Name -> first comment line of every recipe that ships inside the package."""
    out: dict[str, str] = {}
    for entry in sorted(resources.files("dbconvert.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            text = entry.read_text()
            out[entry.name[: -len(".yaml")]] = _description(text)
    return out


def _description(text: str) -> str:
    data = yaml.safe_load(text) or {}
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def read_recipe_text(name_or_path: str) -> tuple[str, str]:
    """(yaml text, where it came from) for a shipped recipe name or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(
                f"recipe file {name_or_path!r} not found; give a YAML path or a shipped name "
                f"({', '.join(shipped_recipes())})"
            )
        return path.read_text(), str(path)
    resource = resources.files("dbconvert.recipes") / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise RecipeError(
            f"no recipe named {name_or_path!r}; shipped recipes: {', '.join(shipped_recipes())} "
            "(or give a path to a .yaml file)"
        )
    return resource.read_text(), f"shipped:{name_or_path}"


def parse_overrides(items: list[str] | None) -> list[tuple[list[str], Any]]:
    """`key.sub=value` strings -> (path, YAML-typed value)."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} is not of the form key.sub=value (e.g. train.lr=3e-4)")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        out.append((key.split("."), parsed))
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Set each `key.sub=value` in a copy of the raw recipe mapping (validation happens after)."""
    raw = copy.deepcopy(raw)
    for path, value in parse_overrides(overrides):
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def validate_recipe(raw: Any, origin: str = "recipe") -> Recipe:
    """Validate a raw mapping; any failure becomes one RecipeError line naming the key."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: the recipe must be a YAML mapping of sections (model, data, train, ...)")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{origin}: {_one_line(exc)}") from None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    loc = loc.replace(".DiTConfig", "").replace(".LlamaConfig", "")
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}' (remove it or fix its spelling; see `dbconvert recipes --show NAME`)"
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    where = f"key '{loc}': " if loc else ""
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}{msg}{got}{more}"


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe by shipped name or YAML path."""
    text, origin = read_recipe_text(name_or_path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{origin}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: the recipe must be a YAML mapping of sections (model, data, train, ...)")
    return validate_recipe(apply_overrides(raw, overrides), origin)


def override_recipe(recipe: Recipe, overrides: list[str] | None, allowed: tuple[str, ...]) -> Recipe:
    """Apply overrides to an already-resolved recipe, only within the `allowed` sections.

    After `split`, the model, noise and blocks sections are fixed by the run; changing them
    would silently disagree with the blocks on disk, so it is an error.
    """
    for path, _ in parse_overrides(overrides):
        if path[0] not in allowed:
            raise RecipeError(
                f"override {'.'.join(path)}: the '{path[0]}' section is fixed when the run is split; "
                f"only {', '.join(allowed)} can change now (run `dbconvert split` again to change it)"
            )
    return validate_recipe(apply_overrides(recipe.to_dict(), overrides), "override")
