"""The import direction of DESIGN.md, at module level and inside functions, and no import cycles.

    loomwatch (the CLI) -> training, app, tracking, models
    training            -> tracking, models
    app                 -> tracking, models
    tracking            -> models          (the one owner of the MLflow store and model URIs)
    models              -> none of them, nor MLflow or the web stack

The imports are read with `ast` (nothing is imported), relative imports resolved, and the graph of
the project's modules must have no cycle. The same checker runs on a planted tree in `tmp_path`,
which shows that an upward import and a cycle do fail it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, frozenset[str]] = {
    "loomwatch": frozenset({"training", "app", "tracking", "models"}),
    "training": frozenset({"tracking", "models"}),
    "app": frozenset({"tracking", "models"}),
    "tracking": frozenset({"models"}),
    "models": frozenset(),
}
WEB = frozenset({"fastapi", "starlette", "uvicorn"})
FORBIDDEN_LIBRARIES: dict[str, frozenset[str]] = {
    "models": WEB | {"mlflow"},
    "tracking": WEB,
    "training": WEB,
    "app": frozenset({"mlflow"}),  # the store is reached through `tracking`
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # a module of the project (dotted), or the top-level name of a library
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at module level"
        return f"{self.source}:{self.line} imports {self.target} ({where})"


def project_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `packages` under `root`."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of `name` that is a project module; else the library's top name."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return parts[0]


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.depth = 0  # > 0 inside a function body
        self.found: list[Import] = []

    def _add(self, name: str, node: ast.stmt) -> None:
        target = _resolve(name, self.modules)
        self.found.append(Import(self.module, target, node.lineno, self.depth > 0))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, node.module] if node.module else base)
        else:
            prefix = node.module or ""
        for alias in node.names:  # `from pkg import module` imports the module
            name = f"{prefix}.{alias.name}"
            self._add(name if name in self.modules else prefix, node)


def project_imports(root: Path, packages: tuple[str, ...]) -> list[Import]:
    modules = project_modules(root, packages)
    found: list[Import] = []
    for module, path in modules.items():
        collector = _ImportCollector(module, path.name == "__init__.py", modules)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        found += collector.found
    return found


def direction_violations(
    root: Path,
    allowed: dict[str, frozenset[str]] = ALLOWED,
    forbidden: dict[str, frozenset[str]] = FORBIDDEN_LIBRARIES,
) -> list[str]:
    """Every import, anywhere in a module, against `allowed` or of a forbidden library."""
    problems = []
    for found in project_imports(root, tuple(allowed)):
        layer, target = found.source.split(".")[0], found.target.split(".")[0]
        if target in allowed and target != layer and target not in allowed[layer]:
            problems.append(f"{found}: {layer} may not import {target}")
        elif target in forbidden.get(layer, frozenset()):
            problems.append(f"{found}: {layer} may not use {target}")
    return problems


def import_cycle(root: Path, packages: tuple[str, ...] = tuple(ALLOWED)) -> list[str] | None:
    """One cycle in the graph of the project's modules (function-level imports count), or None."""
    graph: dict[str, set[str]] = {}
    for found in project_imports(root, packages):
        graph.setdefault(found.source, set())
        if found.target.split(".")[0] in packages and found.target != found.source:
            graph[found.source].add(found.target)
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        cycle: list[str] = exc.args[1]
        return cycle
    return None


# ---- the project ------------------------------------------------------------------------------


def test_imports_follow_the_design_direction_at_module_level_and_in_functions() -> None:
    assert direction_violations(ROOT) == []


def test_the_project_has_no_import_cycle() -> None:
    assert import_cycle(ROOT) is None


def test_the_scan_sees_imports_inside_functions_and_relative_ones() -> None:
    found = project_imports(ROOT, tuple(ALLOWED))
    edges = {(i.source, i.target, i.in_function) for i in found}
    assert ("loomwatch.cli", "app.server", True) in edges  # serve imports the app when it runs
    assert ("app.model", "tracking.uris", False) in edges
    assert any(i.source.startswith("training.") and i.target == "models.bundle" for i in found)


# ---- the checker fails on a planted tree ------------------------------------------------------


def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ALLOWED:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


CLEAN = {
    "models/core.py": "import numpy\n",
    "tracking/uris.py": "from models import core\n",
    "training/train.py": "from models.core import numpy\nfrom .helpers import x\n",
    "training/helpers.py": "x = 1\n",
    "app/main.py": "import tracking.uris\n",
    "loomwatch/cli.py": "def serve():\n    from app import main\n",
}


def test_a_clean_planted_tree_passes(tmp_path: Path) -> None:
    root = plant(tmp_path, CLEAN)
    assert direction_violations(root) == []
    assert import_cycle(root) is None


def test_an_upward_import_fails_at_module_level_and_inside_a_function(tmp_path: Path) -> None:
    root = plant(
        tmp_path,
        CLEAN
        | {
            "models/core.py": "import numpy\n\n\ndef fit():\n    from training.train import x\n",
            "app/main.py": "import tracking.uris\nfrom training import helpers\n",
            "tracking/uris.py": "from ..app import main\n",  # relative, but upward all the same
        },
    )
    problems = direction_violations(root)
    assert len(problems) == 3, problems
    assert any("models.core:5 imports training.train (inside a function)" in p for p in problems)
    assert any("app.main:2 imports training.helpers (at module level)" in p for p in problems)
    assert any("tracking.uris:1 imports app.main" in p for p in problems)


def test_a_forbidden_library_fails(tmp_path: Path) -> None:
    root = plant(tmp_path, CLEAN | {"models/core.py": "def log():\n    import mlflow\n"})
    assert direction_violations(root) == [
        "models.core:2 imports mlflow (inside a function): models may not use mlflow"
    ]


def test_a_cycle_fails_even_through_a_function_level_relative_import(tmp_path: Path) -> None:
    root = plant(
        tmp_path,
        CLEAN | {"training/helpers.py": "def later():\n    from . import train\n"},
    )
    assert direction_violations(root) == []  # within one package: only the cycle is wrong
    cycle = import_cycle(root)
    assert cycle is not None and set(cycle) == {"training.train", "training.helpers"}
