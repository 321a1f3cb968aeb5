"""The import rules of docs/architecture.md, read from the source: one direction between the
top-level folders and between the rooms of `core/`, and no import circle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "models", "data_prep", "bench")
ENTRY_POINTS = ("train", "infer", "ensemble", "cv_split")
CORE_STAGES = ("data", "train", "infer", "blend")
# What each room of core/ may import besides itself and the ground (core/*.py).
CORE_STAGE_USES = {"data": set(), "blend": set(), "train": {"data", "blend"}, "infer": {"data", "blend"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / f"{e}.py" for e in ENTRY_POINTS]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return {module_name(f): f for f in files}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body (a lazy import inside a function
    counts: it is a dependency all the same), leaving out imports only a type checker sees."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from core.data import clips` names the module core.data.clips; `from core.io import x`
            # names core.io
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if _type_checking_only(node, parents):
            continue
        for name in names:
            while name and name not in modules:  # the longest project module the name points into
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def _core_room(module: str) -> str:
    """`data`, `train`, `infer` or `blend` for a module in those rooms; `ground` otherwise."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in CORE_STAGES else "ground"


def test_the_top_level_folders_import_one_way(graph):
    allowed = {"core": {"core"}, "data_prep": {"core", "data_prep"}, "models": {"core", "data_prep", "models"}}
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        for d in deps
        if _top(m) in allowed and _top(d) not in allowed[_top(m)]
    ]
    assert not wrong, wrong


def test_the_rooms_of_core_import_one_way(graph):
    wrong = []
    for m, deps in graph.items():
        if _top(m) != "core" or m == "core":
            continue
        room = _core_room(m)
        for d in deps:
            if d == "core" or d.count(".") == 1 and d.split(".")[1] in CORE_STAGES:
                continue  # a package's own __init__ holds no code
            target = _core_room(d)
            ok = target == "ground" if room == "ground" else target in {"ground", room} | CORE_STAGE_USES[room]
            if not ok:
                wrong.append(f"{m} ({room}) imports {d} ({target})")
    assert not wrong, wrong


def test_no_import_circle(graph):
    circles = set()

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in on_path:
                cycle = path[path.index(dep) :]
                circles.add(" -> ".join(cycle + [dep]))
            elif dep not in done:
                on_path.add(dep)
                visit(dep, path + [dep], on_path, done)
                on_path.discard(dep)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    assert not circles, sorted(circles)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The rules above read real imports: a ground module importing a stage is found."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from core.infer import scoring\n    return scoring\n")
    modules = project_modules()
    assert imports_of(module, modules) == {"core.infer.scoring"}
    assert _core_room("core.infer.scoring") == "infer" and _core_room("core.io") == "ground"
