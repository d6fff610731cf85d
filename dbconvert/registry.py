"""One registry mechanism for every plug-in kind: model families, noise processes, metrics, solvers.

A registry maps a name to one or more "module:attribute" paths, imported on first use (so listing names
imports nothing). Its built-in table is written once, in the module that owns the kind; `register` /
`unregister` add and remove entries at run time. Run-time entries are kept in an environment variable
(JSON `{name: "module:attr"}`, or `{name: ["module:A", "module:B"]}` for a kind with several parts), so the
processes dbconvert starts (train-all's block processes, bench memory workers, torchrun ranks) know them
too; a user can also set that variable to plug something in without editing a table. Its entries win over
the built-in ones. An unknown name is one line naming the known ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from importlib import import_module
from typing import Any

from dbconvert.errors import DbconvertError, first_line

Entry = tuple[str, ...]


def check_path(path: object) -> str:
    """`path` if it has the form "module:attribute" (a ValueError otherwise)."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ValueError(f"{path!r} is not of the form 'module:attribute'")
    return path


def load_path(path: str) -> Any:
    """The attribute a "module:attribute" path names (ImportError / AttributeError when it cannot be loaded)."""
    module, _, attr = path.partition(":")
    return getattr(import_module(module), attr)


class Registry:
    """Names -> "module:attr" entries of one kind (`what`: "family", "noise process", ...).

    `builtin` is the table written in the code (a value is one path, or a tuple of `parts` paths); `env`
    the environment variable holding the run-time registrations; `error` the exception class of the
    one-line errors (`where` is put in front of the unknown-name message, e.g. "key 'model.family': ");
    `extra` (optional) gives more built-in entries computed on demand, after the table (families' metrics);
    `noun` is what an entry names, for errors (`class`, `function`); the last `optional` of the `parts` may be
    left out (the torch-free parts a plug-in may not have: a family's sample options and metric table, a metric's
    help).
    """

    def __init__(
        self,
        what: str,
        builtin: Mapping[str, str | Entry],
        env: str,
        *,
        parts: int = 1,
        error: Callable[[str], Exception] = DbconvertError,
        where: str = "",
        extra: Callable[[], Mapping[str, str | Entry]] | None = None,
        noun: str = "class",
        optional: int = 0,
    ) -> None:
        self.what = what
        self.noun = noun
        self.builtin = builtin
        self.env = env
        self.parts = parts
        self.optional = optional
        self.error = error
        self.where = where
        self.extra = extra
        self.instances: dict[str, Any] = {}

    # -- the table ---------------------------------------------------------------------------

    def entry(self, name: str, value: object) -> Entry:
        """One entry as a tuple of `parts` checked paths (ValueError otherwise)."""
        paths = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
        if not self.parts - self.optional <= len(paths) <= self.parts:
            count = f"{self.parts - self.optional} to {self.parts}" if self.optional else str(self.parts)
            raise ValueError(f"{self.what} {name!r}: expected {count} 'module:attribute' path(s), got {value!r}")
        try:
            return tuple(check_path(p) for p in paths)
        except ValueError as exc:
            raise ValueError(f"{self.what} {name!r}: {exc}") from None

    def runtime(self) -> dict[str, Entry]:
        """The run-time registrations of this process (the environment variable)."""
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return {}
        one, full = '"module:attr"', "[" + ", ".join(['"module:attr"'] * self.parts) + "]"
        shape = one if self.parts == 1 else f"{one} or {full}" if self.parts - self.optional == 1 else full
        try:
            table = json.loads(raw)
            if not isinstance(table, dict):
                raise ValueError
            return {str(name): self.entry(str(name), value) for name, value in table.items()}
        except (ValueError, TypeError):
            raise self.error(f"${self.env} must be a JSON object of name -> {shape}, not {raw[:80]!r}") from None

    def table(self, with_extra: bool = True) -> dict[str, Entry]:
        """Every entry this process knows: the built-in table (and `extra`), then the run-time registrations."""
        out = {name: self.entry(name, value) for name, value in self.builtin.items()}
        if with_extra and self.extra is not None:
            out.update({name: self.entry(name, value) for name, value in self.extra().items() if name not in out})
        return {**out, **self.runtime()}

    def names(self) -> list[str]:
        return sorted(self.table())

    def __contains__(self, name: object) -> bool:
        table = self.table(with_extra=False)
        return name in table or (self.extra is not None and name in self.table())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def register(self, name: str, *paths: str) -> None:
        """Register `name` by its "module:attr" path(s); the processes dbconvert starts inherit it."""
        table = {**self.runtime(), name: self.entry(name, paths)}
        self.write(table)
        self.instances.pop(name, None)

    def unregister(self, name: str) -> None:
        """Undo `register(name, ...)` (a built-in entry of the same name becomes visible again)."""
        table = self.runtime()
        table.pop(name, None)
        self.write(table)
        self.instances.pop(name, None)

    def write(self, table: dict[str, Entry]) -> None:
        if not table:
            os.environ.pop(self.env, None)
            return
        os.environ[self.env] = json.dumps({k: v[0] if len(v) == 1 else list(v) for k, v in table.items()})

    # -- looking up --------------------------------------------------------------------------

    def unknown(self, name: str) -> Exception:
        """The one-line error of a name nobody registered."""
        return self.error(f"{self.where}unknown {self.what} {name!r}; choose one of {', '.join(self.names())}")

    def paths(self, name: str) -> Entry:
        table = self.table(with_extra=False)
        if name not in table:
            table = self.table()
        if name not in table:
            raise self.unknown(name)
        return table[name]

    def load(self, name: str, part: int = 0) -> Any:
        """The attribute entry `name`'s path number `part` names, imported now (a one-line error if it cannot be)."""
        path = self.paths(name)[part]
        try:
            return load_path(path)
        except (ImportError, AttributeError) as exc:  # a plug-in not importable here: say which
            raise self.error(
                f"{self.what} {self.noun} {path} cannot be loaded ({type(exc).__name__}: "
                f"{first_line(exc)}); is its package on PYTHONPATH?"
            ) from None

    def get(self, name: str) -> Any:
        """One shared instance of the class entry `name` names (built on first use)."""
        if name not in self.instances:
            self.instances[name] = self.load(name)()
        return self.instances[name]


__all__ = ["Registry", "check_path", "load_path"]
