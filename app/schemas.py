"""Request options and response bodies of the HTTP API (what Swagger UI shows)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MaskFormat(StrEnum):
    png = "png"
    rle = "rle"
    none = "none"


@dataclass(frozen=True)
class ScoreOptions:
    """Per-request overrides (query parameters); None keeps the service default."""

    threshold: float | None = None
    min_region_area: int | None = None
    min_region_peak: float | None = None
    heatmap: bool = False
    mask: MaskFormat = MaskFormat.png
    veto_margin: float | None = None


# ---- shared pieces ----------------------------------------------------------------------------


def example(value: Any) -> dict[str, Any]:
    """A query parameter's example as Swagger UI shows it (`openapi_examples`)."""
    return {"default": {"summary": f"{value!r}", "value": value}}


class ErrorResponse(BaseModel):
    detail: str = Field(description="one line saying what went wrong")
    code: str = Field(description="machine-readable reason", examples=["unsupported_media_type"])
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="422 on parameters: each problem with its location"
    )

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "detail": "content type 'application/pdf' is not accepted; "
                "send PNG, JPEG, BMP, TIFF",
                "code": "unsupported_media_type",
                "request_id": "5f0c1d7e9a2b4c6d8e0f1a2b3c4d5e6f",
            }
        }
    )


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str = Field(description="registered model name, or the bundle folder's name")
    version: str = Field(description="registry version when known, else the bundle digest")
    type: str = Field(description="detector kind", examples=["patchcore"])


class BoundingBox(BaseModel):
    x: int
    y: int
    width: int
    height: int


class RegionOut(BaseModel):
    bbox: BoundingBox = Field(description="pixels of the input image; x to the right, y down")
    area: int = Field(description="fabric pixels in the region")
    peak: float = Field(description="highest normalised score in the region")
    mean: float = Field(description="mean normalised score in the region")
    below_threshold: bool = Field(
        default=False,
        description="true for the spot a strong image score came from where nothing reached the"
        " pixel threshold: its pixels at half its height above the tile's median (a faint"
        " defect of a few pixels is shown, not only scored)",
    )


class SuppressedRegion(RegionOut):
    reason: Literal[
        "outside_valid_area", "area_below_min", "peak_below_min", "image_not_anomalous"
    ] = Field(
        description="why it is not reported as a defect (image_not_anomalous: the image as a "
        "whole was decided normal)"
    )


class SuppressionSettingsOut(BaseModel):
    min_region_area: int
    min_region_peak: float
    smoothing_sigma: float
    min_valid_fraction: float
    veto_margin: float
    evidence_region: bool = True


class SuppressionLog(BaseModel):
    settings: SuppressionSettingsOut = Field(description="the settings in force for this image")
    regions: list[SuppressedRegion]
    vetoed_decision: bool = Field(
        description="true when the score reached the threshold by less than veto_margin and "
        "every region found was suppressed, which turned the alarm off"
    )


class ImageSize(BaseModel):
    width: int
    height: int


class ColumnSpan(BaseModel):
    start: int
    stop: int


class IsolatedPeakOut(BaseModel):
    tile_score: float = Field(description="the highest tile score on fabric (raw units)")
    gap: float = Field(description="the highest local maximum of the map less the rank-th")


class ImageOut(BaseModel):
    filename: str | None = None
    format: str = Field(examples=["PNG"])
    mode: str = Field(description="PIL mode as uploaded (converted to 8-bit grey)", examples=["L"])
    width: int
    height: int
    tiles: int = Field(description="tiles the model scored")
    fabric_fraction: float | None = Field(
        default=None, description="share of the image's pixels scored as fabric (valid area)"
    )
    field_of_view: ColumnSpan | None = Field(
        default=None,
        description="the model's learned field of view, columns [start, stop), when it applied"
        " (an image as wide as its training images): columns outside it are not scored",
    )
    map_level: float = Field(
        default=0.0,
        description="the image's own level (the median of the model's map over its fabric, in"
        " raw units) subtracted from the map and the score when the model's pipeline says"
        " image_level=median; 0 otherwise",
    )
    isolated_peak: IsolatedPeakOut | None = Field(
        default=None,
        description="when the model scores strips by their isolated peak (pipeline.isolated_peak,"
        " learned by train for DRAEM): the highest tile score and the peak gap (how far the"
        " highest spot of the map stands above its 20th-highest), in raw units; raw_score is"
        " the larger of the two standardised on the model's defect-free training strips",
    )


class MaskOut(BaseModel):
    format: Literal["png", "rle"]
    width: int
    height: int
    png_base64: str | None = Field(
        default=None, description="format=png: 8-bit grey PNG, 255 on kept defect regions"
    )
    counts: list[int] | None = Field(
        default=None,
        description="format=rle: COCO-style uncompressed run lengths, column-major, "
        "starting with a background run",
    )


