"""The package's shape: stages stay thin and independent, no import cycles, no long functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mixprec"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every mixprec module a file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "mixprec" or m.startswith("mixprec.")}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
STAGES = {m for m in MODULES if m.startswith("mixprec.stages.") and m != "mixprec.stages"}


def _stage_imports(module: str) -> set[str]:
    return {m for m in _imports(MODULES[module]) if m in STAGES}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage):
    assert _stage_imports(stage) - {stage} == set()


def test_report_and_sweep_callbacks_import_no_stage():
    users = [m for m in MODULES if m.startswith("mixprec.report") or m == "mixprec.sweep_callbacks"]
    assert users
    assert {m: sorted(_stage_imports(m)) for m in users if _stage_imports(m)} == {}


def test_no_import_cycle():
    """Module-level and deferred imports alike: a deferred import that closes a cycle is still a cycle."""
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # a package's __init__ is imported with each of its modules: an edge to it is not a cycle by itself
    graph = {m: {i for i in deps if not (m.startswith(i + ".") and MODULES[i].name == "__init__.py")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def _is_triton_kernel(fn: ast.AST) -> bool:
    return any("triton" in ast.unparse(d) for d in getattr(fn, "decorator_list", []))


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` for every function over ``limit`` lines, outside Triton kernels
    and benchmarks/."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("benchmarks", ".venv", "outputs", ".wt") or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines():
    assert long_functions() == []


if __name__ == "__main__":  # python tests/test_structure.py: the list, for a clean-up
    print("\n".join(long_functions()) or "no function over 80 lines")
