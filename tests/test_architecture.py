"""The package's shape, checked from its source with `ast` (nothing is imported or run).

(a) the import graph of `dbconvert` has no cycle, so any module can be imported first;
(b) no module imports another module's private names, so a module's `_helpers` can change freely;
(c) outside `dbconvert/families/` nothing asks which family a run is or sniffs a family's
    config fields: the generic machinery talks to families only through `Family` (contract.py).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dbconvert

PACKAGE = Path(dbconvert.__file__).resolve().parent
ROOT = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def parse(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), str(MODULES[name]))


def is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: the whole tree, minus the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if is_type_checking(child):
                stack.extend(child.orelse)  # an `else:` branch does run
                yield child.test
            else:
                stack.append(child)


@dataclass(frozen=True)
class Imported:
    module: str
    """The dbconvert module imported (a submodule when `from pkg import submodule`)."""
    names: tuple[str, ...]
    """The names taken from it (`from module import a, b`); empty for `import module`."""
    line: int


def absolute(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_in(importer: str, tree: ast.Module) -> list[Imported]:
    """The dbconvert modules `importer` (whose source is `tree`) imports at run time, at any depth."""
    out = []
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out += [Imported(a.name, (), node.lineno) for a in node.names if a.name.split(".")[0] == "dbconvert"]
        elif isinstance(node, ast.ImportFrom):
            target = absolute(importer, node)
            if target.split(".")[0] != "dbconvert":
                continue
            plain = [a.name for a in node.names if f"{target}.{a.name}" not in MODULES]
            out += [
                Imported(f"{target}.{a.name}", (), node.lineno) for a in node.names if f"{target}.{a.name}" in MODULES
            ]
            if plain:
                out.append(Imported(target, tuple(plain), node.lineno))
    return out


def imports_of(name: str) -> list[Imported]:
    """The dbconvert modules module `name` imports at run time (module level and inside functions)."""
    return imports_in(name, parse(name))


def with_parents(module: str, importer: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c: each is an edge of the graph.

    Except the importer's own packages: they are initialised before the importer runs, so a
    package's `__init__` importing its submodules is no cycle.
    """
    parts = module.split(".")
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    if MODULES[importer].name == "__init__.py":
        own.add(importer)
    chain = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return [m for m in chain if m in MODULES and (m == module or m not in own)]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        edges = {m for imp in imports_of(name) for m in with_parents(imp.module, name)}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        iters = [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


# --- (a) no import cycle --------------------------------------------------------------------


def test_the_parser_sees_the_package() -> None:
    """Guards the checks below against silently scanning nothing."""
    assert {"dbconvert.train", "dbconvert.families", "dbconvert.families.contract", "dbconvert.cli.app"} <= set(MODULES)
    graph = import_graph()
    assert "dbconvert.config" in graph["dbconvert.train"]
    assert "dbconvert.families" in graph["dbconvert.config"]  # the lazy import in a validator counts
    assert "dbconvert.config" not in graph["dbconvert.families.contract"]  # under TYPE_CHECKING only


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# --- (b) no private imports -----------------------------------------------------------------


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(importer: str, tree: ast.Module) -> list[str]:
    """`from dbconvert.x import _y`, and `m._y` where `m` names a dbconvert module."""
    found = [
        f"{importer}:{imp.line} imports {n} from {imp.module}"
        for imp in imports_in(importer, tree)
        for n in imp.names
        if is_private(n)
    ]
    aliases: set[str] = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom) and absolute(importer, node).split(".")[0] == "dbconvert":
            target = absolute(importer, node)
            aliases |= {a.asname or a.name for a in node.names if f"{target}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("dbconvert.")}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and is_private(node.attr)
        ):
            found.append(f"{importer}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_the_private_check_catches_what_it_should() -> None:
    code = ast.parse(
        "from dbconvert.checkpoint import _x, load_weights\nfrom dbconvert import noise as nz\n"
        "nz._y\nimport dbconvert.train as t\nt._z\nnz.c_in\nself._w\nfrom .errors import _v\n"
    )
    assert sorted(private_uses("dbconvert.split", code)) == [
        "dbconvert.split:1 imports _x from dbconvert.checkpoint",
        "dbconvert.split:3 uses nz._y",
        "dbconvert.split:5 uses t._z",
        "dbconvert.split:8 imports _v from dbconvert.errors",
    ]


def test_no_private_name_is_imported_from_another_module() -> None:
    found = [use for name in MODULES for use in private_uses(name, parse(name))]
    assert not found, "\n".join(found)


# --- (c) no family sniffing outside families/ -----------------------------------------------


def family_names_and_fields() -> tuple[set[str], set[str]]:
    """The registered family names, and every field a family adds to the common model section."""
    from dbconvert.families import config_class, family_names
    from dbconvert.schema import ModelConfig

    names = set(family_names())
    fields = {f for n in names for f in config_class(n).model_fields} - set(ModelConfig.model_fields)
    return names, fields


def strings(node: ast.AST) -> set[str]:
    """String constants of a node: itself, or the elements of a tuple / list / set literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def sniffing(tree: ast.AST, names: set[str], fields: set[str]) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
        ):
            hit = set().union(*(strings(n) for n in (node.left, *node.comparators))) & names
            if hit:
                yield node.lineno, f"compares with the family name {sorted(hit)[0]!r}"
        elif isinstance(node, ast.Dict):
            hit = set().union(*(strings(k) for k in node.keys if k is not None)) & names
            if hit:
                yield node.lineno, f"a table keyed by the family name {sorted(hit)[0]!r}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and strings(node.args[1]) & fields
        ):
            yield node.lineno, f"{node.func.id}(..., {sorted(strings(node.args[1]))[0]!r}) sniffs a family's config"
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in fields
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "model"
        ):
            yield node.lineno, f"reads the family field model.{node.attr}"


def test_the_sniffing_check_catches_what_it_should() -> None:
    names, fields = family_names_and_fields()
    assert {"dit", "llama"} <= names and {"in_channels", "num_classes", "context", "depth", "layers"} <= fields
    assert "family" not in fields and "checkpoint" not in fields
    code = ast.parse(
        "a == 'dit'\nb in ('x', 'llama')\n{'dit': 1}\ngetattr(m, 'num_classes', 0)\nhasattr(m, 'depth')\n"
        "r.model.context\na == 'other'\ngetattr(m, 'checkpoint')\nr.model.checkpoint\nr.sample.steps\n"
    )
    assert [line for line, _ in sniffing(code, names, fields)] == [1, 2, 3, 4, 5, 6]


def test_no_module_outside_families_asks_which_family_it_has() -> None:
    names, fields = family_names_and_fields()
    found = [
        f"{name}:{line} {what}"
        for name, path in MODULES.items()
        if not path.is_relative_to(PACKAGE / "families")
        for line, what in sniffing(parse(name), names, fields)
    ]
    assert not found, "\n".join(found)


def test_no_generic_module_asks_which_metric_or_noise_process_it_has() -> None:
    """Metrics and noise processes are plug-ins: only their own modules (and the registries' tables) name them."""
    from dbconvert.evaluation.metric import metric_names
    from dbconvert.noise_process import process_names

    names = set(metric_names()) | set(process_names())
    own = {PACKAGE / "evaluation" / "fid.py", PACKAGE / "evaluation" / "mauve.py", PACKAGE / "noise.py"}
    found = [
        f"{name}:{line} {what}"
        for name, path in MODULES.items()
        if path not in own and not path.is_relative_to(PACKAGE / "families")
        for line, what in sniffing(parse(name), names, set())
        if "a table keyed by" not in what or path.name not in ("metric.py", "noise_process.py")
    ]
    assert not found, "\n".join(found)
    code = ast.parse("m == 'fid'\nm in ('mauve',)\np == 'edm'\n")
    assert [line for line, _ in sniffing(code, names, set())] == [1, 2, 3]


def reference_kinds() -> set[str]:
    """The model kinds of the registered families' plain references (`Family.reference_kind`: ar, classifier)."""
    from dbconvert.families import family_names, get_family

    return {k for k in (get_family(n).reference_kind for n in family_names()) if k}


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring constants of a module, its classes and functions (and attribute docstrings)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            out |= {id(s.value) for s in body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)}
    return out


def kind_literals(tree: ast.AST, kinds: set[str]) -> Iterator[tuple[int, str]]:
    """Every string constant (outside docstrings and f-string pieces) that is exactly a reference's model kind."""
    skip = docstrings(tree) | {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in kinds
            and id(node) not in skip
        ):
            yield node.lineno, f"names the model kind {node.value!r} (use Family.reference_kind)"


def test_the_model_kind_check_catches_what_it_should() -> None:
    kinds = reference_kinds()
    assert {"ar", "classifier"} <= kinds
    code = ast.parse(
        '"""ar"""\nx == "ar"\nd["classifier"]\n("e2e", "ar")\n"ar" + CKPT\nf"{x}ar"\n"a ar b"\n'
        'def f():\n    """classifier"""\n'
    )
    assert [line for line, _ in kind_literals(code, kinds)] == [2, 3, 4, 5]


def test_no_module_outside_families_names_a_model_kind() -> None:
    """Which plain reference a family has (an AR LM, a classifier) is the family's: generic code asks
    `reference_kind`."""
    kinds = reference_kinds()
    found = [
        f"{name}:{line} {what}"
        for name, path in MODULES.items()
        if not path.is_relative_to(PACKAGE / "families")
        for line, what in kind_literals(parse(name), kinds)
    ]
    assert not found, "\n".join(found)


def test_no_module_outside_families_imports_a_family_package() -> None:
    """Generic code reaches a family through the registry, never by importing its package."""
    names, _ = family_names_and_fields()
    packages = tuple(f"dbconvert.families.{n}" for n in names)
    found = [
        f"{name}:{imp.line} imports {imp.module}"
        for name, path in MODULES.items()
        if not path.is_relative_to(PACKAGE / "families")
        for imp in imports_of(name)
        if imp.module.startswith(packages)
    ]
    assert not found, "\n".join(found)


def family_module_strings(tree: ast.AST, packages: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """String constants naming a module inside a family package ("dbconvert.families.vit.metrics:Accuracy")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(packages):
            yield node.lineno, f"names {node.value!r}, inside a family package (let the family register it)"


def test_the_family_module_string_check_catches_what_it_should() -> None:
    code = ast.parse(
        'x = {"a": "dbconvert.families.vit.metrics:AccuracyMetric"}\ny = "dbconvert.evaluation.fid:F"\n'
        'z = "dbconvert.families.llama"\n'
    )
    packages = ("dbconvert.families.vit", "dbconvert.families.llama")
    assert sorted(line for line, _ in family_module_strings(code, packages)) == [1, 3]


def test_no_module_outside_families_names_a_family_module_in_a_string() -> None:
    """A registry entry pointing into a family package (a metric, a solver) belongs to the family, not generic code."""
    names, _ = family_names_and_fields()
    packages = tuple(f"dbconvert.families.{n}" for n in names)
    found = [
        f"{name}:{line} {what}"
        for name, path in MODULES.items()
        if not path.is_relative_to(PACKAGE / "families")
        for line, what in family_module_strings(parse(name), packages)
    ]
    assert not found, "\n".join(found)


def builtin_families() -> list[str]:
    from dbconvert.families import FAMILIES

    return sorted(FAMILIES)


def test_the_family_list_is_the_registry() -> None:
    """The parametrised checks below cover every built-in family, whatever their number."""
    assert {"dit", "llama", "vit"} <= set(builtin_families())


@pytest.mark.parametrize("name", builtin_families())
def test_builtin_families_fulfil_the_contract(name: str) -> None:
    """Every abstract method of Family is implemented (instantiation would fail otherwise); its config is the
    schema's, and the metrics it lists are registered."""
    from dbconvert.evaluation.metric import metric_names
    from dbconvert.families import REGISTRY, config_class
    from dbconvert.families.contract import Family
    from dbconvert.schema import ModelConfig

    cls = REGISTRY.load(name)
    assert isinstance(cls, type) and issubclass(cls, Family) and not cls.__abstractmethods__
    assert issubclass(config_class(name), ModelConfig) and cls.config_cls is config_class(name)
    assert set(cls.metrics) <= set(metric_names()) and set(cls.own_metrics) <= set(cls.metrics)


LINT_PATHS = "dbconvert tests examples recipes"


def test_the_lint_gate_is_configured() -> None:
    """`.ci/run` runs `ruff check` with pyflakes (F811 caught the duplicate `LlamaFamily.resolve`), pycodestyle and
    120 columns, and `ruff format --check`, with no waiver: neither for the whole code base nor per file. The README's
    development command is the one `.ci/run` runs."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert config["line-length"] == 120 and {"F", "E", "W"} <= set(config["lint"]["select"])
    assert not config["lint"].get("ignore") and not config["lint"].get("per-file-ignores")
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [f"python -m ruff check {LINT_PATHS}", f"python -m ruff format --check {LINT_PATHS}", "python -m pytest"]
    assert all(c + "\n" in ci for c in commands)
    assert " && ".join(commands) in (ROOT / "README.md").read_text()
    assert any(
        dep.startswith("ruff")
        for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    )


def test_the_code_passes_the_lint_gate() -> None:
    """The gate itself, so a long line or an unformatted file fails the suite too, not only CI."""
    pytest.importorskip("ruff")
    for command in (["check"], ["format", "--check"]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *LINT_PATHS.split()], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
