"""The MLflow model registry: registered versions, their tags, and aliases.

A registered version is made from a logged model (``runs:/<run id>/model``) and carries the
``loomwatch.*`` tags of :data:`VERSION_TAGS` copied from its run, so the registry alone says what
each version is and what it was trained on. Callers point MLflow at the store first
(:func:`tracking.store.use_tracking_store`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tracking.store import TrackingError, mlflow_message

log = logging.getLogger(__name__)

TAG = "loomwatch."  # prefix of our run and model-version tags
VERSION_TAGS = (
    "model_type", "fabric", "data_fingerprint", "validation_fingerprint", "git_commit",
    "export.format", "export.precision", "export.source_uri",  # a version made by an export
    "calibration.source_uri", "calibration.evidence",  # by `loomwatch calibrate`
)  # fmt: skip


def version_tags(run_tags: Mapping[str, str]) -> dict[str, str]:
    """The run tags a registered version keeps (those of :data:`VERSION_TAGS` the run has)."""
    return {
        f"{TAG}{key}": run_tags[f"{TAG}{key}"] for key in VERSION_TAGS if f"{TAG}{key}" in run_tags
    }


def register_version(
    model_uri: str,
    name: str,
    alias: str | None,
    tags: Mapping[str, str],
    description: str | None = None,
) -> ModelVersion:
    """A new version of `name` from a logged model, its description, then the alias; all or
    nothing."""
    version = mlflow.register_model(model_uri, name, tags=dict(tags))
    try:
        if description:
            client = mlflow.MlflowClient()
            version = client.update_model_version(name, version.version, description=description)
        if alias:
            set_alias(name, alias, str(version.version))
    except BaseException:
        _forget(version)
        raise
    return version


def _forget(version: ModelVersion) -> None:
    try:
        mlflow.MlflowClient().delete_model_version(version.name, version.version)
    except MlflowException as exc:  # pragma: no cover - the store just failed us once
        log.warning("could not remove half-registered version: %s", mlflow_message(exc))


def newest_version(name: str) -> ModelVersion:
    """The highest version of registered model `name` (MLflow errors when `name` is unknown)."""
    client = mlflow.MlflowClient()
    client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise TrackingError(f"registered model '{name}' has no versions")
    return max(versions, key=lambda v: int(v.version))


def alias_version(name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None when `name` has no such alias."""
    client = mlflow.MlflowClient()
    aliases = client.get_registered_model(name).aliases or {}
    version = aliases.get(alias)
    return client.get_model_version(name, str(version)) if version is not None else None


def set_alias(name: str, alias: str, version: str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def tag_version(name: str, version: str, tags: Mapping[str, str]) -> None:
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
