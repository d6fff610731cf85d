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
from pydantic import Field, SerializeAsAny, ValidationError, model_validator

from dbconvert.errors import RecipeError
from dbconvert.schema import (BlocksConfig, DataConfig, ModelConfig, NoiseConfig, OutputConfig, SampleConfig, Section,
                              TrainConfig, one_line)


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
            from dbconvert.families import config_class

            try:
                model = config_class(raw["model"].get("family", "")).model_validate(raw["model"])
            except ValidationError as exc:  # re-raised with the section in the key, so errors say 'model.arch'
                errors = [{"type": e["type"], "loc": ("model", *e["loc"]) if e["loc"] else (), "input": e["input"],
                           **({"ctx": e["ctx"]} if "ctx" in e else {})} for e in exc.errors()]
                raise ValidationError.from_exception_data(exc.title, errors) from None  # type: ignore[arg-type]
            raw = {**raw, "model": model}
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