class HeatmapOut(BaseModel):
    width: int
    height: int
    png_base64: str = Field(description="colour PNG of the normalised anomaly map (blue 0, red 1)")


# ---- /predict ---------------------------------------------------------------------------------

PREDICTION_EXAMPLE: dict[str, Any] = {
    "request_id": "5f0c1d7e9a2b4c6d8e0f1a2b3c4d5e6f",
    "prediction_id": "0b6f3c9e2d4a4e71a8c5f1d2e3b4a596",
    "model": {"name": "fabric-02", "version": "3", "type": "patchcore"},
    "image": {
        "filename": "0044_019_04.png",
        "format": "PNG",
        "mode": "L",
        "width": 4096,
        "height": 256,
        "tiles": 16,
        "fabric_fraction": 0.9134,
        "field_of_view": {"start": 352, "stop": 4064},
        "map_level": 0.0951,
    },
    "score": 0.8312,
    "raw_score": 4.127,
    "threshold": 0.5,
    "raw_threshold": 3.481,
    "decision": "anomalous",
    "is_anomalous": True,
    "decision_reason": "score 0.914 reached the threshold 0.500; 1 region(s) kept",
    "regions": [
        {
            "bbox": {"x": 1510, "y": 88, "width": 41, "height": 23},
            "area": 702,
            "peak": 0.9141,
            "mean": 0.6722,
        }
    ],
    "suppression": {
        "settings": {
            "min_region_area": 10,
            "min_region_peak": 0.5,
            "smoothing_sigma": 1.0,
            "min_valid_fraction": 0.5,
            "veto_margin": 0.05,
        },
        "regions": [
            {
                "bbox": {"x": 3012, "y": 200, "width": 3, "height": 2},
                "area": 5,
                "peak": 0.5102,
                "mean": 0.5051,
                "reason": "area_below_min",
            }
        ],
        "vetoed_decision": False,
    },
    "mask": {"format": "png", "width": 4096, "height": 256, "png_base64": "iVBORw0KGgo..."},
    "heatmap": None,
    "timings_ms": {
        "queue": 0.4,
        "decode": 6.1,
        "preprocess": 3.0,
        "tile": 0.8,
        "model": 512.3,
        "stitch": 4.2,
        "calibrate": 1.1,
        "postprocess": 5.6,
        "encode": 2.3,
        "inference": 535.4,
        "total": 537.9,
    },
}


class PredictionResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": PREDICTION_EXAMPLE})

    request_id: str
    prediction_id: str | None = Field(
        default=None,
        description="the id to give feedback on (POST /predictions/{id}/feedback); null when "
        "the feedback database is off or could not record it",
    )
    model: ModelRef
    image: ImageOut
    score: float = Field(description="normalised image score; the calibrated threshold is 0.5")
    raw_score: float = Field(description="image score in the model's own units")
    threshold: float = Field(description="normalised image threshold used")
    raw_threshold: float = Field(description="the same threshold in raw units")
    decision: Literal["anomalous", "normal"]
    is_anomalous: bool
    decision_reason: str = Field(
        description="why: the score against the threshold, and whether regions were kept, "
        "all suppressed (the score is the evidence) or the alarm vetoed"
    )
    regions: list[RegionOut] = Field(description="kept defect regions, highest peak first")
    suppression: SuppressionLog
    mask: MaskOut | None = Field(description="kept regions as a mask; null with mask=none")
    heatmap: HeatmapOut | None = Field(description="only with heatmap=true")
    timings_ms: dict[str, float] = Field(
        description="queue (waiting for a worker), decode, preprocess, tile, model, stitch, "
        "calibrate, postprocess, encode (mask/heatmap), inference (all in the worker), "
        "total (the request on the server)"
    )


class BatchItem(BaseModel):
    index: int = Field(description="position of the file in the request")
    filename: str | None
    status: int = Field(description="200, or the status this image alone would have had")
    result: PredictionResponse | None = None
    error: ErrorResponse | None = None


class BatchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "request_id": "5f0c1d7e9a2b4c6d8e0f1a2b3c4d5e6f",
                "model": PREDICTION_EXAMPLE["model"],
                "count": 2,
                "failed": 1,
                "items": [
                    {
                        "index": 0,
                        "filename": "0044_019_04.png",
                        "status": 200,
                        "result": PREDICTION_EXAMPLE,
                        "error": None,
                    },
                    {
                        "index": 1,
                        "filename": "notes.txt",
                        "status": 415,
                        "result": None,
                        "error": {
                            "detail": "content type 'text/plain' is not accepted; "
                            "send PNG, JPEG, BMP, TIFF",
                            "code": "unsupported_media_type",
                            "request_id": "5f0c1d7e9a2b4c6d8e0f1a2b3c4d5e6f",
                        },
                    },
                ],
            }
        }
    )

    request_id: str
    model: ModelRef
    count: int
    failed: int
    items: list[BatchItem]


