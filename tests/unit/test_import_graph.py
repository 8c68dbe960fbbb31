"""The import graph keeps the design: no cycles in the engine, no private names across modules, a torch-free
API, and an engine that knows nothing of HTTP, Celery or the database. Read from the source with ast, so
imports inside functions (which hide cycles from a plain `import`) count too."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "torchao", "numpy", "onnx", "onnxruntime", "transformers", "llmcompressor", "safetensors"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (for `from m import name`: m.name when that is a module, else m)
    names: tuple[str, ...]  # names taken from the target (empty for `import m`)
    top_level: bool  # runs when the module is imported (not inside a function, not under TYPE_CHECKING)
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path, known: set[str]) -> list[Import]:
    """Every import statement of one file, resolved against the modules in `known`."""
    source = module_name(path, root)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for item in child.body:
                    visit(ast.Module(body=[item], type_ignores=[]), False)
                for item in child.orelse:
                    visit(ast.Module(body=[item], type_ignores=[]), top_level)
            elif isinstance(child, ast.Import):
                found.extend(Import(source, alias.name, (), top_level, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                plain = tuple(a.name for a in child.names if f"{base}.{a.name}" not in known)
                for alias in child.names:
                    if f"{base}.{alias.name}" in known:
                        found.append(Import(source, f"{base}.{alias.name}", (), top_level, child.lineno))
                if plain:
                    found.append(Import(source, base, plain, top_level, child.lineno))
            else:
                visit(child, top_level)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def project_imports(root: Path = ROOT, packages: tuple[str, ...] = ("app", "worker")) -> dict[str, list[Import]]:
    files = [p for package in packages for p in sorted((root / package).rglob("*.py"))]
    known = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, root, known) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def engine_cycle(imports: dict[str, list[Import]]) -> list[str] | None:
    engine = {m for m in imports if m.startswith("worker.engine")}
    graph = {m: {i.target for i in imports[m] if i.target in engine and i.target != m} for m in engine}
    return find_cycle(graph)


def private_imports(imports: dict[str, list[Import]]) -> list[str]:
    return [f"{i.source}:{i.line} takes {name} from {i.target}"
            for found in imports.values() for i in found if i.target in imports
            for name in i.names if name.startswith("_") and not name.startswith("__")]


def top_level_closure(imports: dict[str, list[Import]], start: set[str]) -> dict[str, str]:
    """Every module reached from `start` by imports that run at import time: {module: who imported it}."""
    reached = {m: "" for m in start}
    todo = list(start)
    while todo:
        current = todo.pop()
        for i in imports.get(current, ()):
            if not i.top_level:
                continue
            # importing a.b.c runs a and a.b first
            for depth in range(1, i.target.count(".") + 2):
                target = ".".join(i.target.split(".")[:depth])
                if target not in reached:
                    reached[target] = current
                    if target in imports:
                        todo.append(target)
    return reached


@pytest.fixture(scope="module")
def imports() -> dict[str, list[Import]]:
    return project_imports()


def test_engine_has_no_import_cycle(imports: dict[str, list[Import]]) -> None:
    assert engine_cycle(imports) is None, " -> ".join(engine_cycle(imports) or [])


def test_a_cycle_added_to_the_engine_is_caught(imports: dict[str, list[Import]]) -> None:
    cyclic = dict(imports)
    cyclic["worker.engine.onnx.common"] = [*imports["worker.engine.onnx.common"],
                                           Import("worker.engine.onnx.common", "worker.engine.onnx.dynamic", (),
                                                  False, 0)]
    cycle = engine_cycle(cyclic)
    assert cycle is not None and "worker.engine.onnx.dynamic" in cycle and "worker.engine.onnx.common" in cycle


def test_no_private_name_is_imported_across_modules(imports: dict[str, list[Import]]) -> None:
    assert private_imports(imports) == []


def test_the_api_imports_nothing_that_imports_heavy_libraries(imports: dict[str, list[Import]]) -> None:
    app_modules = {m for m in imports if m == "app" or m.startswith("app.")}
    reached = top_level_closure(imports, app_modules)
    heavy = {m: by for m, by in reached.items() if m.split(".")[0] in HEAVY}
    assert heavy == {}, f"imported at API start-up (module: by whom): {heavy}"


def test_the_engine_imports_nothing_from_the_service(imports: dict[str, list[Import]]) -> None:
    forbidden = ("app", "celery", "kombu", "sqlalchemy", "fastapi", "starlette", "alembic")
    found = [f"{i.source}:{i.line} imports {i.target}" for m, found in imports.items()
             if m.startswith("worker.engine") for i in found if i.target.split(".")[0] in forbidden]
    assert found == []


def test_handlers_are_found_from_their_format_and_method() -> None:
    from worker.engine.registry import SPECS

    for (fmt, method), spec in SPECS.items():
        assert spec.handler == f"worker.engine.{fmt.value}.{method.value}:run"
