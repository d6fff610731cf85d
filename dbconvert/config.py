"""Recipes: YAML files validated against a typed schema, with `key.sub=value` overrides.

A recipe is the whole description of a run: model, data, noise settings, training,
sampling and output folder. Unknown keys, wrong types and out-of-range values are
rejected with a one-line error that names the key.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, SerializeAsAny, ValidationError, ValidatorFunctionWrapHandler, field_validator

from dbconvert.errors import RecipeError
from dbconvert.schema import (
    BlocksConfig,
    DataConfig,
    ModelConfig,
    NoiseConfig,
    OutputConfig,
    SampleConfig,
    Section,
    TrainConfig,
    foreign_data_option,
    one_line,
)


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
    _given: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @property
    def given(self) -> frozenset[str]:
        """The keys (`model.layers`, ...) the user set with `key.sub=value` overrides when the recipe was loaded.

        Where a checkpoint's own config replaces the recipe's values, a size the user asked for that the checkpoint
        contradicts is refused instead of silently replaced (`Family.source`). Not part of the recipe's data: the
        manifest does not record it, and a recipe read back from a run has none."""
        return self._given

    def mark_given(self, keys: frozenset[str] | set[str] | list[str]) -> "Recipe":
        """Record `keys` as given explicitly (see `given`); returns the recipe."""
        self._given = frozenset(keys)
        return self

    @field_validator("model", mode="wrap")
    @classmethod
    def _family_model(cls, raw: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Validate `model` against the schema of the family it names (via the registry).

        A field validator, so that errors inside the section are reported as `model.<key>`.
        """
        if isinstance(raw, dict):
            from dbconvert.families import config_class

            return config_class(raw.get("family", "")).model_validate(raw)
        return handler(raw)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def output_dir(self) -> Path:
        """Where `split` writes the run unless told: output.dir, with `-<data stem>` after the name when the
        default folder would otherwise hide that the data differ from the shipped recipe's (see `data_suffix`)."""
        suffix = self.data_suffix()
        name = f"{self.name}-{suffix}" if suffix else self.name
        return Path(self.output.dir.format(name=name, blocks=self.blocks.num))

    def data_suffix(self) -> str | None:
        """A short slug of data.source when it is not the data of the shipped recipe this one is named after.

        `runs/llama-tiny-shakespeare-B4` must not hold a model of other text: with data.source=my/corpus.txt
        the default folder becomes `runs/llama-tiny-shakespeare-corpus-B4`. None for the shipped data, for
        recipes that are not named after a shipped one (their own name is the distinction) and when
        output.dir is not the default (the user chose the folder).
        """
        if self.output.dir != OutputConfig.model_fields["dir"].default:
            return None
        shipped = shipped_data_source(self.name)
        if shipped is None or shipped == self.data.source:
            return None
        return data_slug(self.data.source)


# --- loading ------------------------------------------------------------------------------


def shipped_recipes() -> dict[str, str]:
    """Name -> first comment line of every recipe that ships inside the package."""
    out: dict[str, str] = {}
    for entry in sorted(resources.files("dbconvert.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            text = entry.read_text()
            out[entry.name[: -len(".yaml")]] = _description(text)
    return out


def shipped_data_source(name: str) -> str | None:
    """data.source of the shipped recipe called `name` (None when there is none)."""
    resource = resources.files("dbconvert.recipes") / f"{name}.yaml"
    if not resource.is_file():
        return None
    raw = yaml.safe_load(resource.read_text()) or {}
    data = raw.get("data") if isinstance(raw, dict) else None
    source = data.get("source") if isinstance(data, dict) else None
    return str(source) if source is not None else DataConfig.model_fields["source"].default


def data_slug(source: str) -> str:
    """A short file-name-safe name of a data source: its file or folder stem (`corpus` for data/corpus.txt)."""
    text = str(source).rstrip("/\\")
    path = Path(text)
    stem = path.parent.name if any(ch in path.name for ch in "*?") else path.stem
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem).strip("-")[:24].strip("-")
    return slug or "data"


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
        raise RecipeError(f"{origin}: {one_line(exc)}") from None


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
    recipe = validate_recipe(apply_overrides(raw, overrides), origin)
    check_data_options(recipe, origin)
    return recipe.mark_given({".".join(path) for path, _ in parse_overrides(overrides)})


def check_data_options(recipe: Recipe, origin: str = "recipe") -> None:
    """Refuse data options the model's family would ignore (text options on an image model and the reverse).

    Checked where recipes come in (files, overrides), not when a run's stored recipe is read back."""
    modality = type(recipe.model).data_modality
    foreign = foreign_data_option(recipe.data, modality)
    if foreign is not None:
        raise RecipeError(
            f"{origin}: {foreign} is an option of {'text' if modality == 'image' else 'image'} data, "
            f"which a {recipe.model.family} model ({modality} data) does not read; remove it"
        )


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
