"""The model-family registry: one entry per family knows how to build, load, split and wrap.

Adding a family = one module defining a `Family` subclass and one line in `_FAMILIES`.
"""

from __future__ import annotations

from importlib import import_module

from dbconvert.errors import RecipeError
from dbconvert.families.base import Family

_FAMILIES: dict[str, str] = {
    "dit": "dbconvert.families.dit:DiTFamily",
    "llama": "dbconvert.families.llama:LlamaFamily",
}
_CACHE: dict[str, Family] = {}


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family called `name` (a RecipeError naming the choices otherwise)."""
    if name not in _FAMILIES:
        raise RecipeError(f"key 'model.family': unknown family {name!r}; choose one of {', '.join(family_names())}")
    if name not in _CACHE:
        module, _, attr = _FAMILIES[name].partition(":")
        _CACHE[name] = getattr(import_module(module), attr)()
    return _CACHE[name]


__all__ = ["Family", "family_names", "get_family"]
