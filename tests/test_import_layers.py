"""The product's packages import each other only downwards, in the order of docs/architecture.md.

The import graph is read with :mod:`ast` (nothing is imported, no torch): every ``import`` and
``from ... import`` in every ``.py`` file of ``fm_train/``, ``data_shards/`` and ``launcher/``,
wherever it stands (inside functions and under ``if TYPE_CHECKING:`` too), relative imports
resolved. Modules collapse to packages: ``fm_train.<folder>`` for each folder of ``fm_train/``,
``fm_train`` for the modules directly in it (``worker.py``...), ``data_shards``, ``launcher``.
Imports by string (``importlib.import_module``) are not seen.

The rules: every package has a row in the "## Layers" table; a package imports only packages in
its own row or rows above it (lower layers); no circle among packages; and inside each package no
circle among modules importing each other at module level (imports inside functions, and those
under ``if TYPE_CHECKING:`` which never run, do not count there).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("fm_train", "data_shards", "launcher")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``importer`` module imports ``target`` module at ``file:line``."""

    importer: str
    target: str
    file: str
    line: int
    module_level: bool  # runs when the importer is imported (not inside a function, not TYPE_CHECKING)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_files() -> dict[str, Path]:
    """Module name -> file, for every module of the product."""
    files = {}
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[_module_name(path)] = path
    return files


MODULES = _product_files()


def package_of(module: str) -> str:
    """``fm_train.<folder>`` for a module in a folder of fm_train/, else the top-level name."""
    parts = module.split(".")
    if parts[0] == "fm_train" and len(parts) > 1 and (ROOT / "fm_train" / parts[1]).is_dir():
        return f"fm_train.{parts[1]}"
    return parts[0]


def _known(name: str) -> str:
    """The longest prefix of dotted ``name`` that is a product module (``name`` itself when none is)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_of(module: str, path: Path) -> list[Import]:
    """Every import of a product module in ``path``."""
    rel = str(path.relative_to(ROOT))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, node: ast.stmt, module_level: bool) -> None:
        if target.split(".")[0] in PRODUCT:
            found.append(Import(module, _known(target), rel, node.lineno, module_level))

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, module_level)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
                sub = f"{source}.{alias.name}"
                add(sub if sub in MODULES else source, node, module_level)
        for child in ast.iter_child_nodes(node):
            inner = module_level
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner = False
            elif isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                inner = False
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), rel), True)
    return sorted(set(found), key=lambda i: (i.line, i.target, not i.module_level))


IMPORTS = sorted((imp for module, path in MODULES.items() for imp in _imports_of(module, path)),
                 key=lambda i: (i.file, i.line))
PACKAGES = sorted({package_of(m) for m in MODULES})


def _layer_rows() -> list[str]:
    """The packages of the "## Layers" table in docs/architecture.md, bottom (first row) first."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    match = re.search(r"^## Layers[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{ARCHITECTURE.relative_to(ROOT)} has no '## Layers' section"
    rows = [line.strip().strip("|").split("|") for line in match.group(1).splitlines() if line.strip().startswith("|")]
    header = [cell.strip() for cell in rows[0]]
    assert "package" in header, f"the Layers table has no 'package' column: {header}"
    column = header.index("package")
    packages = []
    for row in rows[1:]:
        if set(row[column].strip()) <= set("-: "):  # the |---|---| line
            continue
        names = re.findall(r"`([^`]+)`", row[column])
        assert names, f"a Layers row names no `package` in its package column: |{'|'.join(row)}|"
        packages.append(names[0])
    return packages


def _rank() -> dict[str, int]:
    rows = _layer_rows()
    doubled = sorted({p for p in rows if rows.count(p) > 1})
    assert not doubled, f"docs/architecture.md lists these packages in more than one row: {doubled}"
    return {package: row for row, package in enumerate(rows, start=1) if package in PACKAGES}


def _shortest_circle(graph: dict[str, dict[str, Import]], start: str) -> list[str] | None:
    """The shortest path start -> ... -> start in ``graph`` (node list, start at both ends)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, {})):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
            if nxt not in seen:
                seen.add(nxt)
                parent[nxt] = node
                queue.append(nxt)
    return None


def _circles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest circle through each node that is on a circle, each circle once."""
    circles, keys = [], set()
    for node in sorted(graph):
        circle = _shortest_circle(graph, node)
        if circle is None:
            continue
        ring = circle[:-1]
        first = ring.index(min(ring))
        key = tuple(ring[first:] + ring[:first])
        if key not in keys:
            keys.add(key)
            circles.append(list(key) + [key[0]])
    return circles


def _describe(circle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    lines = ["  circle: " + " -> ".join(circle)]
    for a, b in zip(circle, circle[1:]):
        imp = graph[a][b]
        lines.append(f"    {a} -> {b}: {imp.where} imports {imp.target}")
    return "\n".join(lines)


def test_every_package_has_a_layer() -> None:
    rank = _rank()
    missing = [p for p in PACKAGES if p not in rank]
    if missing:
        pytest.fail(f"these packages have no row in the Layers table of docs/architecture.md: {missing}; add one "
                    "(bottom first: a package may import only its own row and the rows above it)", pytrace=False)


def test_no_circle_among_packages() -> None:
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in IMPORTS:
        a, b = package_of(imp.importer), package_of(imp.target)
        if a != b:
            graph[a].setdefault(b, imp)  # the first import of b in file order is the example
    circles = _circles(graph)
    if circles:
        pytest.fail("packages import each other round a circle (one example import per edge):\n"
                    + "\n".join(_describe(c, graph) for c in circles), pytrace=False)


def test_no_package_imports_a_higher_layer() -> None:
    rank = _rank()
    bad = []
    for imp in IMPORTS:
        a, b = package_of(imp.importer), package_of(imp.target)
        if a in rank and b in rank and rank[b] > rank[a]:
            bad.append(f"  {imp.where}: {a} (layer {rank[a]}) imports {imp.target} of {b} (layer {rank[b]})")
    if bad:
        pytest.fail("imports of a higher layer (docs/architecture.md, Layers: a package imports only its own row "
                    "and the rows above it):\n" + "\n".join(dict.fromkeys(bad)), pytrace=False)


def test_no_module_level_circle_inside_a_package() -> None:
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in IMPORTS:
        if imp.module_level and imp.target != imp.importer and package_of(imp.importer) == package_of(imp.target):
            graph[imp.importer].setdefault(imp.target, imp)
    circles = _circles(graph)
    if circles:
        pytest.fail("modules of one package import each other round a circle at module level (move one import "
                    "into the function that needs it, or the shared part into a third module):\n"
                    + "\n".join(_describe(c, graph) for c in circles), pytrace=False)
