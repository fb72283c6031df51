"""The import rules of docs/STYLE.md, read from the source with ``ast`` (nothing imported):
no import cycle among the modules of ``napari_wsdino.core`` (function-level imports
included), and no ``_`` name taken from another package of ``napari_wsdino``.

Each test lists what the code does today in a KNOWN set, so it fails on anything new;
an entry that no longer occurs fails too, so the list only shrinks (remove it then).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "napari_wsdino"
CORE = "napari_wsdino.core"


@dataclass(frozen=True)
class Module:
    name: str            # dotted
    path: Path
    is_package: bool     # an __init__.py

    @property
    def package(self) -> str:
        """The package this module belongs to (a package's __init__ belongs to itself)."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _modules() -> dict[str, Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = Module(".".join(parts), path, is_package)
    return out


MODULES = _modules()


@dataclass(frozen=True)
class Import:
    importer: str
    line: int
    source: str          # the module imported from (resolved, absolute)
    name: str | None     # for ``from source import name``; None for ``import source``
    in_function: bool    # runs when the function is called, not when the module loads
    type_only: bool      # under ``if TYPE_CHECKING:``: never runs


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: Module) -> list[Import]:
    """Every import statement in the file, at any depth (functions, methods, ``if``s)."""
    tree = ast.parse(module.path.read_text(), str(module.path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(module.name, node.lineno, a.name, None, in_function, type_only)
                         for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.extend(Import(module.name, node.lineno, source, a.name, in_function, type_only)
                         for a in node.names)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_only)
            return
        is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or is_function, type_only)

    visit(tree, False, False)
    return [i for i in found if i.source == "napari_wsdino" or i.source.startswith("napari_wsdino.")]


IMPORTS = [i for m in MODULES.values() for i in _imports(m)]


def _targets(imp: Import) -> set[str]:
    """The modules of the package an import runs: the one named (a submodule when
    ``from package import submodule``) and the ``__init__`` of each package above it
    that the importer does not already sit in."""
    named = imp.source
    if imp.name and f"{imp.source}.{imp.name}" in MODULES:
        named = f"{imp.source}.{imp.name}"
    parts = named.split(".")
    own = MODULES[imp.importer].name.split(".")
    out = set()
    for n in range(1, len(parts) + 1):
        target = ".".join(parts[:n])
        if target in MODULES and own[:n] != parts[:n]:
            out.add(target)
    if named in MODULES:          # its own package's __init__ too: that may be half-run
        out.add(named)
    return out - {imp.importer}


def _core_cycle_edges() -> dict[tuple[str, str], list[int]]:
    """Import edges (importer, imported) of core that lie on a cycle, with their lines."""
    edges: dict[tuple[str, str], set[int]] = {}
    for imp in IMPORTS:
        if not imp.importer.startswith(CORE) or imp.type_only:
            continue
        for target in _targets(imp):
            if target.startswith(CORE):
                edges.setdefault((imp.importer, target), set()).add(imp.line)
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    # An edge a -> b is on a cycle exactly when b leads back to a.
    return {e: sorted(lines) for e, lines in edges.items() if e[0] in reachable.get(e[1], ())}


# Import edges of core that lie on a cycle today (importer -> imported; type-only imports
# left out): none. The two cycles there were, both through recipes (the module that
# combines the stages), were broken in issue 31 by the STYLE rule: stage settings live with
# the stage (DEFAULT_CROP and EmbedSettings in embed/settings.py, torch-free), recipes
# imports the stages and never the reverse, and train takes recipe defaults as an argument
# (train.resolve_config(defaults=...), passed by recipes.resolve_train). Keep it empty.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def test_walker_resolves_relative_function_level_and_type_only_imports(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from .setup import a\n"
        "if TYPE_CHECKING:\n"
        "    from napari_wsdino.core import metrics\n"
        "def f():\n"
        "    from ..recipes import b\n"
        "    import napari_wsdino.core.tvn\n")
    found = _imports(Module(f"{CORE}.train.fake", path, False))
    got = {(i.source, i.name, i.in_function, i.type_only) for i in found}
    assert got == {(f"{CORE}.train.setup", "a", False, False),
                   (CORE, "metrics", False, True),
                   (f"{CORE}.recipes", "b", True, False),
                   (f"{CORE}.tvn", None, True, False)}
    # ``from package import module`` runs the module; a package's __init__ runs first.
    assert _targets(Import(f"{CORE}.recipes", 1, CORE, "metrics", False, False)) == {
        f"{CORE}.metrics"}
    assert _targets(Import(f"{CORE}.recipes", 1, f"{CORE}.embed.crops", "X", False, False)) == {
        f"{CORE}.embed", f"{CORE}.embed.crops"}


def test_no_new_import_cycle_in_core():
    found = _core_cycle_edges()
    new = {e: lines for e, lines in found.items() if e not in KNOWN_CYCLE_EDGES}
    gone = KNOWN_CYCLE_EDGES - set(found)
    assert not new, "new import cycle(s) in core; edges on a cycle (importer -> imported: lines):\n" + \
        "\n".join(f"  {a} -> {b}: {lines}" for (a, b), lines in sorted(new.items()))
    assert not gone, f"no longer on a cycle, remove from KNOWN_CYCLE_EDGES: {sorted(gone)}"


def _private_imports() -> dict[tuple[str, str, str], list[int]]:
    """``(importer, package, name)`` for each ``_`` name an importer takes from a module
    of a package other than its own, with lines; dunders are not private."""
    out: dict[tuple[str, str, str], list[int]] = {}
    for imp in IMPORTS:
        if not imp.name or not imp.name.startswith("_") or imp.name.startswith("__"):
            continue
        if f"{imp.source}.{imp.name}" in MODULES:      # a private module, imported whole
            source = MODULES[f"{imp.source}.{imp.name}"]
        else:
            source = MODULES[imp.source]
        importer = MODULES[imp.importer]
        if source.package != importer.package:
            key = (imp.importer, source.package, imp.name)
            out.setdefault(key, set()).add(imp.line)
    return out


# ``_`` names imported across packages today: (importer, package it takes it from, name):
# none (recipes used train's ``_toml_value``; both now use ``core.tomlfmt.toml_value``).
# A package offers a public name instead (issue 31). Keep it empty.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def test_no_new_private_name_imported_across_packages():
    found = _private_imports()
    new = {k: v for k, v in found.items() if k not in KNOWN_PRIVATE_IMPORTS}
    gone = KNOWN_PRIVATE_IMPORTS - set(found)
    assert not new, "private names imported from another package (importer, package, name: lines):\n" + \
        "\n".join(f"  {k}: {v}" for k, v in sorted(new.items()))
    assert not gone, f"no longer imported, remove from KNOWN_PRIVATE_IMPORTS: {sorted(gone)}"


if __name__ == "__main__":  # pragma: no cover - prints today's lists
    for e, lines in sorted(_core_cycle_edges().items()):
        print("cycle", e, lines)
    for k, v in sorted(_private_imports().items()):
        print("private", k, sorted(v))
