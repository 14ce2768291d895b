"""The manifest every model folder carries, readable without PyTorch.

A PyTorch bundle (:mod:`models.bundle`) and an exported model folder (:mod:`models.export`)
share it: format version, model type, full config, pipeline settings, calibration, suppression
settings, training-data fingerprint, metrics and library versions. An exported folder adds
``export``: which runtime format, which precision, which network file and which source bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.baseline import ColumnBaseline
from models.calibration import Calibration
from models.isolation import IsolatedPeak
from models.preprocessing import ValidAreaSettings

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle could not be written or read; the message names the file and the reason."""


ImageLevel = Literal["none", "median"]


class PipelineConfig(BaseModel):
    """How images are cut, scored and post-processed around the model."""

    model_config = ConfigDict(extra="forbid")

    tile_size: int = Field(default=256, ge=32)
    stride: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    train_min_valid_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    valid_area: ValidAreaSettings = Field(default_factory=ValidAreaSettings)
    learn_column_baseline: bool = Field(
        default=False,
        description="training learns each column's defect-free map level from the training"
        " images' maps (models/baseline.py), which every later analysis of an image that wide"
        " subtracts; off: measured worse on AITEX fabrics 03 and 06 (docs/fleets.md), and"
        " PatchCore's and the VAE's maps of their own training images sit below new images'",
    )
    column_baseline_window: int = Field(
        default=65, ge=1, description="columns the learned level is widened and smoothed over"
    )
    column_baseline: ColumnBaseline | None = None
    learn_isolated_peak: bool = Field(
        default=True,
        description="training learns the image score's and the peak gap's mean and spread on"
        " the defect-free strips the model was fitted on (models/isolation.py), and every later"
        " analysis scores a strip by the larger of the two standardised: a faint defect that"
        " stands alone on a quiet map counts as much as a high spot; learned only for models"
        " whose maps of their own training strips look like new strips' (DRAEM)",
    )
    isolated_peak_pool: int = Field(default=5, ge=1, description="pixels the map is averaged over")
    isolated_peak_radius: int = Field(
        default=63, ge=1, description="pixels apart two local maxima must be"
    )
    isolated_peak_rank: int = Field(
        default=20, ge=1, description="the highest maximum is compared with the rank-th"
    )
    isolated_peak: IsolatedPeak | None = None
    image_level: ImageLevel = Field(
        default="median",
        description="median: every analysis subtracts the image's own median map value on"
        " fabric from its map and tile scores, so a strip's score says how far its worst spot"
        " stands above the rest of that strip, not above a level that drifts from strip to"
        ' strip (docs/fleets.md, "The image\'s own level"); none: the map as the model gave'
        " it (bundles written before the setting existed read as none)",
    )


# Bumped whenever the Python pipeline around a network (inputs, outputs, what the graph holds)
# changes: an exported network made for another pipeline version is refused, not run.
PIPELINE_VERSION = 1


class ExportInfo(BaseModel):
    """What an exported model folder holds instead of PyTorch weights."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["onnx", "openvino"]
    precision: Literal["fp32", "int8"]
    files: dict[str, str] = Field(description="network file name -> sha256 of its bytes")
    network: str = Field(description="the file a runtime opens (model.onnx, model.xml)")
    pipeline_version: int
    source_uri: str
    source_digest: str = Field(description="sha256 of the source bundle's weights")
    opset: int | None = None
    calibration_images: int | None = Field(default=None, description="int8: images used")
    calibration_tiles: int | None = Field(default=None, description="int8: tiles used")
    calibration_synthetic: int | None = Field(
        default=None, description="int8: of those, tiles given a synthetic defect"
    )
    versions: dict[str, str] = Field(default_factory=dict)


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
    export: ExportInfo | None = None
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


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
    pipeline = raw.get("pipeline")
    if isinstance(pipeline, dict) and "image_level" not in pipeline:
        # written before the setting existed: calibrated on maps without the level subtracted
        raw = {**raw, "pipeline": {**pipeline, "image_level": "none"}}
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BundleError(f"{path}: invalid field '{where}': {first['msg']}") from None


def model_files(directory: Path | str, manifest: Manifest) -> list[str]:
    """The files that make the model, besides the manifest: weights, or the exported network."""
    if manifest.export is None:
        return ["weights.safetensors"]
    return sorted(manifest.export.files)


def folder_digest(directory: Path | str) -> str:
    """``sha256:`` and 12 hex digits over the manifest and the model's files, in that order."""
    folder = Path(directory)
    sha = hashlib.sha256()
    for name in (MANIFEST, *model_files(folder, read_manifest(folder))):
        with open(folder / name, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                sha.update(block)
    return "sha256:" + sha.hexdigest()[:12]


def weights_digest(directory: Path | str) -> str:
    """``sha256:`` and 12 hex digits over the model's files (not the manifest) and, when the
    pipeline measures maps above each image's own level or scores strips by their isolated
    peak, those settings: the same for every calibration of the same weights on the same scale,
    so raw scores with one digest are comparable (feedback recorded before ``calibrate
    --image-level`` changed the scale does not mix with scores after it). Models without either
    keep the digest of their files alone."""
    folder = Path(directory)
    manifest = read_manifest(folder)
    sha = hashlib.sha256()
    for name in model_files(folder, manifest):
        sha.update(file_sha256(folder / name).encode())
    if manifest.pipeline.image_level != "none":
        sha.update(f"image_level={manifest.pipeline.image_level}".encode())
    if manifest.pipeline.isolated_peak is not None:
        sha.update(f"isolated_peak={manifest.pipeline.isolated_peak.model_dump_json()}".encode())
    return "sha256:" + sha.hexdigest()[:12]


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder ``staging`` to ``target``, replacing what is there: the old
    folder is moved aside first, so ``target`` is never half-written."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
