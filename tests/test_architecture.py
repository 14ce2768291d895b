"""The import direction of DESIGN.md: app -> models, training -> models; models imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str, module_level_only: bool = False) -> dict[str, set[str]]:
    """Top-level names each module of `package` imports (anywhere, or only at module level)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_models_imports_neither_training_app_fastapi_nor_mlflow() -> None:
    for path, names in imported_roots("models").items():
        assert not names & {"training", "app", "fastapi", "mlflow", "starlette"}, path


def test_app_never_imports_training_at_request_time() -> None:
    # Only start-up code (inside functions, e.g. resolving an MLflow model URI) may use training.
    for path, names in imported_roots("app", module_level_only=True).items():
        assert "training" not in names, path


def test_the_scan_sees_imports() -> None:
    scanned = imported_roots("training")
    assert any("models" in names for names in scanned.values())
