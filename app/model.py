"""The one model the service runs: loaded from MODEL_URI at start-up and warmed up once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.settings import Settings
from models.batching import BatchingNetwork
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
    def runtime(self) -> dict[str, Any]:
        """What runs the network and how: backend, device, precision and the dynamic batching
        (0 tiles: off), for /ready and /model."""
        network = self.detector.network
        tiles, wait = 0, None
        if isinstance(network, BatchingNetwork):
            tiles, wait = network.max_batch, network.max_wait * 1000.0
        return {
            "backend": self.detector.backend,
            "device": self.detector.device,
            "precision": self.detector.precision,
            "batch_max_tiles": tiles,
            "batch_max_wait_ms": wait,
        }

    def close(self) -> None:
        """Stop the batcher's thread (after the queued passes), if there is one."""
        if isinstance(self.detector.network, BatchingNetwork):
            self.detector.network.close()

    @property
    def fabric(self) -> str | None:
        fabric = self.detector.manifest.training.get("fabric")
        return str(fabric) if fabric else None


# The tiles of one image go to the batcher in one call (it splits them into passes): a 4096 x
# 4096 image of 256 px tiles has 256.
WHOLE_IMAGE = 1 << 16


def batch_tiles(settings: Settings, device: str) -> int:
    """BATCH_MAX_TILES, or by default 64 on an accelerator and 0 (off) on the CPU: there a pass
    costs in proportion to its tiles, and gathering them only adds a hop between threads."""
    if settings.batch_max_tiles is not None:
        return settings.batch_max_tiles
    return 0 if device == "cpu" else 64


def use_batching(detector: Detector, settings: Settings) -> None:
    """Put the dynamic batcher (models/batching.py) in front of the detector's network when
    batching is on: concurrent requests' tiles then share forward passes."""
    tiles = batch_tiles(settings, detector.device)
    if tiles > 0:
        detector.network = BatchingNetwork(detector.network, tiles, settings.batch_max_wait_ms)
        detector.batch_size = WHOLE_IMAGE


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


def load_model(settings: Settings, uri: str | None = None) -> LoadedModel:
    """Resolve, load and warm the model (MODEL_URI, or ``uri``: one fabric's model of a fleet,
    app/fleet.py), or raise StartupError with one clear line."""
    uri = uri or settings.model_uri
    if not uri:
        raise StartupError("no model: set MODEL_URI (or pass --model-uri to loomwatch serve)")
    started = time.perf_counter()
    try:
        folder = resolve_model_uri(uri)
        threads = settings.inference_threads or None
        detector = Detector.from_bundle(
            folder,
            backend=settings.backend,
            threads=threads,
            device=settings.device,
            precision=settings.precision,
            channels_last=settings.channels_last,
        )
        use_batching(detector, settings)
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
        "model %s version %s (%s) loaded from %s in %.1f s, warm-up %.0f ms; %s on %s, %s",
        name,
        version,
        detector.manifest.model_type,
        uri,
        time.perf_counter() - started,
        warmup_ms,
        detector.backend,
        detector.device,
        detector.precision,
    )
    return LoadedModel(detector, uri, name, version, digest, suppression, warmup_ms, weights)
