"""The shape of the package (issue 16): one door for the commands, no import cycle, small modules and signatures.

Everything is read with :mod:`ast` from the source files; nothing in ``prunecp_cli`` is imported.
Every ``import`` statement counts, wherever it stands: at module level, inside a function (the usual
way to hide a cycle), or under ``if TYPE_CHECKING:`` (a dependency all the same). Imports of names
held in strings (the importance registry's ``"module:Class"`` entries, ``importlib.import_module``)
are plug-in lookups, not edges of the graph.

* ``prunecp_cli/commands/*`` import from ``prunecp_cli`` only the API (``prunecp_cli.api``), the Typer
  plumbing (``prunecp_cli.commands._common``), the torch-free ``errors``, ``types`` and ``checks``, the
  presentation module ``prunecp_cli.present``, and the importance registry ``prunecp_cli.importance``
  (the package ``__init__`` only, which is torch-free: ``score`` and ``prune`` list its method names
  in ``--help``). ``from prunecp_cli import api`` is an import of ``prunecp_cli.api``;
  ``from prunecp_cli.importance import base`` is one of ``prunecp_cli.importance.base`` and not allowed.
* The import graph of ``prunecp_cli`` has no cycle. An import of ``a.b.c`` is an edge to ``a.b.c``
  only: the parent packages it also runs are not edges, so a package ``__init__`` may import its
  own submodules.
* No module in ``prunecp_cli/`` is over 400 lines.
* No function outside ``prunecp_cli/commands/`` has more than 12 parameters (``self``/``cls`` are not
  counted; ``*args`` and ``**kwargs`` count one each). Typer command functions are exempt, since each
  option is a parameter there.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prunecp_cli"

ALLOWED_IN_COMMANDS = frozenset({
    "prunecp_cli.api", "prunecp_cli.commands._common", "prunecp_cli.errors", "prunecp_cli.types",
    "prunecp_cli.checks", "prunecp_cli.present", "prunecp_cli.importance",
})
MAX_MODULE_LINES = 400
MAX_PARAMETERS = 12


@dataclass(frozen=True)
class Import:
    """One import of a ``prunecp_cli`` module: who imports what, and where."""

    source: str
    target: str
    file: str
    line: int
    local: bool  # inside a function

    def where(self) -> str:
        return f"{self.file}:{self.line}{' (in a function)' if self.local else ''}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: module name → source file (relative to the repository), for every module of the package
FILES: dict[str, str] = {_module_name(p): str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules) -> str | None:
    """``name``, or its longest prefix that is one of ``modules`` (``a.b.Class`` → ``a.b``); None outside."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, file: str, source: str, modules) -> list[Import]:
    """Every import of one of ``modules`` in ``module``'s ``source``, function-local ones included."""
    found: list[Import] = []
    is_package = file.endswith("__init__.py")

    def walk(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            targets: list[str | None] = []
            if isinstance(child, ast.Import):
                targets = [_known(alias.name, modules) for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                # `from pkg import module` imports the module; `from pkg import name` the package (or module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _known(base, modules)
                           for a in child.names]
            found.extend(Import(module, t, file, child.lineno, local) for t in targets if t is not None)
            walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(source, filename=file), False)
    return found


def package_imports() -> dict[str, list[Import]]:
    """The import graph of prunecp_cli: each module's imports of prunecp_cli modules."""
    return {m: imports_of(m, f, (ROOT / f).read_text(encoding="utf-8"), FILES) for m, f in FILES.items()}


def find_cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One shortest cycle per strongly connected component of more than one module (or a self-import).

    Tarjan's algorithm finds the components; in each, a breadth-first search from its first module
    (by name) gives a shortest cycle through it.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph.get(node, []):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) > 1 or any(e.target == start for e in graph.get(start, [])):
            cycles.append(_shortest_cycle(graph, start, component))
    return sorted(cycles, key=lambda cycle: cycle[0].source)


