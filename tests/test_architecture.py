"""The house's rules (issue 19), read from the source with ``ast``: nothing is imported or run.

* no import cycle among ``fhir_dmp`` modules, and no import of a ``fhir_dmp`` module inside a
  function unless the line says why it is lazy (``# lazy: <reason>``, a reason other than a cycle);
* no class over 400 lines;
* no module directly under ``fhir_dmp/`` but ``__init__.py``: every module sits in a package
  that names its layer;
* only ``fhir_dmp/storage/`` and ``fhir_dmp/runtime/`` (which opens the client) see ``pymongo.errors``;
  everyone else catches the storage exceptions;
* no database collection touched outside storage.

Each test lists every violation as ``path:line`` with what to do about it.
"""
from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import fhir_dmp

ROOT = Path(fhir_dmp.__file__).resolve().parent          # fhir_dmp/
REPO = ROOT.parent
MAX_CLASS_LINES = 400
LAZY = re.compile(r"#\s*lazy:\s*(?P<reason>\S.*)$")
CYCLE_REASON = re.compile(r"cycle|circular", re.IGNORECASE)
PYMONGO_ERRORS_ALLOWED = ("storage/", "runtime/")


@dataclass(frozen=True)
class Import:
    importer: str        # dotted module name
    target: str          # dotted module name of a fhir_dmp module
    path: str            # file, relative to the repository
    line: int
    in_function: bool
    type_checking: bool  # under ``if TYPE_CHECKING:`` (never run)
    source: str          # the statement's text (every line of it)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


@cache
def parsed(path: Path) -> tuple[ast.Module, tuple[str, ...]]:
    text = path.read_text(encoding="utf-8")
    return ast.parse(text, filename=str(path)), tuple(text.splitlines())


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.Module):
    """(node, in_function, type_checking) for every import statement of a module."""
    def walk(node, in_function, type_checking):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function, type_checking
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, True, type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
            else:
                yield from walk(child, in_function, type_checking)
    yield from walk(tree, False, False)


