"""The model-family registry: one package per family knows how to convert, build, wrap, train and generate.

Adding a family = one package (`families/<name>/`, or any importable package) with a `Family`
subclass (the contract in `contract.py`) and its recipe section (a `schema.ModelConfig`
subclass), plus one line: an entry in `FAMILIES`, or `register(...)` at run time, as the tests'
toy family does (`tests/families/toy_family.py`). Only the config module is imported to
validate a recipe; the family module is imported when the family is first used.
"""

from __future__ import annotations

import json
import os
from importlib import import_module

from dbconvert.errors import RecipeError, first_line
from dbconvert.families.contract import Family, Source
from dbconvert.schema import ModelConfig

FAMILIES: dict[str, tuple[str, str]] = {
    "dit": ("dbconvert.families.dit.family:DiTFamily", "dbconvert.families.dit.config:DiTConfig"),
    "llama": ("dbconvert.families.llama.family:LlamaFamily", "dbconvert.families.llama.config:LlamaConfig"),
    "vit": ("dbconvert.families.vit.family:ViTFamily", "dbconvert.families.vit.config:ViTConfig"),
}
"""name -> (family class, recipe model-section class), as "module:attribute"."""

PLUGINS_ENV = "DBCONVERT_FAMILIES"
"""Families registered at run time, as JSON {name: ["module:Family", "module:Config"]}.

`register` writes it, so the processes dbconvert starts (the `bench memory` workers, `train-all`'s
block processes, torchrun ranks) know the same families; a user can also set it to plug a
family in without editing `FAMILIES`. Its entries win over `FAMILIES`."""

_instances: dict[str, Family] = {}


def _plugins() -> dict[str, tuple[str, str]]:
    raw = os.environ.get(PLUGINS_ENV, "").strip()
    if not raw:
        return {}
    try:
        table = json.loads(raw)
        if not isinstance(table, dict):
            raise ValueError
        return {str(name): _checked(str(name), *paths) for name, paths in table.items()}
    except (ValueError, TypeError):
        raise RecipeError(f"${PLUGINS_ENV} must be a JSON object of name -> [\"module:FamilyClass\", "
                          f"\"module:ConfigClass\"], not {raw[:80]!r}") from None


def _checked(name: str, family: str, config: str) -> tuple[str, str]:
    for path in (family, config):
        if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
            raise ValueError(f"family {name!r}: {path!r} is not of the form 'module:attribute'")
    return family, config


def registered() -> dict[str, tuple[str, str]]:
    """Every family this process knows: `FAMILIES` plus the run-time registrations of $DBCONVERT_FAMILIES."""
    return {**FAMILIES, **_plugins()}


def register(name: str, family: str, config: str) -> None:
    """Register a family by "module:Class" paths (plug-in and test families); child processes inherit it."""
    table = {**_plugins(), name: _checked(name, family, config)}
    os.environ[PLUGINS_ENV] = json.dumps({k: list(v) for k, v in table.items()})
    _instances.pop(name, None)


def unregister(name: str) -> None:
    """Undo `register(name, ...)` (a built-in family of the same name becomes visible again)."""
    table = _plugins()
    table.pop(name, None)
    if table:
        os.environ[PLUGINS_ENV] = json.dumps({k: list(v) for k, v in table.items()})
    else:
        os.environ.pop(PLUGINS_ENV, None)
    _instances.pop(name, None)


def family_names() -> list[str]:
    return sorted(registered())


def _load(path: str) -> type:
    module, _, attr = path.partition(":")
    try:
        return getattr(import_module(module), attr)
    except (ImportError, AttributeError) as exc:  # a plug-in family not importable here: say which
        raise RecipeError(f"family class {path} cannot be loaded ({type(exc).__name__}: {first_line(exc)}); "
                          "is its package on PYTHONPATH?") from None


def _entry(name: str) -> tuple[str, str]:
    table = registered()
    if name not in table:
        raise RecipeError(f"key 'model.family': unknown family {name!r}; choose one of {', '.join(sorted(table))}")
    return table[name]


def config_class(name: str) -> type[ModelConfig]:
    """The recipe `model` section schema of family `name` (imports only its config module)."""
    return _load(_entry(name)[1])


def get_family(name: str) -> Family:
    """The registered family called `name` (a RecipeError naming the choices otherwise)."""
    path = _entry(name)[0]
    if name not in _instances:
        _instances[name] = _load(path)()
    return _instances[name]


__all__ = ["FAMILIES", "PLUGINS_ENV", "Family", "Source", "config_class", "family_names", "get_family", "register",
           "registered", "unregister"]
