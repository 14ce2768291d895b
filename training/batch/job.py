"""One batch job, whatever the engine: resolve the model, find the images, skip what is done,
score the rest, write the output atomically, and (optionally) the report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from models.manifest import folder_digest
from models.network import cores
from models.pipeline import Detector
from tracking.uris import name_and_version, pin_model_uri, resolve_model_uri
from training.batch.files import find_images
from training.batch.output import (
    check_output,
    done_paths,
    final_rows,
    output_lock,
    read_output,
    work_folder,
    write_output_local,
)
from training.batch.schema import IDENTITY, ImageFile, ModelInfo
from training.batch.scoring import DEFAULT_MAX_BYTES, WorkerSettings

log = logging.getLogger("loomwatch.batch")
ENGINES = ("local", "spark")
EXIT_ALL_SCORED, EXIT_SOME_ERRORED = 0, 1


class BatchSettingsError(ValueError):
    """An option the job cannot run with; the message says which and why."""


@dataclass(frozen=True)
class BatchRequest:
    model_uri: str
    input: str
    output: Path
    engine: str = "local"
    master: str | None = None
    workers: int = 1
    backend: str = "auto"
    report_dir: Path | None = None
    worst: int = 8
    checkpoint_every: int = 256
    max_bytes: int = DEFAULT_MAX_BYTES
    device: str = "auto"  # where the network runs (models/device.py), as for predict
    precision: str = "32"
    progress: bool = True


@dataclass
class BatchSummary:
    output: Path
    model: ModelInfo
    engine: str
    n_images: int  # images in the input
    n_resumed: int  # already scored by this model: skipped
    n_scored_now: int  # rows made by this run
    n_errors: int  # rows of the output with an error
    n_anomalous: int
    seconds: float
    report: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_ERRORED if self.n_errors else EXIT_ALL_SCORED

    def line(self) -> str:
        scored = self.n_images - self.n_errors
        return (
            f"{self.n_images} images: {scored} scored ({self.n_anomalous} anomalous), "
            f"{self.n_errors} errors; {self.n_scored_now} scored by this run, "
            f"{self.n_resumed} kept from before; {self.engine} engine, {self.seconds:.1f} s "
            f"-> {self.output}"
        )


def check_request(request: BatchRequest) -> None:
    if request.engine not in ENGINES:
        raise BatchSettingsError(f"unknown --engine {request.engine!r}: choose local or spark")
    if request.workers < 1:
        raise BatchSettingsError("--workers must be at least 1")
    if request.master is not None and request.engine != "spark":
        raise BatchSettingsError("--master needs --engine spark")
    if request.checkpoint_every < 1:
        raise BatchSettingsError("--checkpoint-every must be at least 1")
    if request.max_bytes < 1:
        raise BatchSettingsError("--max-bytes must be at least 1")
    if request.worst < 0:
        raise BatchSettingsError("--worst must be >= 0")


def resolve_model(
    uri: str, backend: str, device: str = "auto", precision: str = "32"
) -> tuple[Path, ModelInfo, Detector]:
    """The model's local folder, what rows name it by, and the driver's detector (which proves
    the model loads before any worker starts, and draws the report's overlays)."""
    folder = resolve_model_uri(uri)
    detector = Detector.from_bundle(folder, backend=backend, device=device, precision=precision)
    digest = folder_digest(folder)
    name, version = name_and_version(pin_model_uri(uri), folder, digest)
    info = ModelInfo(uri, name, version, digest, detector.manifest.model_type)
    return folder, info, detector


def run_batch(
    request: BatchRequest, say: Callable[[str], None] = lambda text: None
) -> BatchSummary:
    check_request(request)
    if request.engine == "spark":  # before any work: no Java, no Spark
        from training.batch.spark import SparkUnavailableError, java_problem

        problem = java_problem()
        if problem:
            raise SparkUnavailableError(problem)
    started = time.perf_counter()
    out = request.output
    check_output(out)
    own = [out, work_folder(out), *([request.report_dir] if request.report_dir else [])]
    root, images = find_images(request.input, exclude=own)
    say(f"{len(images)} images below {root}")
    folder, model, detector = resolve_model(
        request.model_uri, request.backend, request.device, request.precision
    )
    say(f"model {model.name} version {model.version} ({model.type}, {model.digest})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        summary = _score(request, out, images, folder, model, detector, say)
    if request.report_dir is not None:
        from training.batch.report import write_batch_report

        summary.report = write_batch_report(out, request.report_dir, detector, request.worst)
    summary.seconds = time.perf_counter() - started
    return summary


def _score(
    request: BatchRequest,
    out: Path,
    images: list[ImageFile],
    folder: Path,
    model: ModelInfo,
    detector: Detector,
    say: Callable[[str], None],
) -> BatchSummary:
    """Skip what is done, score the rest, write the output; the summary of the output."""
    started = time.perf_counter()
    identity = dict(zip(IDENTITY, (model.digest, detector.backend, detector.precision),
                        strict=True))  # fmt: skip
    done = done_paths(out, identity)
    todo = [image for image in images if image.path not in done]
    resumed = len(images) - len(todo)
    if resumed:
        say(f"{resumed} images already scored by this model: {len(todo)} to score")
    settings = WorkerSettings(
        folder=str(folder),
        model=model,
        backend=request.backend,
        threads=max(1, cores(None) // request.workers),
        engine=request.engine,
        max_bytes=request.max_bytes,
        device=request.device,
        precision=request.precision,
    )
    info = {
        "model": asdict(model),
        "input": request.input,
        "engine": request.engine,
        "images": len(images),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    paths = [image.path for image in images]
    progress = _progress(len(todo), request.progress)
    scoring_started = time.perf_counter()
    try:
        if request.engine == "local":
            from training.batch.local import run_local

            run_local(todo, settings, request.workers, work_folder(out),
                      request.checkpoint_every, progress.update, detector)  # fmt: skip
            scoring = time.perf_counter() - scoring_started
            write_output_local(final_rows(out, identity, paths), out, info)
        else:
            from training.batch.spark import run_spark, spark_session, write_output_spark

            spark = spark_session(request.master, request.workers, request.progress)
            try:
                run_spark(spark, todo, settings, work_folder(out), request.checkpoint_every,
                          progress.update)  # fmt: skip
                scoring = time.perf_counter() - scoring_started
                write_output_spark(spark, out, identity, paths, info)
            finally:
                spark.stop()
    finally:
        progress.close()
    summary = _summarise(out, model, request.engine, len(images), resumed, len(todo))
    summary.timings = {"scoring": scoring, "total": time.perf_counter() - started}
    return summary


def _summarise(
    out: Path, model: ModelInfo, engine: str, images: int, resumed: int, now: int
) -> BatchSummary:
    table = read_output(out, ["error", "is_anomalous"])
    if table.num_rows != images:  # every input image has exactly one row, or the job is wrong
        raise RuntimeError(f"{out}: {table.num_rows} rows for {images} images")
    errors = table.num_rows - int(pc.count(table["error"], mode="only_null").as_py())
    anomalous = int(pc.sum(pc.fill_null(table["is_anomalous"], False)).as_py() or 0)
    return BatchSummary(out, model, engine, images, resumed, now, errors, anomalous, 0.0)


class _Progress:
    def __init__(self, total: int, show: bool) -> None:
        self.bar: Any = None
        if show and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="batch", unit="img")

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(total: int, show: bool) -> _Progress:
    return _Progress(total, show)
