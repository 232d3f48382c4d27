"""The package graph, read from the source: imports run one way, down the layers the README's Architecture
section draws, with no cycle among packages or among the modules of one package."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "llmasos"
# Bottom to top: a unit imports only units below it. A unit is a package of llmasos or a top-level module;
# "llmasos" is the package's own __init__ (the public API), above everything but the command line.
LAYERS = [
    "errors",
    "extras",
    "outputs",
    "progress",
    "kernels",
    "models",
    "tokenization",
    "checkpoints",
    "data",
    "inference",
    "evaluation",
    "training",
    "serving",
    "llmasos",
    "quickstart",
    "cli",
    "__main__",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every llmasos module `path` imports, at module level or inside functions."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "llmasos"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "llmasos":
                found.add(base)
                found |= {
                    f"{base}.{a.name}"
                    for a in node.names
                    if (SRC.parent / f"{base}.{a.name}".replace(".", "/")).exists()
                    or (SRC.parent / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists()
                }
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llmasos"


MODULES = {module_name(p): imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_unit_has_a_layer():
    assert {unit(m) for m in MODULES} <= set(LAYERS), {unit(m) for m in MODULES} - set(LAYERS)


def test_imports_run_down_the_layers():
    upward = sorted(
        f"{m} -> {i}"
        for m, targets in MODULES.items()
        for i in targets
        if unit(i) != unit(m) and LAYERS.index(unit(i)) > LAYERS.index(unit(m))
    )
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` if there is any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


@pytest.mark.parametrize("package", sorted({unit(m) for m in MODULES if m.count(".") >= 2}))
def test_no_cycle_among_the_modules_of_a_package(package):
    inside = {
        m: {i for i in targets if unit(i) == package and i in MODULES and i != m}
        for m, targets in MODULES.items()
        if unit(m) == package
    }
    # A package's __init__ re-exports its modules: that is not a module importing its parent.
    inside = {m: {i for i in targets if not m.startswith(i + ".")} for m, targets in inside.items()}
    assert cycle(inside) is None, " -> ".join(cycle(inside))


def test_the_graph_is_read():  # the test above would pass on an empty graph
    assert "llmasos.checkpoints.load" in MODULES and any(unit(i) == "models" for i in MODULES["llmasos.checkpoints.load"])
