"""The model-family registry: one package per family knows how to convert, build, wrap, train and generate.

Adding a family = one package (`families/<name>/`, or any importable package) with a `Family`
subclass (the contract in `contract.py`) and its recipe section (a `schema.ModelConfig`
subclass), plus one line: an entry in `FAMILIES`, or `register(...)` at run time, as the tests'
toy family does (`tests/families/toy_family.py`). Only the config module is imported to
validate a recipe; the family module is imported when the family is first used.
"""

from __future__ import annotations

from dbconvert.errors import RecipeError
from dbconvert.families.contract import Family, Source
from dbconvert.registry import Registry
from dbconvert.schema import ModelConfig

FAMILIES: dict[str, tuple[str, str]] = {
    "dit": ("dbconvert.families.dit.family:DiTFamily", "dbconvert.families.dit.config:DiTConfig"),
    "llama": ("dbconvert.families.llama.family:LlamaFamily", "dbconvert.families.llama.config:LlamaConfig"),
    "recurrent": (
        "dbconvert.families.recurrent.family:RecurrentFamily",
        "dbconvert.families.recurrent.config:RecurrentConfig",
    ),
    "vit": ("dbconvert.families.vit.family:ViTFamily", "dbconvert.families.vit.config:ViTConfig"),
}
"""name -> (family class, recipe model-section class), as "module:attribute"."""

PLUGINS_ENV = "DBCONVERT_FAMILIES"
"""Families registered at run time, as JSON {name: ["module:Family", "module:Config"]}.

`register` writes it, so the processes dbconvert starts (the `bench memory` workers, `train-all`'s
block processes, torchrun ranks) know the same families; a user can also set it to plug a
family in without editing `FAMILIES`. Its entries win over `FAMILIES`."""

REGISTRY = Registry("family", FAMILIES, PLUGINS_ENV, parts=2, error=RecipeError, where="key 'model.family': ")
"""The families (`registry.Registry`): entry = (family class, config class)."""


def registered() -> dict[str, tuple[str, ...]]:
    """Every family this process knows: `FAMILIES` plus the run-time registrations of $DBCONVERT_FAMILIES."""
    return REGISTRY.table()


def register(name: str, family: str, config: str) -> None:
    """Register a family by "module:Class" paths (plug-in and test families); child processes inherit it."""
    REGISTRY.register(name, family, config)


def unregister(name: str) -> None:
    """Undo `register(name, ...)` (a built-in family of the same name becomes visible again)."""
    REGISTRY.unregister(name)


def family_names() -> list[str]:
    return REGISTRY.names()


def config_class(name: str) -> type[ModelConfig]:
    """The recipe `model` section schema of family `name` (imports only its config module)."""
    return REGISTRY.load(name, 1)


def get_family(name: str) -> Family:
    """The registered family called `name` (a RecipeError naming the choices otherwise)."""
    return REGISTRY.get(name)


__all__ = [
    "FAMILIES",
    "PLUGINS_ENV",
    "REGISTRY",
    "Family",
    "Source",
    "config_class",
    "family_names",
    "get_family",
    "register",
    "registered",
    "unregister",
]
