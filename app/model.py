"""The one model the service runs: loaded from MODEL_URI at start-up and warmed up once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.settings import Settings
from models.manifest import folder_digest, weights_digest
from models.pipeline import Detector
from models.postprocess import SuppressionSettings
from tracking.uris import name_and_version, resolve_model_uri

log = logging.getLogger("loomwatch.app")


class StartupError(RuntimeError):
    """The service cannot start; the message says why in one line."""


@dataclass(frozen=True)
class LoadedModel:
    detector: Detector
    uri: str
    name: str
    version: str
    digest: str
    suppression: SuppressionSettings  # service defaults: the bundle's, overridden by settings
    warmup_ms: float
    weights: str = ""  # digest of the weights alone (models.manifest.weights_digest)

    @property
    def type(self) -> str:
        return self.detector.manifest.model_type

    @property
    def fabric(self) -> str | None:
        fabric = self.detector.manifest.training.get("fabric")
        return str(fabric) if fabric else None


def bundle_digest(folder: Path) -> str:
    """The served model's version when the URI names none: a digest of its folder's files."""
    return folder_digest(folder)


def warm_up(detector: Detector) -> float:
    """One inference on a small fabric-like image, so the first request is not the slow one."""
    tile = detector.pipeline.tile_size
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(120, 12, (tile, tile * 2)), 0, 255).astype(np.uint8)
    started = time.perf_counter()
    detector.predict(image)
    return (time.perf_counter() - started) * 1000.0


def load_model(settings: Settings) -> LoadedModel:
    """Resolve, load and warm the model, or raise StartupError with one clear line."""
    uri = settings.model_uri
    if not uri:
        raise StartupError("no model: set MODEL_URI (or pass --model-uri to loomwatch serve)")
    started = time.perf_counter()
    try:
        folder = resolve_model_uri(uri)
        threads = settings.inference_threads or None
        detector = Detector.from_bundle(folder, backend=settings.backend, threads=threads)
        digest = bundle_digest(folder)
        weights = weights_digest(folder)
        defaults = detector.suppression.model_dump() | settings.suppression_overrides()
        suppression = SuppressionSettings.model_validate(defaults)
        warmup_ms = warm_up(detector)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StartupError(f"cannot load model {uri!r}: {first_line}") from None
    name, version = name_and_version(uri, folder, digest)
    log.info(
        "model %s version %s (%s) loaded from %s in %.1f s, warm-up %.0f ms",
        name,
        version,
        detector.manifest.model_type,
        uri,
        time.perf_counter() - started,
        warmup_ms,
    )
    return LoadedModel(detector, uri, name, version, digest, suppression, warmup_ms, weights)