def _shortest_cycle(graph: dict[str, list[Import]], start: str, component: set[str]) -> list[Import]:
    came_by: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph.get(node, []):
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if edge.target in component and edge.target not in came_by:
                    came_by[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its component")  # a component always has one


def describe(cycle: list[Import]) -> str:
    """``a -> b [file:line] -> a [file:line (in a function)]``."""
    return cycle[0].source + "".join(f" -> {edge.target} [{edge.where()}]" for edge in cycle)


def long_signatures(file: str, source: str) -> list[str]:
    """``file:line name (N parameters)`` for each function in ``source`` with more than 12 parameters."""
    found = []

    def count(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
        args = node.args
        positional = [*args.posonlyargs, *args.args]
        if in_class and positional and positional[0].arg in ("self", "cls"):
            positional = positional[1:]
        return len(positional) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)

    def walk(node: ast.AST, in_class: bool, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := count(child, in_class)) > MAX_PARAMETERS:
                    found.append(f"{file}:{child.lineno} {prefix}{child.name} ({n} parameters)")
                walk(child, False, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, True, f"{prefix}{child.name}.")
            else:
                walk(child, in_class, prefix)

    walk(ast.parse(source, filename=file), False, "")
    return found


def test_commands_use_only_the_api_and_their_helpers():
    stray = [f"{edge.where()} imports {edge.target}" for module, edges in package_imports().items()
             if module.startswith("prunecp_cli.commands") for edge in edges if edge.target not in ALLOWED_IN_COMMANDS]
    assert not stray, "commands reach past prunecp_cli.api:\n" + "\n".join(stray)


def test_import_graph_has_no_cycle():
    cycles = find_cycles(package_imports())
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(describe(c) for c in cycles)


def test_no_module_is_over_400_lines():
    lengths = {f: len((ROOT / f).read_text(encoding="utf-8").splitlines()) for f in FILES.values()}
    long = [f"{f} ({n})" for f, n in sorted(lengths.items()) if n > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(long)


def test_no_function_outside_commands_has_more_than_12_parameters():
    found = [line for module, f in FILES.items() if not module.startswith("prunecp_cli.commands")
             for line in long_signatures(f, (ROOT / f).read_text(encoding="utf-8"))]
    assert not found, f"functions with more than {MAX_PARAMETERS} parameters:\n" + "\n".join(found)


# The checkers themselves, on hand-written sources: each must be able to fail.

def _graph(sources: dict[str, tuple[str, str]]) -> dict[str, list[Import]]:
    return {m: imports_of(m, file, text, set(sources)) for m, (file, text) in sources.items()}


CIRCLE = {
    "p.pipeline": ("p/pipeline/__init__.py", "from p.pipeline import pruning\n"),
    "p.pipeline.pruning": ("p/pipeline/pruning.py", "import os\nfrom p.pipeline import schedule, Thing\n"),
    "p.pipeline.schedule": ("p/pipeline/schedule.py", "import torch\n\ndef f():\n    from .pruning import g\n"),
    "p.api": ("p/api.py", "import p.pipeline.schedule as s\nfrom .pipeline.pruning import prune\n"),
}


def test_checker_resolves_every_import_form():
    graph = _graph(CIRCLE)
    assert [(e.target, e.local) for e in graph["p.pipeline.pruning"]] == [
        ("p.pipeline.schedule", False), ("p.pipeline", False)]  # a module, then a name of the package
    assert [(e.target, e.line, e.local) for e in graph["p.pipeline.schedule"]] == [("p.pipeline.pruning", 4, True)]
    assert [e.target for e in graph["p.api"]] == ["p.pipeline.schedule", "p.pipeline.pruning"]


def test_checker_reports_a_cycle_hidden_in_a_function():
    (cycle,) = find_cycles(_graph(CIRCLE))  # the package's own import of pruning makes no second cycle
    assert describe(cycle) == ("p.pipeline -> p.pipeline.pruning [p/pipeline/__init__.py:1] -> p.pipeline "
                               "[p/pipeline/pruning.py:2]")
    untangled = {**CIRCLE, "p.pipeline.pruning": ("p/pipeline/pruning.py", "from p.pipeline import schedule\n")}
    (cycle,) = find_cycles(_graph(untangled))
    assert describe(cycle) == ("p.pipeline.pruning -> p.pipeline.schedule [p/pipeline/pruning.py:1] -> "
                               "p.pipeline.pruning [p/pipeline/schedule.py:4 (in a function)]")
    straight = {**untangled, "p.pipeline.schedule": ("p/pipeline/schedule.py", "def f():\n    import os\n")}
    assert find_cycles(_graph(straight)) == []


def test_checker_counts_parameters_without_self():
    source = ("class C:\n    def m(self, a, b, c, d, e, f, g, h, i, j, k, l):\n        pass\n"
              "def wide(a, b, c, d, e, f, g, h, i, j, k, *, l, **m):\n    def inner(x):\n        pass\n"
              "def wider(*args, a, b, c, d, e, f, g, h, i, j, k, l, m):\n    pass\n")
    assert long_signatures("w.py", source) == ["w.py:4 wide (13 parameters)", "w.py:7 wider (14 parameters)"]
