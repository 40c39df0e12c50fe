"""The package's shape: layers and process roles, no import cycle, no reaching into privates.

Read from the source with `ast`, so every import counts: at module level,
inside functions and under `TYPE_CHECKING`. docs/architecture.md draws the
same layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "protobase"

#: (module name prefix, rank): a module may import only modules of its own folder or of a lower rank.
LAYERS = [
    ("protobase.errors", 0),
    ("protobase.keyorder", 0),
    ("protobase.settings", 0),
    ("protobase.native", 0),
    ("protobase.collector", 0),
    ("protobase.shm", 1),
    ("protobase.query", 2),
    ("protobase.core", 3),
    ("protobase.wire", 4),
    ("protobase.persistence", 5),
    ("protobase.coordinator", 6),
    ("protobase.client", 6),
    ("protobase.database", 7),
    ("protobase.cli", 8),
    ("protobase.__main__", 8),
    ("protobase", 8),
]
#: Process roles that share a rank but must never import each other.
APART = {("protobase.client", "protobase.coordinator"), ("protobase.coordinator", "protobase.client")}
#: Private names of the standard library or of namedtuples that callers are meant to use.
STDLIB_PRIVATES = {
    "_exit",
    "_getframe",
    "_asdict",
    "_replace",
    "_fields",
    "_make",
    "_current_frames",
    "_hash",  # collections.abc.Set._hash: the documented way to hash a Set
    "_inheriting",
}  # multiprocessing's flag of a spawned child importing its parent's main
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = modules()


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def imported(name: str, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """(module, line) for every protobase module `name` imports, wherever the import statement is."""
    package = name if is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _with_parents(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield from _with_parents(source, node.lineno)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    yield f"{source}.{alias.name}", node.lineno


def _with_parents(source: str, line: int) -> Iterator[tuple[str, int]]:
    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
    parts = source.split(".")
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            yield candidate, line


def edges() -> dict[str, set[str]]:
    """{module -> the modules it imports}, leaving out the packages that contain it (already running)."""
    graph: dict[str, set[str]] = {}
    for name, tree in MODULES.items():
        containing = {".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 1)}
        graph[name] = {target for target, _ in imported(name, tree) if target != name and target not in containing}
    return graph


def layer_of(name: str) -> tuple[str, int]:
    for prefix, rank in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"module {name} belongs to no layer: add it to LAYERS and to docs/architecture.md")


def test_every_module_belongs_to_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_point_downward_only():
    wrong = []
    for name, tree in MODULES.items():
        folder, rank = layer_of(name)
        containing = {".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 1)}
        for target, line in imported(name, tree):
            if target == name or target in containing:
                continue
            target_folder, target_rank = layer_of(target)
            if target_rank > rank or (folder, target_folder) in APART:
                wrong.append(f"{name}:{line} imports {target} (rank {rank} -> {target_rank})")
    assert not wrong, "imports that point upward or across process roles:\n" + "\n".join(wrong)


def test_there_is_no_import_cycle():
    graph = edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_importing_protobase_loads_neither_the_coordinator_nor_the_persistence_process():
    code = (
        "import sys, protobase; print(sorted(m for m in sys.modules "
        "if m.split('.')[1:2] in (['coordinator'], ['persistence'], ['cli'])))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    ).stdout
    assert loaded.strip() == "[]"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and not (name.endswith("_") and len(name) > 2)


def defined_privates(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, attributes it assigns, slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)  # dataclasses.replace(x, _field=...), a namedtuple's fields
        elif isinstance(node, ast.Assign) and any(getattr(name, "id", None) == "__slots__" for name in node.targets):
            names.update(item.value for item in ast.walk(node.value) if isinstance(item, ast.Constant))
    return {name for name in names if isinstance(name, str) and is_private(name)}


def private_uses(node: ast.AST) -> Iterator[tuple[str, str]]:
    """(name, how) for a use of a private attribute on something other than self or cls."""
    if isinstance(node, ast.Attribute) and is_private(node.attr):
        if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            yield node.attr, ast.unparse(node)
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and is_private(node.args[1].value)
        and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))
    ):
        yield node.args[1].value, ast.unparse(node)


def test_no_module_uses_another_modules_private_names():
    wrong = []
    for name, tree in MODULES.items():
        own = defined_privates(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                wrong += [
                    f"{name}:{node.lineno} imports {alias.name} from {node.module}"
                    for alias in node.names
                    if is_private(alias.name)
                ]
            else:
                wrong += [
                    f"{name}:{node.lineno} uses {how}"
                    for attribute, how in private_uses(node)
                    if attribute not in own and attribute not in STDLIB_PRIVATES
                ]
    assert not wrong, "private names used outside the module that owns them:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_a_docstring(name):
    assert ast.get_docstring(MODULES[name]), f"{name} has no module docstring"


def test_no_function_is_over_sixty_lines():
    long = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "functions over 60 lines (split them):\n" + "\n".join(long)
