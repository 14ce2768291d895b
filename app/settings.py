"""Every setting of the HTTP service, in one place.

Read from environment variables (names as below, case-insensitive) and from a `.env` file in the
working directory; README "Serving" lists them with their defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.device import check_device_name, check_precision_name
from models.postprocess import SuppressionSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", protected_namespaces=()
    )

    model_uri: str | None = Field(
        default=None,
        description="bundle folder or MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, "
        "runs:/RUN_ID/PATH); required",
    )
    max_loaded_models: int = Field(
        default=4,
        ge=1,
        description="a fleet (MODEL_URI naming fleet.json): the most fabrics' models loaded at "
        "once; loading one more evicts the least recently used (each model takes its weights' "
        "size in memory, plus its runtime's)",
    )
    model_poll_s: float = Field(
        default=30.0,
        ge=0.0,
        description="a fleet: seconds between polls of the registry aliases its fabrics follow "
        "(models:/NAME-FF@ALIAS); a moved alias is loaded and swapped in without a restart; 0: "
        "never",
    )
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        default="auto",
        description="what runs the network: auto (torch for a bundle, the export's runtime for "
        "an exported model), torch, onnxruntime or openvino",
    )
    device: str = Field(
        default="auto",
        description="where a PyTorch bundle's network runs: auto (a CUDA GPU when there is one, "
        "else the CPU), cpu, cuda, cuda:N or mps; a device that is not there stops start-up "
        "(exported models run on the CPU)",
    )
    precision: Literal["32", "bf16", "16-mixed"] = Field(
        default="32",
        description="32 (fp32), bf16 (autocast; CUDA or CPU) or 16-mixed (float16; CUDA only)",
    )
    channels_last: bool = Field(
        default=False, description="channels-last convolutions (helps GPUs in bf16/16-mixed)"
    )
    batch_max_tiles: int | None = Field(
        default=None,
        ge=0,
        description="dynamic batching: the most tiles one forward pass gathers from concurrent "
        "requests; 0 turns it off; unset: 64 on a GPU, off on the CPU (where it is no faster)",
    )
    batch_max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=1000.0,
        description="dynamic batching: how long a pass waits for more tiles after the first",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    inference_threads: int = Field(
        default=0,
        ge=0,
        description="threads of the network's runtime (torch, ONNX Runtime, OpenVINO); 0 leaves "
        "the runtime's default",
    )
    inference_workers: int = Field(default=1, ge=1, description="images scored at the same time")
    max_queue_depth: int = Field(
        default=8, ge=0, description="requests waiting for a worker before 503 Retry-After"
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="seconds an image may wait and run before 503"
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After on 503 (busy)")
    shutdown_timeout_s: int = Field(
        default=30,
        ge=0,
        description="on SIGTERM, seconds requests in flight may take to finish before they are "
        "cut off",
    )

    max_upload_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1, description="request body limit (all files together)"
    )
    max_pixels: int = Field(default=16_777_216, ge=1, description="pixels an image may declare")
    max_batch_files: int = Field(default=16, ge=1, description="files per /predict/batch")

    min_region_area: int | None = Field(
        default=None, ge=0, description="default suppression; unset: the bundle's value"
    )
    min_region_peak: float | None = Field(default=None, ge=0.0, le=1.0)
    smoothing_sigma: float | None = Field(default=None, ge=0.0)
    min_valid_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    veto_margin: float | None = Field(default=None, ge=0.0, le=1.0)
    evidence_region: bool | None = Field(
        default=None,
        description="keep the spot a strong score came from when nothing reached the pixel"
        " threshold there; unset: the bundle's value",
    )

    inference_log_path: Path | None = Field(
        default=Path(".loomwatch/inference.jsonl"),
        description="one JSON line per prediction; empty disables the log",
    )
    inference_log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    inference_log_backups: int = Field(default=5, ge=0)

    database_url: str | None = Field(
        default="sqlite:///.loomwatch/feedback.db",
        description="the feedback database (SQLAlchemy URL: sqlite:///FILE, "
        "postgresql+psycopg://USER:PASSWORD@HOST/DB); empty: no predictions recorded, no feedback",
    )
    database_timeout_s: float = Field(
        default=3.0, gt=0, description="seconds to wait for the feedback database before 503"
    )
    feedback_thumbnails: bool = Field(
        default=True,
        description="keep a small thumbnail (at most 512 x 128 px) of each prediction for the "
        "review page; subject to the retention bound",
    )
    feedback_image_dir: Path | None = Field(
        default=None,
        description="keep each scored image here (a folder, or a mounted object store) for "
        "review and calibration; unset: images are never kept",
    )
    feedback_retention_days: float = Field(
        default=30.0,
        gt=0,
        description="kept images and thumbnails older than this are deleted (predictions and "
        "feedback stay)",
    )

    drift_window: int = Field(
        default=200,
        ge=20,
        le=100_000,
        description="predictions in the sliding window of the drift metrics (score PSI and KS "
        "against the calibration's reference, anomaly rate, kept area)",
    )

    api_key: SecretStr | None = Field(
        default=None, description="when set, required on every route but /health and /ready"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; none if empty"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, value: Any) -> Any:
        return check_precision_name(str(value)) if isinstance(value, str | int) else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator(
        "model_uri",
        "api_key",
        "inference_log_path",
        "database_url",
        "feedback_image_dir",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    def suppression_overrides(self) -> dict[str, Any]:
        """The suppression settings given here, to lay over the bundle's defaults."""
        names = SuppressionSettings.model_fields
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}
