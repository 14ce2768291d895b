"""Model URIs: where a bundle comes from.

Accepted everywhere a ``--model-uri`` is (evaluate, predict, serve):

* a local bundle folder (``manifest.json`` + ``weights.safetensors``), or a local MLflow model
  folder holding one under ``artifacts/bundle``;
* ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` (the MLflow model registry);
* ``runs:/RUN_ID/PATH`` (``runs:/<id>/model``, the logged model, or ``runs:/<id>/bundle``);
* ``models:/<logged model id>`` (``models:/m-...``).

MLflow URIs are downloaded through MLflow from the store :func:`tracking.store.tracking_uri`
names, into a local cache (``.loomwatch/model-cache`` in the current directory, or
``LOOMWATCH_MODEL_CACHE``), once per immutable target: an alias is first resolved to its version,
so moving the alias is seen at once while a version is downloaded only once.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from models.manifest import MANIFEST, BundleError, read_manifest
from tracking.store import (
    ModelUriError,
    TrackingError,
    mlflow_errors,
    tracking_uri,
    use_tracking_store,
)

MLMODEL = "MLmodel"
MLFLOW_SCHEMES = ("models:/", "runs:/")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

UriKind = Literal["local", "alias", "version", "logged", "run"]


@dataclass(frozen=True)
class ModelUri:
    """A parsed model URI. ``version`` may be ``latest`` until :func:`pin_model_uri` pins it."""

    kind: UriKind
    text: str
    name: str = ""  # registered model name, or the logged model id (kind "logged")
    alias: str = ""
    version: str = ""
    run_id: str = ""
    path: str = ""  # inside the run (kind "run")


def parse_model_uri(uri: str) -> ModelUri:
    """The grammar of model URIs, in one place; anything that is not MLflow is a local folder."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        if not run_id or not path.strip("/"):
            raise ModelUriError(f"{uri}: expected runs:/RUN_ID/PATH")
        return ModelUri("run", uri, run_id=run_id, path=path.strip("/"))
    if not uri.startswith("models:/"):
        return ModelUri("local", uri)
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if not name or not alias:
            raise ModelUriError(f"{uri}: expected models:/NAME@ALIAS")
        return ModelUri("alias", uri, name=name, alias=alias)
    name, slash, version = rest.rpartition("/")
    if not slash:  # models:/<logged model id>
        if not rest:
            raise ModelUriError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return ModelUri("logged", uri, name=rest)
    if version != "latest" and not version.isdigit():
        raise ModelUriError(f"{uri}: the version must be a number, 'latest', or use @ALIAS")
    return ModelUri("version", uri, name=name, version=version)


def resolve_model_uri(uri: str) -> Path:
    """Return a local bundle folder for `uri` (downloading and caching MLflow models)."""
    if uri.startswith(MLFLOW_SCHEMES):
        return _from_mlflow(uri)
    path = Path(uri).expanduser()
    if path.is_dir():
        return bundle_in(path)
    raise ModelUriError(
        f"model {uri}: no such bundle folder (or use models:/NAME@ALIAS, models:/NAME/VERSION, "
        "runs:/RUN_ID/PATH)"
    )


def bundle_in(folder: Path) -> Path:
    """The bundle in `folder`: the folder itself, or the ``bundle`` artifact of an MLflow model."""
    mlmodel = folder / MLMODEL
    if not mlmodel.is_file() or (folder / MANIFEST).exists():
        return folder
    try:
        spec = yaml.safe_load(mlmodel.read_text())
        relative = spec["flavors"]["python_function"]["artifacts"]["bundle"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise ModelUriError(f"{folder}: an MLflow model without a Loomwatch bundle") from None
    return folder / str(relative)


def name_and_version(uri: str, folder: Path, digest: str) -> tuple[str, str]:
    """Registry name/version from an MLflow URI when it says them; else the folder and digest."""
    parsed = parse_model_uri(uri)
    if parsed.kind == "version":
        return parsed.name, parsed.version
    if parsed.kind in ("alias", "logged"):  # an alias names no version by itself
        return parsed.name, digest
    if parsed.kind == "run":
        return f"run-{parsed.run_id}", digest
    return folder.resolve().name, digest


def cache_root() -> Path:
    configured = os.environ.get("LOOMWATCH_MODEL_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.cwd() / ".loomwatch/model-cache"


def pin_model_uri(uri: str) -> str:
    """The immutable form of an MLflow URI: ``models:/NAME@ALIAS`` -> ``models:/NAME/3``.

    Tells which registered version is behind an alias (e.g. the one being served); other URIs
    come back unchanged.
    """
    if not uri.startswith(MLFLOW_SCHEMES):
        return uri
    try:
        use_tracking_store()
        with mlflow_errors(uri):
            return _pin(uri)
    except TrackingError as exc:
        raise ModelUriError(str(exc)) from None


def _from_mlflow(uri: str) -> Path:
    pinned = pin_model_uri(uri)
    target = _cache_folder(tracking_uri(), pinned)
    if not (target.is_dir() and _complete(target)):
        try:
            with mlflow_errors(uri):
                _download(pinned, target)
        except TrackingError as exc:
            raise ModelUriError(str(exc)) from None
    return bundle_in(target)


def _pin(uri: str) -> str:
    """The immutable URI behind `uri`: an alias or ``latest`` becomes its version number."""
    import mlflow

    client = mlflow.MlflowClient()
    parsed = parse_model_uri(uri)
    if parsed.kind == "run":
        client.get_run(parsed.run_id)  # a clear "run not found" before any download
        return f"runs:/{parsed.run_id}/{parsed.path}"
    name, version = parsed.name, parsed.version
    if parsed.kind == "alias":
        version = client.get_model_version_by_alias(name, parsed.alias).version
        return f"models:/{name}/{version}"
    if parsed.kind == "logged":
        client.get_logged_model(name)
        return f"models:/{name}"
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ModelUriError(f"{uri}: registered model '{name}' has no versions")
        version = str(max(int(v.version) for v in versions))
    client.get_model_version(name, version)
    return f"models:/{name}/{version}"


def _cache_folder(store: str, pinned: str) -> Path:
    """One folder per (store, immutable URI); readable, and unique by a short hash."""
    digest = hashlib.sha256(f"{store}\n{pinned}".encode()).hexdigest()[:12]
    readable = _SAFE.sub("_", pinned.replace(":/", "-")).strip("_")[:80]
    return cache_root() / f"{readable}-{digest}"


def _complete(folder: Path) -> bool:
    try:
        read_manifest(bundle_in(folder))
    except (BundleError, ModelUriError):
        return False
    return True


def _download(pinned: str, target: Path) -> None:
    """Download into a temporary folder beside `target`, check it, then rename it into place."""
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        downloaded = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(staging))
        local = Path(downloaded)
        if local != staging:  # runs:/<id>/<path> lands in staging/<path>
            inner = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            shutil.rmtree(inner)
            os.replace(local, inner)
            shutil.rmtree(staging)
            staging = inner
        try:
            read_manifest(bundle_in(staging))
        except BundleError as exc:
            raise ModelUriError(f"{pinned} is not a Loomwatch model: {exc}") from None
        if target.exists():
            shutil.rmtree(target)  # an incomplete earlier download
        try:
            os.replace(staging, target)
        except OSError:
            if not _complete(target):  # a concurrent download won the race: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
