"""The model-family registry: one package per family knows how to convert, build, wrap, train and generate.

Adding a family = one package (`families/<name>/`, or any importable package) with a `Family`
subclass (the contract in `contract.py`) and its recipe section (a `schema.ModelConfig`
subclass), plus one line: an entry in `FAMILIES`, or `register(...)` at run time, as the tests'
toy family does (`tests/families/toy_family.py`). Only the config module is imported to
validate a recipe; the family module is imported when the family is first used. An entry's optional third
path names the family's `sample_options_type` in a torch-free module, so `sample --help` lists its flags without
importing the family; its optional fourth, the family's `own_metrics` table in a torch-free module, so `eval --help`
lists the metrics without importing the families.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dbconvert.errors import RecipeError
from dbconvert.registry import Registry, load_path

if TYPE_CHECKING:
    from dbconvert.families.contract import Family, Source
    from dbconvert.schema import ModelConfig

FAMILIES: dict[str, tuple[str, ...]] = {
    "dit": (
        "dbconvert.families.dit.family:DiTFamily",
        "dbconvert.families.dit.config:DiTConfig",
        "dbconvert.families.dit.sample_options:ImageSampleOptions",
        "dbconvert.families.metric_tables:NO_METRICS",
    ),
    "llama": (
        "dbconvert.families.llama.family:LlamaFamily",
        "dbconvert.families.llama.config:LlamaConfig",
        "dbconvert.families.llama.sample_options:TextSampleOptions",
        "dbconvert.families.llama.metric_help:METRICS",
    ),
    "recurrent": (
        "dbconvert.families.recurrent.family:RecurrentFamily",
        "dbconvert.families.recurrent.config:RecurrentConfig",
        "dbconvert.families.llama.sample_options:TextSampleOptions",
        "dbconvert.families.metric_tables:NO_METRICS",
    ),
    "vit": (
        "dbconvert.families.vit.family:ViTFamily",
        "dbconvert.families.vit.config:ViTConfig",
        "dbconvert.families.vit.sample_options:ClassifySampleOptions",
        "dbconvert.families.vit.metric_help:METRICS",
    ),
}
"""name -> (family class, recipe model-section class[, sample options class[, own metrics table]]), as
"module:attribute"."""

PLUGINS_ENV = "DBCONVERT_FAMILIES"
"""Families registered at run time, as JSON {name: ["module:Family", "module:Config"(, "module:SampleOptions"(,
"module:METRICS"))]}.

`register` writes it, so the processes dbconvert starts (the `bench memory` workers, `train-all`'s
block processes, torchrun ranks) know the same families; a user can also set it to plug a
family in without editing `FAMILIES`. Its entries win over `FAMILIES`."""

REGISTRY = Registry(
    "family", FAMILIES, PLUGINS_ENV, parts=4, optional=2, error=RecipeError, where="key 'model.family': "
)
"""The families (`registry.Registry`): entry = (family class, config class[, sample options class[, metrics]])."""


def registered() -> dict[str, tuple[str, ...]]:
    """Every family this process knows: `FAMILIES` plus the run-time registrations of $DBCONVERT_FAMILIES."""
    return REGISTRY.table()


def register(
    name: str, family: str, config: str, sample_options: str | None = None, metrics: str | None = None
) -> None:
    """Register a family by "module:Class" paths (plug-in and test families); child processes inherit it.
    `sample_options`, a torch-free module's `sample_options_type`, lets `sample --help` skip importing the family;
    `metrics`, a torch-free module's `own_metrics` table, lets `eval --help` skip it (it needs `sample_options`)."""
    if metrics and not sample_options:
        raise ValueError(f"family {name!r}: a metrics path comes after a sample options path; give both")
    REGISTRY.register(name, family, config, *[p for p in (sample_options, metrics) if p])


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


def sample_options_type(name: str) -> type:
    """Family `name`'s `sample_options_type`, from its entry's torch-free path when it has one (else the family,
    imported); the contract test checks the two agree."""
    paths = REGISTRY.paths(name)
    return load_path(paths[2]) if len(paths) > 2 else get_family(name).sample_options_type


def own_metrics(name: str) -> Mapping[str, str | tuple[str, ...]]:
    """Family `name`'s `own_metrics`, from its entry's torch-free path when it has one (else the family, imported);
    the contract test checks the two agree."""
    paths = REGISTRY.paths(name)
    return load_path(paths[3]) if len(paths) > 3 else get_family(name).own_metrics


def __getattr__(name: str) -> Any:
    """`Family` and `Source` from the contract, imported on first use: the contract imports torch, which the
    registry's own readers (recipe validation, --help) do not need."""
    if name in ("Family", "Source"):
        from dbconvert.families import contract

        return getattr(contract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "PLUGINS_ENV",
    "REGISTRY",
    "Family",
    "Source",
    "config_class",
    "family_names",
    "get_family",
    "own_metrics",
    "register",
    "registered",
    "sample_options_type",
    "unregister",
]
