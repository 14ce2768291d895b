"""The model bundle: a folder with ``manifest.json`` and ``weights.safetensors``.

The manifest holds everything needed to rebuild and run the model (format version, model type,
full config, pipeline/preprocessing settings, calibration, training-data fingerprint, metrics,
library versions). Weights are tensors only (safetensors): loading never unpickles code.
Bundles are written to a temporary folder beside the target and renamed into place, so a
half-written bundle is never seen.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.base import AnomalyModel
from models.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    BundleError,
    Manifest,
    PipelineConfig,
    move_into_place,
    read_manifest,
)
from models.registry import UnknownModelError, model_class

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "BundleError",
    "Manifest",
    "PipelineConfig",
    "library_versions",
    "load_bundle",
    "read_manifest",
    "save_bundle",
]

WEIGHTS = "weights.safetensors"


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
        # host tensors in the plain layout, whatever device and layout the model runs in:
        # a bundle loads anywhere (load_bundle reads to the CPU; the runtime moves it)
        state = {
            key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()
        }
        save_file(state, str(staging / WEIGHTS), metadata={"model_type": model.model_type})
        text = json.dumps(manifest.model_dump(mode="json"), indent=2, allow_nan=False)
        (staging / MANIFEST).write_text(text + "\n")
        move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


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