def _targets(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The fhir_dmp modules a statement imports (and the packages it names explicitly)."""
    known = modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not (source == "fhir_dmp" or source.startswith("fhir_dmp.")):
        return []
    found = [source] if source in known else []
    found += [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known]
    return found


def _with_packages(targets: list[str]) -> list[str]:
    """Importing ``a.b.c`` first runs the ``__init__`` of ``a`` and ``a.b``: those are edges too
    (a cycle through a package's ``__init__`` is a cycle)."""
    known, out = modules(), []
    for target in targets:
        parts = target.split(".")
        out += [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in known and p not in out]
        if target not in out:
            out.append(target)
    return out


@cache
def imports() -> tuple[Import, ...]:
    out = []
    for name, path in modules().items():
        tree, lines = parsed(path)
        for node, in_function, type_checking in _statements(tree):
            for target in _with_packages(_targets(name, path.name == "__init__.py", node)):
                if target == name or name.startswith(target + "."):
                    continue                  # its own packages are imported before it runs
                source = "\n".join(lines[node.lineno - 1:node.end_lineno])
                out.append(Import(name, target, rel(path), node.lineno, in_function, type_checking, source))
    return tuple(out)


def _components(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def strongconnect(v):               # recursion depth is bounded by the module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return components


def _shortest_path(edges, component, start, goal) -> list[str]:
    previous, queue = {start: None}, deque([start])
    while queue:
        v = queue.popleft()
        if v == goal:
            break
        for w in sorted(edges.get(v, {})):
            if w in component and w not in previous:
                previous[w] = v
                queue.append(w)
    path = [goal]
    while previous[path[-1]] is not None:
        path.append(previous[path[-1]])
    return path[::-1]


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """The distinct shortest cycles through every import inside a strongly connected component
    (so two cycles sharing a module are both named), shortest first, as the imports that make them."""
    cycles = {}
    for component in _components(edges):
        for a in sorted(component):
            for b in sorted(w for w in edges[a] if w in component):
                path = [a] + _shortest_path(edges, component, b, a)        # a -> b ... -> a
                ring = path[:-1]
                turn = ring.index(min(ring))
                key = tuple(ring[turn:] + ring[:turn])                     # one rotation per cycle
                cycles.setdefault(key, [edges[x][y] for x, y in zip(path, path[1:])])
    return sorted(cycles.values(), key=lambda c: (len(c), c[0].importer))


def _describe(edge: Import) -> str:
    where = "inside a function" if edge.in_function else "at module level"
    return f"  {edge.importer} -> {edge.target}   ({edge.path}:{edge.line}, {where})"


# ------------------------------------------------------------------------------------------------ (a)
def test_no_import_cycle_among_fhir_dmp_modules():
    """Every import that runs (module level or inside a function; not ``if TYPE_CHECKING:``) is an
    edge: a cycle held together by an import inside a function is still a cycle."""
    edges: dict[str, dict[str, Import]] = {}
    for edge in imports():
        if not edge.type_checking:
            edges.setdefault(edge.importer, {}).setdefault(edge.target, edge)
    cycles = _cycles(edges)
    report = "\n\n".join(
        f"cycle {i}: " + " -> ".join([c[0].importer] + [e.target for e in c]) + "\n" + "\n".join(map(_describe, c))
        for i, c in enumerate(cycles, 1))
    if cycles:
        pytest.fail(
            f"{len(cycles)} import cycle(s) among fhir_dmp modules; break each by moving the shared part "
            f"into a module both import, or by handing the collaborator in (never by importing inside a "
            f"function):\n\n{report}", pytrace=False)


def test_no_import_inside_a_function_without_a_reason():
    """An import of a fhir_dmp module inside a function says why on its line: ``# lazy: <reason>``
    (a heavy or optional dependency, a process started later...), and the reason is not a cycle."""
    bad = []
    for edge in imports():
        if not edge.in_function:
            continue
        match = LAZY.search(edge.source)
        if match is None:
            bad.append(f"  {edge.path}:{edge.line}: {edge.importer} imports {edge.target} inside a function, "
                       f"with no '# lazy: <reason>' comment")
        elif CYCLE_REASON.search(match["reason"]):
            bad.append(f"  {edge.path}:{edge.line}: lazy only to break a cycle ({match['reason'].strip()!r})")
    if bad:
        pytest.fail(
            f"{len(bad)} import(s) of fhir_dmp modules inside functions: import at module level, or say on "
            f"the same line why it is lazy ('# lazy: heavy', not a cycle):\n" + "\n".join(bad), pytrace=False)


# ------------------------------------------------------------------------------------------------ (b)
def test_no_class_over_400_lines():
    big = []
    for path in modules().values():
        tree, _ = parsed(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                size = node.end_lineno - first + 1
                if size > MAX_CLASS_LINES:
                    big.append((size, f"  {rel(path)}:{node.lineno}: class {node.name} has {size} lines"))
    big.sort(reverse=True)
    if big:
        pytest.fail(
            f"{len(big)} class(es) over {MAX_CLASS_LINES} lines under fhir_dmp/: split each into classes with "
            f"one responsibility (a facade may compose them):\n" + "\n".join(line for _, line in big), pytrace=False)


# ------------------------------------------------------------------------------------------------ (c)
def test_every_module_sits_in_a_layer_package():
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    if loose:
        pytest.fail(
            f"{len(loose)} module(s) directly under fhir_dmp/ (only __init__.py belongs there): move each into "
            f"the package of its layer (http/, runtime/, audit/, storage/, guard/, notifications/, "
            f"security/, search/, documents/, ...; see README's layout table):\n"
            + "\n".join(f"  fhir_dmp/{name}" for name in loose), pytrace=False)


# ------------------------------------------------------------------------------------------------ (d)
def _pymongo_errors_uses(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == "pymongo.errors" or a.name.startswith("pymongo.errors.") for a in node.names):
                yield node.lineno, "import pymongo.errors"
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if node.module == "pymongo.errors" or (node.module or "").startswith("pymongo.errors."):
                yield node.lineno, f"from {node.module} import ..."
            elif node.module == "pymongo" and any(a.name == "errors" for a in node.names):
                yield node.lineno, "from pymongo import errors"
        elif isinstance(node, ast.Attribute) and node.attr == "errors" and \
                isinstance(node.value, ast.Name) and node.value.id == "pymongo":
            yield node.lineno, "pymongo.errors"


def test_only_storage_and_runtime_see_pymongo_errors():
    bad = []
    for path in modules().values():
        inside = str(path.relative_to(ROOT)).replace("\\", "/")
        if inside.startswith(PYMONGO_ERRORS_ALLOWED):
            continue
        tree, _ = parsed(path)
        bad += [f"  {rel(path)}:{line}: {what}" for line, what in sorted(set(_pymongo_errors_uses(tree)))]
    if bad:
        pytest.fail(
            f"{len(bad)} use(s) of pymongo.errors outside fhir_dmp/storage/ and fhir_dmp/runtime/: catch the "
            f"exceptions of fhir_dmp/storage/errors.py instead:\n" + "\n".join(bad), pytrace=False)


# ------------------------------------------------------------------------------------------------ storage
def test_no_collection_is_touched_outside_storage():
    """Issue 9, "done when": grep finds no database collection touched outside storage (the journal,
    its sealer and the decision cache included)."""
    touch = re.compile(r"db\[|\.db\b|get_collection|\.coll\b")
    found = [f"{path.relative_to(ROOT)}:{n}" for path in sorted(ROOT.rglob("*.py"))
             if path.relative_to(ROOT).parts[0] != "storage"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if touch.search(line)]
    assert found == [], found
