"""The routes: each validates, hands over to the scorer and returns what it shaped."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse

from app.deps import (
    MetricsDep,
    ModelDep,
    PredictOptionsDep,
    RequestIdDep,
    ScoreOptionsDep,
    SettingsDep,
    UploadScorerDep,
    require_api_key,
)
from app.errors import ApiError
from app.imaging import ACCEPTED_FORMATS, ACCEPTED_MODES
from app.schemas import (
    AcceptedInput,
    BatchResponse,
    ErrorResponse,
    HealthResponse,
    ModelRef,
    ModelResponse,
    ModelsResponse,
    PredictionResponse,
    ReadyResponse,
    ServedModelOut,
    SuppressionSettingsOut,
    example,
)

IMAGE_FILE = "PNG, JPEG, BMP or TIFF (grey, RGB, RGBA, palette or 16-bit; scored as 8-bit grey)"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "the multipart/form-data body is malformed",
        401: "API_KEY is set and the request has no valid key",
        413: "the body is over MAX_UPLOAD_BYTES, or the image declares more than MAX_PIXELS",
        415: "not a PNG, JPEG, BMP or TIFF (declared content type or actual bytes), or a body "
        "that is not multipart/form-data",
        404: "a fleet: no model for the fabric named; the detail lists the known fabrics",
        422: "undecodable image, or a bad parameter (a fleet: no fabric named)",
        503: "busy (queue full or timed out), model not ready, or (a fleet) the fabric's model "
        "cannot be loaded; see Retry-After",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


api = APIRouter(dependencies=[Depends(require_api_key)], responses=_errors(401))
probes = APIRouter(tags=["service"])


@api.post(
    "/predict",
    tags=["predict"],
    summary="Score one image",
    response_model=PredictionResponse,
    responses=_errors(400, 404, 413, 415, 422, 503),
)
async def predict(
    scorer: UploadScorerDep,
    request_id: RequestIdDep,
    options: PredictOptionsDep,
    file: Annotated[UploadFile, File(description=IMAGE_FILE)],
) -> PredictionResponse:
    """Anomaly score, decision, kept defect regions, the suppression log, the mask (and the
    heatmap when asked) and per-stage timings of one image."""
    return await scorer.predict(request_id, file, options)


@api.post(
    "/predict/batch",
    tags=["predict"],
    summary="Score several images",
    response_model=BatchResponse,
    responses=_errors(400, 404, 413, 415, 422, 503),
)
async def predict_batch(
    scorer: UploadScorerDep,
    request_id: RequestIdDep,
    options: PredictOptionsDep,
    files: Annotated[list[UploadFile], File(description=f"one or more images: {IMAGE_FILE}")],
) -> BatchResponse:
    """One item per file, in order: its result, or its own error (status, code, detail) when
    that image alone is refused; the other images are scored regardless."""
    return await scorer.predict_batch(request_id, files, options)


@api.post(
    "/predict/overlay",
    tags=["predict"],
    summary="Score one image and see it",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "PNG: heatmap over the fabric, kept regions in red, suppressed in "
            "yellow, padding greyed. Headers X-Loomwatch-Score, -Decision, -Regions and "
            "-Prediction-Id (when recorded).",
        },
        **_errors(400, 404, 413, 415, 422, 503),
    },
)
async def predict_overlay(
    scorer: UploadScorerDep,
    request_id: RequestIdDep,
    options: ScoreOptionsDep,
    file: Annotated[UploadFile, File(description=IMAGE_FILE)],
    wrap: Annotated[
        bool,
        Query(
            description="cut a wide strip into stacked rows so it fits a screen",
            openapi_examples=example(True),
        ),
    ] = True,
) -> Response:
    """The same inference as /predict, answered as a picture a person can look at."""
    overlay = await scorer.overlay(request_id, file, options, wrap)
    headers = {
        "X-Loomwatch-Score": f"{overlay.result.score:.4f}",
        "X-Loomwatch-Decision": overlay.result.decision,
        "X-Loomwatch-Regions": str(len(overlay.result.regions)),
    }
    if overlay.result.prediction_id:
        headers["X-Loomwatch-Prediction-Id"] = overlay.result.prediction_id
    return Response(overlay.png, media_type="image/png", headers=headers)


@api.get(
    "/model",
    tags=["service"],
    summary="The model being served",
    response_model=ModelResponse,
    responses=_errors(404, 422, 503),
)
def model_info(model: ModelDep, settings: SettingsDep) -> ModelResponse:
    """Name, version, type, config, calibration, training metrics and the input it accepts."""
    manifest = model.detector.manifest
    accepted = AcceptedInput(
        formats=list(ACCEPTED_FORMATS),
        content_types=list(ACCEPTED_FORMATS.values()),
        modes=list(ACCEPTED_MODES),
        max_upload_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
        max_batch_files=settings.max_batch_files,
    )
    return ModelResponse(
        runtime=model.runtime,
        name=model.name,
        version=model.version,
        type=model.type,
        uri=model.uri,
        digest=model.digest,
        created=manifest.created,
        config=manifest.config,
        pipeline=manifest.pipeline.model_dump(),
        calibration=manifest.calibration.model_dump(),
        suppression=SuppressionSettingsOut.model_validate(model.suppression.model_dump()),
        training=manifest.training,
        metrics=manifest.metrics,
        versions=manifest.versions,
        accepted_input=accepted,
    )


@api.get(
    "/models",
    tags=["service"],
    summary="The models being served",
    response_model=ModelsResponse,
    responses=_errors(503),
)
def models_served(request: Request, settings: SettingsDep) -> ModelsResponse:
    """One entry per model: for a fleet, every fabric it has a model for (loaded or not, and
    what version is loaded); for one model, that model. GET /model?fabric=FF gives the details."""
    fleet = request.app.state.fleet
    limits = settings.max_loaded_models, settings.model_poll_s
    if fleet is not None:
        rows = [ServedModelOut.model_validate(row) for row in fleet.describe()]
        return ModelsResponse(
            fleet=fleet.fleet.uri, models=rows, max_loaded_models=limits[0], poll_s=limits[1]
        )
    scorer = request.app.state.scorer
    if scorer is None:
        raise ApiError(503, "not_ready", request.app.state.not_ready_reason)
    model = scorer.model
    row = ServedModelOut(fabric=model.fabric, uri=model.uri, loaded=True, name=model.name,
                         version=model.version, type=model.type, digest=model.digest)  # fmt: skip
    return ModelsResponse(fleet=None, models=[row], max_loaded_models=limits[0], poll_s=limits[1])


@api.get(
    "/metrics",
    tags=["service"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(metrics: MetricsDep) -> Response:
    """Requests and latency by route and status, inference time per stage, queue depth,
    anomaly rate, kept and suppressed regions, inference-log failures."""
    return Response(metrics.render(), media_type=metrics.content_type)


@probes.get("/health", summary="Alive", response_model=HealthResponse)
def health() -> HealthResponse:
    """200 while the process answers, whether or not the model is ready."""
    try:
        version = metadata.version("loomwatch")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return HealthResponse(version=version)


@probes.get(
    "/ready",
    summary="Model loaded and warmed",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready; the reason says why"}},
)
def ready(request: Request, settings: SettingsDep) -> ReadyResponse | JSONResponse:
    """200 once the model is loaded and warmed up; 503 with the reason otherwise."""
    fleet = request.app.state.fleet
    if fleet is not None:  # ready once its manifest is read: models load on first use
        kind = str(fleet.fleet.manifest.get("model_type", "fleet"))
        ref = ModelRef(name=fleet.fleet.uri, version=f"fleet of {len(fleet.fleet.fabrics)}",
                       type=kind)  # fmt: skip
        return ReadyResponse(status="ready", model=ref, warmup_ms=0.0, backend=settings.backend,
                             device=settings.device, precision=settings.precision)  # fmt: skip
    scorer = request.app.state.scorer
    if scorer is None:
        body = ReadyResponse(status="not_ready", reason=request.app.state.not_ready_reason)
        headers = {"Retry-After": str(settings.retry_after_s * 5)}
        return JSONResponse(body.model_dump(mode="json"), status_code=503, headers=headers)
    model = scorer.model
    ref = ModelRef(name=model.name, version=model.version, type=model.type)
    runtime = model.runtime
    return ReadyResponse(
        status="ready",
        model=ref,
        warmup_ms=round(model.warmup_ms, 1),
        backend=runtime["backend"],
        device=runtime["device"],
        precision=runtime["precision"],
    )


@probes.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/docs")
