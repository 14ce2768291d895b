"""The MLflow tracking store: where it is, how to reach it, and its errors.

By default the store is embedded and needs no server: a SQLite database ``mlflow.db`` and an
artifact folder ``mlruns/`` in the current (project) directory, MLflow's own default names, so
``mlflow ui`` started in the same directory shows every run. ``MLFLOW_TRACKING_URI`` (and the
other ``MLFLOW_*`` variables, e.g. ``MLFLOW_REGISTRY_URI``, ``MLFLOW_EXPERIMENT_NAME``,
``MLFLOW_TRACKING_TOKEN``) point the same commands at a tracking server instead.

MLflow itself is imported only by the functions that talk to the store, so that the errors here
can be caught (by the CLI, by the service) without importing it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException

DEFAULT_DB = "mlflow.db"
DEFAULT_EXPERIMENT = "loomwatch"


class ModelUriError(ValueError):
    """The URI names nothing loadable; the message says why in one line."""


class TrackingError(RuntimeError):
    """MLflow could not do what was asked (unreachable server, unknown registered model...)."""


def tracking_uri() -> str:
    """The tracking store to use: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    With a SQLite store, artifacts go beside the database (see :func:`artifact_location`).
    """
    configured = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if configured:
        return configured
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).as_posix()}"


def require_mlflow() -> None:
    """TrackingError naming the extra to install when MLflow is not (a slim serving install)."""
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError(
            "MLflow is not installed (the tracking store and models:/, runs:/ URIs need it): "
            "pip install 'loomwatch[tracking]'"
        )


def use_tracking_store(*, progress: bool = False) -> str:
    """Point MLflow at :func:`tracking_uri`, fail fast when a server is unreachable, return it."""
    require_mlflow()
    import mlflow

    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not progress:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails in seconds, not after MLflow's retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered; MLflow reports any real problem itself
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or change "
            "MLFLOW_TRACKING_URI"
        ) from None


def mlflow_message(exc: MlflowException) -> str:
    """The first line of an MLflow error's message."""
    text = str(exc.message).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def mlflow_errors(doing: str) -> Iterator[None]:
    """Turn MLflow's exceptions into one-line :class:`TrackingError` s."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise TrackingError(f"{doing}: {mlflow_message(exc)}") from None


def artifact_location(uri: str, experiment: str) -> str | None:
    """With a SQLite store, artifacts live beside the database: ``<db folder>/mlruns/<name>``.

    (MLflow would otherwise put them under the current directory, wherever that is.) Other
    stores decide for themselves: a server uses its ``--artifacts-destination``.
    """
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(unquote(uri.removeprefix("sqlite:///")))
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (database.parent / "mlruns" / folder).resolve().as_uri()


def experiment_id(name: str | None = None) -> str:
    """The experiment runs go to (``MLFLOW_EXPERIMENT_NAME`` or "loomwatch"), made if missing."""
    import mlflow

    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    with mlflow_errors(f"MLflow experiment '{name}'"):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            location = artifact_location(mlflow.get_tracking_uri(), name)
            return mlflow.create_experiment(name, artifact_location=location)
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment '{name}' is deleted; restore it or rename it")
        return str(experiment.experiment_id)
