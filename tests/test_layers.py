"""The package's import graph: no cycle, and every module imports only its own package and lower layers
(data -> model -> decision -> inference / training -> evaluation -> reporting -> serve / api -> commands -> cli)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "skinlesion"
CORE = {"classes", "errors", "fileio", "device", "metrics", "rules"}  # small modules every layer may use
LAYERS = {
    "core": 0, "data": 1, "model": 2, "decision": 3, "inference": 4, "training": 4, "evaluation": 5, "reporting": 6,
    "serve": 7, "api": 7, "commands": 8, "cli": 9, "__main__": 10,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every skinlesion module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skinlesion"):
            for alias in node.names:  # `from skinlesion.decision import chain` imports the module chain
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("skinlesion")}
    return found


def graph() -> dict[str, set[str]]:
    edges = {module_name(p): imports(p) for p in SRC.rglob("*.py")}
    edges["skinlesion"] = set()  # the package facade imports skinlesion.api lazily, on first use of skinlesion.load
    return edges


def unit(module: str) -> str:
    """The first name under skinlesion: its package (data, decision, ...) or top-level module."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return "core" if name in CORE else name


def test_every_module_has_a_layer():
    assert {unit(m) for m in graph()} - {"__init__"} <= set(LAYERS)


def test_imports_go_down_the_layers_only():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if target == "skinlesion":  # __version__
                continue
            a, b = unit(module), unit(target)
            if a != b and LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{module} -> {target}")
            if a == b == "commands" and module != target:
                wrong.append(f"{module} -> {target} (a command importing another)")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_wrong_import(monkeypatch):
    """The rule bites: a decision module importing a command is reported."""
    import sys

    fake = {"skinlesion.decision.chain": {"skinlesion.commands.evaluate"}, "skinlesion.commands.evaluate": set()}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: fake)
    try:
        test_imports_go_down_the_layers_only()
    except AssertionError as e:
        assert "skinlesion.decision.chain -> skinlesion.commands.evaluate" in str(e)
    else:
        raise AssertionError("a decision module importing a command passed the layer check")


def test_no_function_is_longer_than_80_lines():
    """Small functions with one job each (nested functions count towards the one that holds them)."""
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
