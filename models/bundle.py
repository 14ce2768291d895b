"""The model bundle: a folder with ``manifest.json`` and ``weights.safetensors``.

The manifest holds everything needed to rebuild and run the model (format version, model type,
full config, pipeline/preprocessing settings, calibration, training-data fingerprint, metrics,
library versions). Weights are tensors only (safetensors): loading never unpickles code.
Bundles are written to a temporary folder beside the target and renamed into place, so a
half-written bundle is never seen.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.base import AnomalyModel
from models.calibration import Calibration
from models.preprocessing import ValidAreaSettings
from models.registry import UnknownModelError, model_class

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class BundleError(RuntimeError):
    """A bundle could not be written or read; the message names the file and the reason."""


class PipelineConfig(BaseModel):
    """How images are cut, scored and post-processed around the model."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int = Field(default=256, ge=32)
    stride: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    train_min_valid_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    valid_area: ValidAreaSettings = Field(default_factory=ValidAreaSettings)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    model_type: str
    config: dict[str, Any]
    pipeline: PipelineConfig
    calibration: Calibration
    suppression: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions["numpy"] = np.__version__
    for package in ("loomwatch", "torchvision", "opencv-python-headless", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def save_bundle(directory: Path | str, model: AnomalyModel, manifest: Manifest) -> Path:
    """Write the bundle atomically; an existing bundle at `directory` is replaced."""
    target = Path(directory)
    if not manifest.versions:
        manifest.versions = library_versions()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS), metadata={"model_type": model.model_type})
        text = json.dumps(manifest.model_dump(mode="json"), indent=2, allow_nan=False)
        (staging / MANIFEST).write_text(text + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: Path | str) -> Manifest:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise BundleError(f"{directory}: not a bundle folder (no such directory)")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; this folder is not a Loomwatch bundle") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: format version {version!r} is not supported ({FORMAT_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BundleError(f"{path}: invalid field '{where}': {first['msg']}") from None


def load_bundle(directory: Path | str) -> tuple[AnomalyModel, Manifest]:
    """Rebuild the model from its manifest and load its tensors."""
    manifest = read_manifest(directory)
    manifest_path = Path(directory) / MANIFEST
    try:
        cls = model_class(manifest.model_type)
        config = cls.config_class.model_validate(manifest.config)
    except (UnknownModelError, ValidationError) as exc:
        raise BundleError(f"{manifest_path}: {str(exc).splitlines()[0]}") from None
    weights = Path(directory) / WEIGHTS
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise BundleError(f"{weights}: missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights}: not a valid safetensors file ({exc})") from None
    model = cls(config, load_weights=False)
    model.prepare_state(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights}: does not match the manifest's model ({exc})") from None
    return model.eval(), manifest