# ---- service routes ---------------------------------------------------------------------------


class HealthResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"status": "ok", "version": "0.1.0"}})

    status: Literal["ok"] = "ok"
    version: str = Field(description="loomwatch package version")


class ReadyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "status": "ready",
                "reason": None,
                "model": PREDICTION_EXAMPLE["model"],
                "warmup_ms": 812.4,
                "backend": "torch",
                "device": "cuda:0",
                "precision": "bf16",
            }
        }
    )

    status: Literal["ready", "not_ready"]
    reason: str | None = Field(default=None, description="why not ready")
    model: ModelRef | None = None
    warmup_ms: float | None = None
    backend: str | None = Field(default=None, description="torch, onnxruntime or openvino")
    device: str | None = Field(default=None, description="cpu, cuda:N or mps")
    precision: str | None = Field(
        default=None, description="32, bf16 or 16-mixed (torch); fp32 or int8 (exported)"
    )


class AcceptedInput(BaseModel):
    formats: list[str]
    content_types: list[str]
    modes: list[str] = Field(description="PIL modes; all are converted to 8-bit grey")
    max_upload_bytes: int
    max_pixels: int
    max_batch_files: int


class ModelResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "example": {
                "name": "fabric-02",
                "version": "3",
                "type": "patchcore",
                "uri": "models:/fabric-02/3",
                "digest": "sha256:3be2a0c1d9f4",
                "created": "2026-01-05T10:12:44+00:00",
                "config": {"backbone": "resnet18", "layers": ["layer2", "layer3"]},
                "pipeline": {"tile_size": 256, "stride": 256, "batch_size": 8},
                "calibration": {
                    "image_threshold": 3.48,
                    "image_min": 2.1,
                    "image_max": 6.3,
                    "pixel_threshold": 2.9,
                    "pixel_min": 0.4,
                    "pixel_max": 7.7,
                    "method": "image:f1 pixel:f1",
                },
                "suppression": {
                    "min_region_area": 10,
                    "min_region_peak": 0.5,
                    "smoothing_sigma": 1.0,
                    "min_valid_fraction": 0.5,
                    "veto_margin": 0.05,
                },
                "training": {"fabric": "02", "train_images": 84, "validation_images": 36},
                "metrics": {"image_auroc": 0.93, "pixel_auroc": 0.97},
                "versions": {"torch": "2.4.1"},
                "accepted_input": {
                    "formats": ["PNG", "JPEG", "BMP", "TIFF"],
                    "content_types": ["image/png", "image/jpeg", "image/bmp", "image/tiff"],
                    "modes": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
                    "max_upload_bytes": 33554432,
                    "max_pixels": 16777216,
                    "max_batch_files": 16,
                },
            }
        },
    )

    name: str
    version: str
    type: str
    uri: str = Field(description="the MODEL_URI it was loaded from")
    digest: str = Field(description="sha256 of the bundle's manifest and weights (12 hex)")
    created: str
    config: dict[str, Any]
    pipeline: dict[str, Any]
    calibration: dict[str, Any]
    suppression: SuppressionSettingsOut = Field(description="service defaults in force")
    training: dict[str, Any]
    metrics: dict[str, float | None] = Field(description="validation metrics at training")
    versions: dict[str, str]
    accepted_input: AcceptedInput
    runtime: dict[str, Any] | None = Field(
        default=None,
        description="what runs the network: backend, device, precision, and the dynamic "
        "batching of concurrent requests' tiles (batch_max_tiles 0: off; batch_max_wait_ms)",
    )


class ServedModelOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    fabric: str | None = Field(description="fabric code (AITEX) or category; null: any")
    uri: str = Field(description="where the model comes from (an alias is followed)")
    loaded: bool = Field(description="in memory now (a fleet loads models on first use)")
    pinned: str | None = Field(default=None, description="the immutable URI loaded")
    name: str | None = None
    version: str | None = None
    type: str | None = None
    digest: str | None = None


class ModelsResponse(BaseModel):
    fleet: str | None = Field(description="the fleet served (MODEL_URI), or null for one model")
    max_loaded_models: int = Field(description="a fleet: the most models loaded at once")
    poll_s: float = Field(description="a fleet: seconds between alias polls (0: none)")
    models: list[ServedModelOut]
