"""The model-family registry: one package per family knows how to convert, build, wrap, train and generate.

Adding a family = one package `families/<name>/` whose `__init__` defines a `Family` subclass
(see `contract.py`) and whose `config` module defines its recipe section, plus one line in
`FAMILIES` (or `register` at run time, as the tests' toy family does).
"""

from __future__ import annotations

from importlib import import_module

from dbconvert.errors import RecipeError
from dbconvert.families.contract import Family, Source
from dbconvert.schema import ModelConfig

FAMILIES: dict[str, tuple[str, str]] = {
    "dit": ("dbconvert.families.dit.family:DiTFamily", "dbconvert.families.dit.config:DiTConfig"),
    "llama": ("dbconvert.families.llama.family:LlamaFamily", "dbconvert.families.llama.config:LlamaConfig"),
}
"""name -> (family class, recipe model-section class), as "module:attribute"."""

_instances: dict[str, Family] = {}


def register(name: str, family: str, config: str) -> None:
    """Register a family by "module:Class" paths (used for plug-in and test families)."""
    FAMILIES[name] = (family, config)
    _instances.pop(name, None)


def family_names() -> list[str]:
    return sorted(FAMILIES)


def _load(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(import_module(module), attr)


def _entry(name: str) -> tuple[str, str]:
    if name not in FAMILIES:
        raise RecipeError(f"key 'model.family': unknown family {name!r}; choose one of {', '.join(family_names())}")
    return FAMILIES[name]


def config_class(name: str) -> type[ModelConfig]:
    """The recipe `model` section schema of family `name` (imports only its config module)."""
    return _load(_entry(name)[1])


def get_family(name: str) -> Family:
    """The registered family called `name` (a RecipeError naming the choices otherwise)."""
    path = _entry(name)[0]
    if name not in _instances:
        _instances[name] = _load(path)()
    return _instances[name]


__all__ = ["Family", "Source", "config_class", "family_names", "get_family", "register"]
