"""What `dbconvert sample` offers of a family's own options, kept free of torch so that `sample --help` reads them
without importing a family (issue 33: --help took 6-8 s importing torch, timm and every family).

A family's `sample_options_type` is a dataclass whose fields with `sample_flag` metadata become flags; the class
lives in a torch-free module of its package, named by the family's registry entry (`families.FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, get_args, get_type_hints


@dataclass
class NoSampleOptions:
    """The sampling options of a family that has none beyond the shared ones."""


def sample_flag(help: str, *, flag: str | None = None, min: float | None = None) -> dict[str, Any]:
    """The `metadata` of a `sample_options_type` field that `dbconvert sample` offers as a flag:
    `field(default=None, metadata=sample_flag("Generate this class only.", flag="--class"))`.

    `flag` defaults to `--name-with-dashes`; `min` is the smallest value the flag takes. A field without it
    (e.g. token-id prompts for evaluation) is a library option only."""
    return {"help": help, "flag": flag, "min": min}


@dataclass(frozen=True)
class SampleFlag:
    """One command-line flag of `dbconvert sample`, from a field of a family's `sample_options_type`."""

    name: str
    type: type
    help: str
    flag: str
    min: float | None = None
    default: Any = None
    """Always None on the command line: an option not given is the family's default."""


def sample_flags(options_type: type) -> list[SampleFlag]:
    """The flags of a `sample_options_type` dataclass: its fields with `sample_flag` metadata, in order."""
    hints = get_type_hints(options_type)
    out = []
    for f in fields(options_type):
        if "help" not in f.metadata:
            continue
        kinds = [a for a in get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        out.append(
            SampleFlag(
                f.name,
                kinds[0],
                f.metadata["help"],
                f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                f.metadata.get("min"),
            )
        )
    return out


__all__ = ["NoSampleOptions", "SampleFlag", "sample_flag", "sample_flags"]
