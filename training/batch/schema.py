"""The batch output: one row per image, the same columns whichever engine wrote it.

Rows are plain dicts built here (:func:`scored_row`, :func:`error_row`) and turned into Arrow
record batches with :data:`SCHEMA` by both engines, so the local engine and Spark write the same
values. The mask travels as COCO's uncompressed RLE (column-major runs, starting with background),
which ``pycocotools`` and most segmentation tools read; :func:`mask_to_rle` and
:func:`rle_to_mask` convert it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.pipeline import Prediction
from training.data import parse_aitex_name

# What makes two rows of an image the same result: resuming keeps rows that match the job's.
IDENTITY = ("model_digest", "backend", "precision")

# Folders of the AITEX layout whose name is a category, not a roll.
AITEX_CATEGORY_FOLDERS = frozenset({"defect_images", "nodefect_images", "mask_images"})

# (column, Arrow type, what it holds): docs/batch.md shows this table.
COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("path", pa.string(), "absolute path of the image file"),
    ("fabric", pa.string(), "AITEX fabric code from the name (nnnn_ddd_ff -> ff); null otherwise; "
     "the partition column"),
    ("roll", pa.string(), "the folder holding the image (an AITEX NoDefect_images/<roll>/ "
     "folder, or a mill's <roll>/ folder); null when that is the input folder itself or an "
     "AITEX category folder"),
    ("defect_code", pa.string(), "AITEX defect code from the name (000: defect-free); null "
     "otherwise"),
    ("file_bytes", pa.int64(), "size of the file"),
    ("width", pa.int32(), "image width in pixels"),
    ("height", pa.int32(), "image height in pixels"),
    ("decision", pa.string(), "anomalous or normal"),
    ("is_anomalous", pa.bool_(), "decision as a boolean"),
    ("decision_reason", pa.string(), "why, in words (as loomwatch predict prints it)"),
    ("score", pa.float64(), "normalised image score; 0.5 is the calibrated threshold"),
    ("raw_score", pa.float64(), "the model's raw image score"),
    ("threshold", pa.float64(), "normalised image threshold used (0.5)"),
    ("raw_threshold", pa.float64(), "the same threshold in raw score units"),
    ("n_regions", pa.int32(), "defect regions kept"),
    ("n_suppressed", pa.int32(), "regions suppressed by post-processing"),
    ("regions", pa.string(), "JSON list of kept regions: bbox, area, peak, mean"),
    ("suppressed", pa.string(), "JSON suppression log: settings in force, suppressed regions "
     "with their reason, vetoed_decision"),
    ("mask_rle", pa.string(), "JSON COCO uncompressed RLE of the kept-defect mask: "
     '{"size": [height, width], "counts": [...]}, column-major, first run background'),
    ("timings_ms", pa.string(), "JSON milliseconds per stage: read and the pipeline's decode, "
     "preprocess, tile, model, stitch, calibrate, postprocess, total"),
    ("total_ms", pa.float64(), "read + pipeline, milliseconds"),
    ("model_uri", pa.string(), "--model-uri as given"),
    ("model_name", pa.string(), "registered model name, or the bundle folder's name"),
    ("model_version", pa.string(), "registry version (an alias is pinned first), else the digest"),
    ("model_digest", pa.string(), "sha256 over the model folder's manifest and weights: what "
     "resuming compares"),
    ("model_type", pa.string(), "draem, vae or patchcore"),
    ("backend", pa.string(), "what ran the network: torch, onnxruntime, openvino"),
    ("device", pa.string(), "where it ran: cpu, cuda:0, ..."),
    ("precision", pa.string(), "its arithmetic: 32, bf16, 16-mixed"),
    ("engine", pa.string(), "local or spark"),
    ("scored_at", pa.timestamp("us", tz="UTC"), "when the row was made"),
    ("error", pa.string(), "null when scored; else why the image could not be scored"),
)  # fmt: skip

SCHEMA = pa.schema([pa.field(name, kind) for name, kind, _ in COLUMNS])
PARTITION_COLUMN = "fabric"


@dataclass(frozen=True)
class ImageFile:
    """An input file and what its name and folder say about it."""

    path: str
    fabric: str | None
    roll: str | None
    defect_code: str | None
    file_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """The model every row names."""

    uri: str
    name: str
    version: str
    digest: str
    type: str


def describe_file(path: Path, root: Path, size: int) -> ImageFile:
    """Fabric and defect code from an AITEX name, roll from the folder holding the file."""
    name = parse_aitex_name(path.stem)
    parent = path.parent
    roll = None
    if parent != root and parent.name.lower() not in AITEX_CATEGORY_FOLDERS:
        roll = parent.name
    return ImageFile(
        path=str(path),
        fabric=name.fabric if name else None,
        roll=roll,
        defect_code=name.defect if name else None,
        file_bytes=size,
    )


def mask_to_rle(mask: np.ndarray) -> dict[str, list[int]]:
    """COCO uncompressed RLE of a binary mask: run lengths in column-major order, the first run
    counting background (0 when the first pixel is set)."""
    height, width = mask.shape
    flat = (np.asarray(mask) > 0).ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(height), int(width)], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict[str, list[int]] | str) -> np.ndarray:
    """The uint8 mask (255 where set) of :func:`mask_to_rle`'s RLE, or its JSON text."""
    data = json.loads(rle) if isinstance(rle, str) else rle
    height, width = data["size"]
    values = np.zeros(len(data["counts"]), np.uint8)
    values[1::2] = 255
    flat = np.repeat(values, data["counts"])
    if flat.size != height * width:
        raise ValueError(f"RLE covers {flat.size} pixels, not {height}x{width}")
    return flat.reshape((height, width), order="F")


