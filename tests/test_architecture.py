"""The import rules that keep the core readable: methods that do not know each other, models
that know no method, a deployment wing that knows nothing of training, and no import cycle.
Read from the source with ``ast``, so a rule broken anywhere (even in a function) fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "compaware"

# (what imports, what it must not import): dotted prefixes of compaware's modules. The
# compressors get their latency timer from outside; of the deployment wing they may name
# the forms a layer is timed in (EXCEPTIONS), nothing that builds or times one.
RULES = [
    ("compaware.compress", "compaware.regularizers"),
    ("compaware.compress", "compaware.deploy"),
    ("compaware.regularizers", "compaware.compress"),
    ("compaware.models", "compaware.regularizers"),
    ("compaware.models", "compaware.compress"),
    ("compaware.deploy", "compaware.train"),
    ("compaware.deploy", "compaware.loop"),
    ("compaware.deploy", "compaware.regularizers"),
    ("compaware.deploy", "compaware.compress"),
    ("compaware.report", "compaware.train"),
    ("compaware.report", "compaware.loop"),
    ("compaware.native", "compaware.regularizers"),
]
EXCEPTIONS = {("compaware.compress.latency", "compaware.deploy.forms")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The compaware modules ``name`` imports anywhere in its file (a ``from package import
    module`` counts as the module)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {module for module in found if module in MODULES}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize(("importer", "forbidden"), RULES)
def test_import_rule(importer, forbidden):
    assert any(within(name, importer) for name in MODULES), f"no module {importer}: stale rule"
    breaking = sorted(f"{name} imports {target}" for name in MODULES if within(name, importer)
                      for target in imported(name) if within(target, forbidden)
                      and (name, target) not in EXCEPTIONS)
    assert breaking == []


def test_the_import_graph_has_no_cycle():
    """Depth-first search for a back edge: modules that import each other, directly or
    around a loop, cannot be read (or loaded) one without the other."""
    graph = {name: imported(name) for name in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, " → ".join(cycle)


# Calls whose many positional arguments are the callee's own convention: logging's format
# arguments, a struct layout, the C kernels' ABI.
POSITIONAL_CONVENTIONS = ("log.", "out.fields", "kernel", "_kernel()")
MAX_POSITIONAL = 5


def test_no_call_forwards_more_than_a_handful_of_positional_arguments():
    crowded = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or len(node.args) <= MAX_POSITIONAL:
                continue
            callee = ast.unparse(node.func)
            if not callee.startswith(POSITIONAL_CONVENTIONS):
                crowded.append(f"{name}:{node.lineno} {callee}({len(node.args)} positional)")
    assert crowded == []
