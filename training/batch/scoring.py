"""Scoring files in a worker: the one function both engines run on every image.

A worker (a local pool process, or a Spark Python worker) loads the model once, through the same
:class:`~models.pipeline.Detector` that ``loomwatch predict`` and the service use, and keeps it
for every later image of the job (:func:`worker_detector`). Each file is read by path, checked
for size, decoded and scored; anything that goes wrong with one image (missing, oversized,
truncated, not an image, or an unexpected failure in the pipeline) becomes that image's error
row and the next image is scored.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.manifest import folder_digest
from models.pipeline import Detector
from models.preprocessing import DEFAULT_MAX_PIXELS, ImageDecodeError
from training.batch.schema import ImageFile, ModelInfo, error_row, scored_row

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # a 4096 x 256 AITEX strip is about 1 MB


class ModelMismatchError(RuntimeError):
    """A worker found another model than the driver resolved (a stale or partial copy)."""


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to score: the model folder it can read, and the limits."""

    folder: str
    model: ModelInfo
    backend: str = "auto"
    threads: int | None = None
    engine: str = "local"
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    precision: str = "32"


_DETECTORS: dict[tuple[str, str, int | None, str, str], Detector] = {}


def worker_detector(settings: WorkerSettings) -> Detector:
    """The worker's detector, loaded on first use and kept for the life of the process. The
    folder's digest must be the driver's: every row names the model that scored it."""
    key = (settings.folder, settings.backend, settings.threads, settings.device,
           settings.precision)  # fmt: skip
    detector = _DETECTORS.get(key)
    if detector is None:
        digest = folder_digest(settings.folder)
        if digest != settings.model.digest:
            raise ModelMismatchError(
                f"{settings.folder}: model digest {digest}, the job's is {settings.model.digest}"
            )
        detector = Detector.from_bundle(
            settings.folder,
            backend=settings.backend,
            threads=settings.threads,
            device=settings.device,
            precision=settings.precision,
        )
        _DETECTORS[key] = detector
    return detector


def runtime_of(detector: Detector) -> dict[str, str]:
    """What ran the network, as the rows record it."""
    return {"backend": detector.backend, "device": detector.device,
            "precision": detector.precision}  # fmt: skip


def score_file(detector: Detector, image: ImageFile, settings: WorkerSettings) -> dict[str, Any]:
    """One image's row: scored, or an error row; never raises for a bad file."""

    runtime = runtime_of(detector)

    def failed(reason: str) -> dict[str, Any]:
        return error_row(image, reason, settings.model, settings.engine, runtime)

    started = time.perf_counter()
    path = Path(image.path)
    try:
        size = path.stat().st_size
        if size > settings.max_bytes:
            return failed(f"file has {size} bytes, more than the limit of {settings.max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        return failed(f"cannot read the file: {exc.strerror or exc}")
    read_seconds = time.perf_counter() - started
    try:
        prediction = detector.predict(data, max_pixels=settings.max_pixels)
    except ImageDecodeError as exc:
        return failed(str(exc))
    except Exception as exc:  # one image must not stop the job: its row says what happened
        return failed(f"scoring failed: {type(exc).__name__}: {exc}")
    return scored_row(image, prediction, read_seconds, settings.model, settings.engine, runtime)


def score_files(images: Iterable[ImageFile], settings: WorkerSettings) -> Iterator[dict[str, Any]]:
    """Rows for ``images``, in order, with the worker's detector (loaded once)."""
    detector = worker_detector(settings)
    for image in images:
        yield score_file(detector, image, settings)