def _base_row(
    image: ImageFile, model: ModelInfo, engine: str, runtime: dict[str, str]
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SCHEMA.names)
    row.update(
        path=image.path,
        fabric=image.fabric,
        roll=image.roll,
        defect_code=image.defect_code,
        file_bytes=image.file_bytes,
        model_uri=model.uri,
        model_name=model.name,
        model_version=model.version,
        model_digest=model.digest,
        model_type=model.type,
        backend=runtime["backend"],
        device=runtime["device"],
        precision=runtime["precision"],
        engine=engine,
        scored_at=datetime.now(UTC),
    )
    return row


def scored_row(
    image: ImageFile,
    prediction: Prediction,
    read_seconds: float,
    model: ModelInfo,
    engine: str,
    runtime: dict[str, str],
) -> dict[str, Any]:
    """The row of an image the pipeline scored, with the values ``loomwatch predict`` writes."""
    summary = prediction.summary()
    height, width = prediction.analysis.image.shape
    timings = {"read": round(read_seconds * 1000.0, 3)}
    timings |= {stage: round(s * 1000.0, 3) for stage, s in prediction.timings.items()}
    row = _base_row(image, model, engine, runtime)
    row.update(
        width=int(width),
        height=int(height),
        decision=summary["decision"],
        is_anomalous=bool(prediction.decision),
        decision_reason=prediction.verdict.reason,
        score=float(prediction.score),
        raw_score=float(prediction.raw_score),
        threshold=float(prediction.threshold),
        raw_threshold=float(prediction.raw_threshold),
        n_regions=len(prediction.post.kept),
        n_suppressed=len(prediction.post.suppressed),
        regions=json.dumps(summary["regions"]),
        suppressed=json.dumps(summary["suppressed"]),
        mask_rle=json.dumps(mask_to_rle(prediction.post.mask)),
        timings_ms=json.dumps(timings),
        total_ms=round(timings["read"] + timings.get("total", 0.0), 3),
    )
    return row


def error_row(
    image: ImageFile, error: str, model: ModelInfo, engine: str, runtime: dict[str, str]
) -> dict[str, Any]:
    """The row of an image that could not be scored: every result column null, ``error`` set."""
    row = _base_row(image, model, engine, runtime)
    row["error"] = error
    return row


def to_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)
