"""Model URIs: where a bundle comes from.

Accepted: a local bundle folder. (MLflow URIs — ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN_ID/PATH`` — are resolved by the MLflow integration.)
"""

from __future__ import annotations

from pathlib import Path


class ModelUriError(ValueError):
    """The URI names nothing loadable; the message says why in one line."""


def resolve_model_uri(uri: str) -> Path:
    """Return a local bundle folder for `uri`."""
    path = Path(uri).expanduser()
    if path.is_dir():
        return path
    if uri.startswith(("models:/", "runs:/")):
        raise ModelUriError(f"{uri}: MLflow model URIs are not supported yet; pass a bundle folder")
    raise ModelUriError(f"model {uri}: no such bundle folder")
