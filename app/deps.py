"""FastAPI dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Form, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError
from app.feedback.store import FeedbackStore
from app.metrics import Metrics
from app.model import LoadedModel
from app.schemas import MaskFormat, ScoreOptions, example
from app.service import Scorer
from app.settings import Settings

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="the API_KEY the service was started with"
)
bearer = HTTPBearer(auto_error=False, description="the same key as `Authorization: Bearer KEY`")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_request_id(request: Request) -> str:
    return str(request.state.request_id)


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


FABRIC_HELP = (
    "the fabric whose model scores the image, when the service serves a fleet (one model per "
    "fabric: GET /models lists them); required there (422 without it, 404 for a fabric it has no "
    "model for); ignored by a single model"
)
FabricQuery = Annotated[str | None, Query(description=FABRIC_HELP, openapi_examples=example("02"))]
FabricForm = Annotated[str | None, Form(alias="fabric", description=FABRIC_HELP)]


async def get_scorer(
    request: Request, settings: SettingsDep, metrics: MetricsDep, fabric: FabricQuery = None
) -> Scorer:
    fleet = request.app.state.fleet
    if fleet is not None:  # one model per fabric, loaded on first use (app/fleet.py)
        chosen: Scorer = await run_in_threadpool(fleet.scorer, fabric)
        return chosen
    scorer: Scorer | None = request.app.state.scorer
    if scorer is None:
        metrics.rejected.labels(reason="not_ready").inc()
        reason = request.app.state.not_ready_reason
        raise ApiError(503, "not_ready", reason, {"Retry-After": str(settings.retry_after_s * 5)})
    return scorer


ScorerDep = Annotated[Scorer, Depends(get_scorer)]


async def get_upload_scorer(
    request: Request,
    settings: SettingsDep,
    metrics: MetricsDep,
    fabric: FabricQuery = None,
    fabric_field: FabricForm = None,
) -> Scorer:
    """The scorer of an upload: ``fabric`` as a query parameter or a form field (a fleet)."""
    return await get_scorer(request, settings, metrics, fabric or fabric_field)


UploadScorerDep = Annotated[Scorer, Depends(get_upload_scorer)]


def get_model(scorer: ScorerDep) -> LoadedModel:
    return scorer.model


ModelDep = Annotated[LoadedModel, Depends(get_model)]


def get_store(request: Request) -> FeedbackStore:
    store: FeedbackStore | None = request.app.state.feedback_store
    if store is None:
        detail = "no feedback database: the service runs with DATABASE_URL empty"
        raise ApiError(503, "database_unavailable", detail)
    return store


StoreDep = Annotated[FeedbackStore, Depends(get_store)]


def require_api_key(
    settings: SettingsDep,
    key: Annotated[str | None, Security(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    expected = settings.api_key
    if expected is None:
        return
    offered = key if key is not None else (credentials.credentials if credentials else None)
    if offered is None or not hmac.compare_digest(
        offered.encode(), expected.get_secret_value().encode()
    ):
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required (header X-API-Key or Authorization: Bearer)",
            {"WWW-Authenticate": "Bearer"},
        )


ThresholdQuery = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        description="normalised image threshold (the calibrated one is 0.5)",
        openapi_examples=example(0.5),
    ),
]
MinAreaQuery = Annotated[
    int | None,
    Query(
        ge=0,
        description="suppress regions with fewer fabric pixels (default: the service's)",
        openapi_examples=example(10),
    ),
]
MinPeakQuery = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        description="suppress regions whose normalised peak is lower (default: the service's)",
        openapi_examples=example(0.5),
    ),
]
VetoMarginQuery = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        description="a score this far above the threshold is never vetoed by suppression "
        "(default: the service's)",
        openapi_examples=example(0.05),
    ),
]
HeatmapQuery = Annotated[
    bool,
    Query(
        description="also return the anomaly heatmap as a colour PNG",
        openapi_examples=example(False),
    ),
]
MaskQuery = Annotated[
    MaskFormat,
    Query(
        description="kept-region mask: base64 PNG, run-length (COCO), or none",
        openapi_examples=example("png"),
    ),
]


def score_options(
    threshold: ThresholdQuery = None,
    min_region_area: MinAreaQuery = None,
    min_region_peak: MinPeakQuery = None,
    veto_margin: VetoMarginQuery = None,
) -> ScoreOptions:
    return ScoreOptions(threshold, min_region_area, min_region_peak, veto_margin=veto_margin)


def predict_options(
    threshold: ThresholdQuery = None,
    min_region_area: MinAreaQuery = None,
    min_region_peak: MinPeakQuery = None,
    veto_margin: VetoMarginQuery = None,
    heatmap: HeatmapQuery = False,
    mask: MaskQuery = MaskFormat.png,
) -> ScoreOptions:
    return ScoreOptions(threshold, min_region_area, min_region_peak, heatmap, mask, veto_margin)


ScoreOptionsDep = Annotated[ScoreOptions, Depends(score_options)]
PredictOptionsDep = Annotated[ScoreOptions, Depends(predict_options)]
