"""The import direction of DESIGN.md: app -> models, training -> models; models imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_models_imports_neither_training_app_fastapi_nor_mlflow() -> None:
    for path, names in imported_roots("models").items():
        assert not names & {"training", "app", "fastapi", "mlflow", "starlette"}, path


def test_app_never_imports_training() -> None:
    for path, names in imported_roots("app").items():
        assert "training" not in names, path


def test_the_scan_sees_imports() -> None:
    scanned = imported_roots("training")
    assert any("models" in names for names in scanned.values())
