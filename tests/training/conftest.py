"""Every training test tracks into its own MLflow store, never the project's ``mlflow.db``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite tracking store (artifacts beside it) and a model cache in a temporary folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder.as_posix()}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("LOOMWATCH_MODEL_CACHE", str(folder / "model-cache"))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield uri
