"""Scoring uploads: check them, run the pipeline in the pool, shape the answer, log it.

Routes stay a few lines long; everything between "an upload arrived" and "here is the JSON"
lives here. The CPU work (decode, model, post-processing, PNG encoding) runs in the worker pool.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from app.drift import DriftWindow, reference_of
from app.errors import ApiError
from app.feedback.store import FeedbackStore, FeedbackUnavailableError, NewPrediction
from app.imaging import ImageInfo, probe_image, rle_counts
from app.inference_log import InferenceLog
from app.metrics import Metrics
from app.model import LoadedModel
from app.pool import InferencePool, InferenceTimeoutError, QueueFullError
from app.schemas import (
    BatchItem,
    BatchResponse,
    ErrorResponse,
    HeatmapOut,
    ImageOut,
    MaskFormat,
    MaskOut,
    ModelRef,
    PredictionResponse,
    ScoreOptions,
    SuppressionLog,
)
from app.settings import Settings
from models.overlay import (
    encode_png,
    heatmap,
    png_base64,
    render_overlay,
    render_thumbnail,
    wrap_wide,
)
from models.pipeline import Analysis, Prediction
from models.postprocess import SuppressionSettings
from models.preprocessing import ImageDecodeError

T = TypeVar("T")
log = logging.getLogger("loomwatch.app")
RECORD_BACKOFF_S = 5.0  # after the feedback database failed, predictions go unrecorded this long


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes
    info: ImageInfo


@dataclass
class Scored:
    """What a worker hands back for one image."""

    prediction: Prediction
    mask: MaskOut | None
    heatmap: HeatmapOut | None
    overlay: bytes | None
    sha256: str
    started: float  # perf_counter when the worker took the job
    seconds: dict[str, float]  # pipeline stages, encode and inference (worker total)
    thumbnail: bytes | None = None  # the overlay, small, for the review page's list


@dataclass(frozen=True)
class Overlay:
    png: bytes
    result: PredictionResponse


def _encode_mask(prediction: Prediction, fmt: MaskFormat) -> MaskOut | None:
    mask = prediction.post.mask
    height, width = mask.shape
    if fmt is MaskFormat.png:
        return MaskOut(format="png", width=width, height=height, png_base64=png_base64(mask))
    if fmt is MaskFormat.rle:
        return MaskOut(format="rle", width=width, height=height, counts=rle_counts(mask))
    return None


class Scorer:
    def __init__(
        self,
        model: LoadedModel,
        pool: InferencePool,
        inference_log: InferenceLog,
        metrics: Metrics,
        settings: Settings,
        store: FeedbackStore | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.log = inference_log
        self.metrics = metrics
        self.settings = settings
        self.store = store
        self._record_after = 0.0  # monotonic time before which recording is not tried
        reference = reference_of(model.detector.manifest.calibration.evidence)
        if reference is None:
            log.warning(
                "the model's calibration has no reference scores: no score drift metrics "
                "(loomwatch calibrate gives it one)"
            )
        self.drift = DriftWindow(reference, settings.drift_window)
        self.model_ref = ModelRef(name=model.name, version=model.version, type=model.type)

    # ---- reading uploads (on the event loop: header only, no decoding) ------------------------

    async def read(self, upload: UploadFile) -> Upload:
        data = await upload.read()
        tile = self.model.detector.pipeline.tile_size
        info = probe_image(data, upload.content_type, self.settings.max_pixels, tile)
        return Upload(upload.filename, data, info)

    def suppression(self, options: ScoreOptions) -> SuppressionSettings:
        overrides = {
            "min_region_area": options.min_region_area,
            "min_region_peak": options.min_region_peak,
            "veto_margin": options.veto_margin,
        }
        given = {key: value for key, value in overrides.items() if value is not None}
        return self.model.suppression.model_copy(update=given)

    # ---- the worker's part -------------------------------------------------------------------

    def _score(
        self,
        upload: Upload,
        options: ScoreOptions,
        overlay: bool,
        wrap: bool,
        analysis: Analysis | None = None,
        started: float | None = None,
    ) -> Scored:
        """Score one upload (or finish its ``analysis``, already run with others' tiles)."""
        started = time.perf_counter() if started is None else started
        if analysis is None:
            prediction = self.model.detector.predict(
                upload.data,
                threshold=options.threshold,
                suppression=self.suppression(options),
                max_pixels=self.settings.max_pixels,
            )
        else:
            prediction = self.model.detector.finish(
                analysis, threshold=options.threshold, suppression=self.suppression(options)
            )
        encode_started = time.perf_counter()
        mask = _encode_mask(prediction, options.mask)
        heat = None
        if options.heatmap:
            height, width = prediction.normalized_map.shape
            picture_b64 = png_base64(heatmap(prediction.normalized_map))
            heat = HeatmapOut(width=width, height=height, png_base64=picture_b64)
        picture = small = None
        if overlay:
            rendered = render_overlay(prediction)
            picture = encode_png(wrap_wide(rendered) if wrap else rendered)
        if self.store is not None and self.store.thumbnails:
            small = encode_png(render_thumbnail(prediction))
        sha256 = hashlib.sha256(upload.data).hexdigest()
        finished = time.perf_counter()
        seconds = {k: v for k, v in prediction.timings.items() if k != "total"}
        seconds["encode"] = finished - encode_started
        seconds["inference"] = finished - started
        return Scored(prediction, mask, heat, picture, sha256, started, seconds, small)

    def _score_many(
        self, uploads: Sequence[Upload], options: ScoreOptions
    ) -> list[Scored | ApiError]:
        """All the uploads' tiles through the network together (full batches across images; with
        the batcher, shared with other requests too), then each image finished on its own."""
        started = time.perf_counter()
        analyses = self.model.detector.analyse_many(
            [upload.data for upload in uploads], self.settings.max_pixels
        )
        results: list[Scored | ApiError] = []
        for upload, analysis in zip(uploads, analyses, strict=True):
            if isinstance(analysis, ImageDecodeError):
                results.append(_undecodable(analysis))
                continue
            results.append(self._score(upload, options, False, False, analysis, started))
        return results

    async def _in_pool(self, job: Callable[[], T], images: int = 1) -> tuple[T, float]:
        """Run `job` in the pool; returns its result and the perf_counter it was submitted at."""
        submitted = time.perf_counter()
        timeout = self.settings.request_timeout_s * images
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        try:
            return await self.pool.run(job, timeout), submitted
        except QueueFullError:
            self.metrics.rejected.labels(reason="queue_full").inc()
            detail = "the inference queue is full; retry later"
            raise ApiError(503, "busy", detail, retry) from None
        except InferenceTimeoutError:
            self.metrics.rejected.labels(reason="timeout").inc()
            detail = f"no result within {timeout:g} s; the service is busy, retry later"
            raise ApiError(503, "timeout", detail, retry) from None
        except ImageDecodeError as exc:
            raise _undecodable(exc) from None

    # ---- shaping, logging, counting ----------------------------------------------------------

    def _respond(
        self,
        request_id: str,
        upload: Upload,
        scored: Scored,
        submitted: float,
        received: float,
        route: str,
        index: int | None = None,
    ) -> PredictionResponse:
        prediction = scored.prediction
        summary = prediction.summary()
        timings = {"queue": max(scored.started - submitted, 0.0), **scored.seconds}
        timings["total"] = time.perf_counter() - received
        result = PredictionResponse(
            request_id=request_id,
            model=self.model_ref,
            image=ImageOut(
                filename=upload.filename,
                format=upload.info.format,
                mode=upload.info.mode,
                width=summary["image_size"]["width"],
                height=summary["image_size"]["height"],
                tiles=summary["tiles"],
                fabric_fraction=summary["fabric_fraction"],
                field_of_view=summary["field_of_view"],
                map_level=summary["map_level"],
                isolated_peak=summary["isolated_peak"],
            ),
            score=summary["score"],
            raw_score=summary["raw_score"],
            threshold=summary["threshold"],
            raw_threshold=summary["raw_threshold"],
            decision=summary["decision"],
            is_anomalous=summary["is_anomalous"],
            decision_reason=summary["decision_reason"],
            regions=summary["regions"],
            suppression=SuppressionLog.model_validate(summary["suppressed"]),
            mask=scored.mask,
            heatmap=scored.heatmap,
            timings_ms={stage: round(s * 1000.0, 2) for stage, s in timings.items()},
        )
        self._record(result, scored, route, index)
        return result

    def _record(
        self, result: PredictionResponse, scored: Scored, route: str, index: int | None
    ) -> None:
        reasons: list[str] = [region.reason for region in result.suppression.regions]
        stages = {k: v for k, v in scored.seconds.items() if k != "inference"}
        stages["total"] = scored.seconds["inference"]
        self.metrics.observe_prediction(result.is_anomalous, len(result.regions), reasons, stages)
        kept_area = sum(region.area for region in result.regions)
        window = self.drift.add(result.raw_score, result.is_anomalous, kept_area)
        self.metrics.observe_window(self.model.name, self.model.fabric or "all", window)
        entry: dict[str, Any] = {
            "request_id": result.request_id,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "route": route,
            "model": {**self.model_ref.model_dump(), "digest": self.model.digest},
            "image": {
                "filename": result.image.filename,
                "sha256": scored.sha256,
                "width": result.image.width,
                "height": result.image.height,
            },
            "score": result.score,
            "raw_score": result.raw_score,
            "threshold": result.threshold,
            "decision": result.decision,
            "decision_reason": result.decision_reason,
            "regions": [region.model_dump() for region in result.regions],
            "suppressed": result.suppression.model_dump(),
            "timings_ms": result.timings_ms,
        }
        if index is not None:
            entry["index"] = index
        self.log.append(entry)

    # ---- the feedback database ---------------------------------------------------------------

    def _new_prediction(
        self, result: PredictionResponse, upload: Upload, scored: Scored
    ) -> NewPrediction:
        return NewPrediction(
            id=uuid.uuid4().hex,
            request_id=result.request_id,
            filename=upload.filename,
            image_sha256=scored.sha256,
            image_format=upload.info.format,
            width=result.image.width,
            height=result.image.height,
            model_name=self.model.name,
            model_version=self.model.version,
            model_digest=self.model.digest,
            weights_digest=self.model.weights,
            fabric=self.model.fabric,
            decision=result.decision,
            score=result.score,
            raw_score=result.raw_score,
            threshold=result.threshold,
            raw_threshold=result.raw_threshold,
            regions={
                "kept": [region.model_dump() for region in result.regions],
                "suppressed": [region.model_dump() for region in result.suppression.regions],
            },
            thumbnail_png=scored.thumbnail,
            image=upload.data if self.settings.feedback_image_dir else None,
        )

    async def _remember(self, done: Sequence[tuple[PredictionResponse, Upload, Scored]]) -> None:
        """Record scored images in the feedback database and answer their ids. A database that
        is down costs the request nothing but its prediction_id (null): the image is scored."""
        if self.store is None or not done:
            return
        if time.monotonic() < self._record_after:
            self.metrics.database_failures.inc(len(done))
            return
        records = [self._new_prediction(*item) for item in done]
        try:
            await run_in_threadpool(self.store.record, records)
        except FeedbackUnavailableError as exc:
            self.metrics.database_failures.inc(len(done))
            if self._record_after == 0.0 or time.monotonic() - self._record_after > 60.0:
                log.warning("predictions are not recorded: %s", exc)
            self._record_after = time.monotonic() + RECORD_BACKOFF_S
            return
        self._record_after = 0.0
        for (result, _, _), record in zip(done, records, strict=True):
            result.prediction_id = record.id

    # ---- the three ways to ask ---------------------------------------------------------------

    async def predict(
        self, request_id: str, file: UploadFile, options: ScoreOptions
    ) -> PredictionResponse:
        received = time.perf_counter()
        upload = await self.read(file)
        scored, submitted = await self._in_pool(
            lambda: self._score(upload, options, overlay=False, wrap=False)
        )
        result = self._respond(request_id, upload, scored, submitted, received, "/predict")
        await self._remember([(result, upload, scored)])
        return result

    async def overlay(
        self, request_id: str, file: UploadFile, options: ScoreOptions, wrap: bool
    ) -> Overlay:
        received = time.perf_counter()
        upload = await self.read(file)
        options = ScoreOptions(
            options.threshold,
            options.min_region_area,
            options.min_region_peak,
            veto_margin=options.veto_margin,
        )
        scored, submitted = await self._in_pool(
            lambda: self._score(upload, options, overlay=True, wrap=wrap)
        )
        result = self._respond(request_id, upload, scored, submitted, received, "/predict/overlay")
        await self._remember([(result, upload, scored)])
        assert scored.overlay is not None
        return Overlay(scored.overlay, result)

    async def predict_batch(
        self, request_id: str, files: Sequence[UploadFile], options: ScoreOptions
    ) -> BatchResponse:
        received = time.perf_counter()
        limit = self.settings.max_batch_files
        if len(files) > limit:
            detail = f"{len(files)} files sent; at most {limit} per batch"
            raise ApiError(422, "too_many_files", detail)
        items: list[BatchItem | None] = [None] * len(files)
        accepted: list[tuple[int, Upload]] = []
        for index, file in enumerate(files):
            try:
                accepted.append((index, await self.read(file)))
            except ApiError as exc:
                items[index] = _failed_item(index, file.filename, exc, request_id)
        uploads = [upload for _, upload in accepted]
        outcomes: list[Scored | ApiError] = []
        submitted = received
        if uploads:
            outcomes, submitted = await self._in_pool(
                lambda: self._score_many(uploads, options), images=len(uploads)
            )
        done: list[tuple[PredictionResponse, Upload, Scored]] = []
        for (index, upload), outcome in zip(accepted, outcomes, strict=True):
            if isinstance(outcome, ApiError):
                items[index] = _failed_item(index, upload.filename, outcome, request_id)
                continue
            result = self._respond(
                request_id, upload, outcome, submitted, received, "/predict/batch", index
            )
            done.append((result, upload, outcome))
            items[index] = BatchItem(
                index=index, filename=upload.filename, status=200, result=result
            )
        await self._remember(done)
        answered = [item for item in items if item is not None]
        failed = sum(1 for item in answered if item.error is not None)
        return BatchResponse(
            request_id=request_id,
            model=self.model_ref,
            count=len(answered),
            failed=failed,
            items=answered,
        )


def _undecodable(exc: ImageDecodeError) -> ApiError:
    return ApiError(422, "undecodable_image", str(exc).strip().splitlines()[0])


def _failed_item(index: int, filename: str | None, exc: ApiError, request_id: str) -> BatchItem:
    error = ErrorResponse(detail=exc.detail, code=exc.code, request_id=request_id)
    return BatchItem(index=index, filename=filename, status=exc.status, error=error)
