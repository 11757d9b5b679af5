"""The package's import graph: every module imports, no circle, no private name across modules.

The graph is read statically from each module's AST. An edge A -> B is any `import` or `from`
statement in A that names a module B of the package, wherever it stands: at module level, in a
function (a deferred import is still a dependency, only a later one) or under
`if TYPE_CHECKING:`. `from agent.pkg import name` is an edge to `agent.pkg.name` when that is a
module, else to `agent.pkg`. The parent packages Python runs on the way (`agent/__init__.py`
for `agent.x`) are not edges: every module would otherwise depend on every `__init__` above it.

Private names: `from agent.x import _name`, `agent.x._name` and `alias._name` (where `alias`
is a module of the package) are refused when `_name` is defined in another module than the one
using it (dunders such as `__version__` are public). benchmarks/ are held to the same rule (they
use the package as its users do). tests/ are not: a test is white-box where it injects a fault
(a failing atomic writer, a raw MQTT packet, a lost connection) into the module it tests, and
that is the one place a private name may be reached for. Attribute access on objects
(`sink._client`) is not an import and is not checked.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "agent"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


MODULES = package_modules()


def _is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def _resolve(module: str | None, level: int, here: str) -> str:
    """The absolute name of a `from` statement's module in module `here`."""
    if not level:
        return module or ""
    base = here.split(".")
    if not _is_package(here):
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(tree: ast.AST, here: str) -> Iterator[tuple[ast.stmt, str, list[str]]]:
    """(statement, imported module, names taken from it) for every import in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name, []
        elif isinstance(node, ast.ImportFrom):
            yield node, _resolve(node.module, node.level, here), [a.name for a in node.names]


def edges(name: str, path: Path) -> set[str]:
    out: set[str] = set()
    for _, mod, names in _imports(ast.parse(path.read_text()), name):
        if mod in MODULES:
            subs = {f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES}
            out |= subs
            if not names or len(subs) < len(names):
                out.add(mod)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    return {name: edges(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return None


def _private(n: str) -> bool:
    return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))


def private_uses(source: str, here: str, label: str) -> list[str]:
    """`label:line: what` for every private name of another package module used in `source`
    (the text of module `here`)."""
    tree = ast.parse(source)
    out: list[str] = []
    aliases: dict[str, str] = {}  # local name -> package module it is bound to
    for node, mod, _ in _imports(tree, here):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    aliases[a.asname or a.name] = a.name
            continue
        if mod.split(".")[0] != PACKAGE:
            continue
        for a in node.names:
            full = f"{mod}.{a.name}"
            if full in MODULES:
                aliases[a.asname or a.name] = full
            elif _private(a.name) and mod != here:
                out.append(f"{label}:{node.lineno}: from {mod} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            target = ast.unparse(node.value)
            mod = aliases.get(target, target)
            if mod in MODULES and mod != here:
                out.append(f"{label}:{node.lineno}: {target}.{node.attr} ({mod})")
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name: str) -> None:
    if name.endswith(".__main__"):  # importing it runs the CLI: compile it only
        compile(MODULES[name].read_text(), str(MODULES[name]), "exec")
        return
    importlib.import_module(name)


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert sum(map(len, graph.values())) > 50  # the reader sees the package's real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_is_imported_across_modules() -> None:
    files = [*MODULES.values(), *sorted((ROOT / "benchmarks").rglob("*.py"))]
    found = [line for p in files for line in private_uses(
        p.read_text(), _module_name(p), str(p.relative_to(ROOT)))]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_check_sees_every_form() -> None:
    src = ("from agent.fleet.state import _Totals\n"
           "import agent.telemetry.mqtt as m\n"
           "from agent.fleet import watch\n"
           "from agent.errors import __doc__, AgentError\n"
           "from agent.fleet.schema import Invalid as _Invalid\n"
           "m._Client\nwatch._wait\nagent.errors._x\nAgentError._y\n")
    found = private_uses(src, "tests.probe", "probe.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "from agent.fleet.state import _Totals",
        "m._Client (agent.telemetry.mqtt)", "watch._wait (agent.fleet.watch)",
        "agent.errors._x (agent.errors)"], found
    # a module's own private names are its own business
    assert not private_uses("from agent.fleet.state import _Totals\n", "agent.fleet.state",
                            "state.py")
