"""The feedback routes: recent predictions, one prediction, its pictures, and feedback on it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from app.deps import MetricsDep, StoreDep, require_api_key
from app.errors import ApiError, error_response
from app.feedback.schemas import FeedbackIn, FeedbackOut, PredictionList, PredictionRecord
from app.feedback.store import RECENT_MAX, FeedbackUnavailableError, UnknownPredictionError
from app.feedback.tables import Verdict
from app.imaging import ACCEPTED_FORMATS
from app.schemas import ErrorResponse

PredictionId = Annotated[
    str, Path(max_length=64, description="the prediction_id that /predict answered")
]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API_KEY is set and the request has no valid key"},
    404: {"model": ErrorResponse, "description": "no prediction has this id, or no such picture"},
    422: {"model": ErrorResponse, "description": "a bad parameter or body"},
    503: {"model": ErrorResponse, "description": "the feedback database is off or unavailable"},
}

feedback = APIRouter(
    prefix="/predictions",
    tags=["feedback"],
    dependencies=[Depends(require_api_key)],
    responses=ERRORS,
)


async def _unknown(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, 404, "unknown_prediction", "no prediction has this id")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    request.app.state.metrics.database_failures.inc()
    retry = {"Retry-After": str(request.app.state.settings.retry_after_s * 5)}
    return error_response(request, 503, "database_unavailable", str(exc), retry)


def install_feedback_errors(app: FastAPI) -> None:
    """The store's refusals as API errors: 404 for an unknown id, 503 for a database down."""
    app.add_exception_handler(UnknownPredictionError, _unknown)
    app.add_exception_handler(FeedbackUnavailableError, _unavailable)


@feedback.get("", summary="Recent predictions", response_model=PredictionList)
def recent(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=RECENT_MAX)] = 50,
    decision: Annotated[Literal["anomalous", "normal"] | None, Query()] = None,
    fabric: Annotated[str | None, Query(max_length=64)] = None,
    verdict: Annotated[
        Verdict | Literal["none"] | None,
        Query(description="the newest feedback's; none: predictions without feedback"),
    ] = None,
    before: Annotated[datetime | None, Query(description="older than this (paging)")] = None,
) -> PredictionList:
    """Newest first, with their feedback; filter by decision, fabric and verdict."""
    rows = store.recent(limit, decision, fabric, verdict, before)
    items = [PredictionRecord.of(row) for row in rows]
    return PredictionList(count=len(items), items=items, fabrics=store.fabrics())


@feedback.get("/{prediction_id}", summary="One prediction", response_model=PredictionRecord)
def one(store: StoreDep, prediction_id: PredictionId) -> PredictionRecord:
    """What was decided, by which model, on which image (digest), and all feedback on it."""
    return PredictionRecord.of(store.get(prediction_id))


def _picture(content: bytes | None, media_type: str, missing: str) -> Response:
    if content is None:
        raise ApiError(404, "no_picture", missing)
    return Response(
        content, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"}
    )


@feedback.get(
    "/{prediction_id}/thumbnail",
    summary="The overlay, small",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def thumbnail(store: StoreDep, prediction_id: PredictionId) -> Response:
    """At most 512 x 128 px; 404 when thumbnails are off or past their retention."""
    row = store.get(prediction_id)
    return _picture(row.thumbnail_png, "image/png", "no thumbnail kept for this prediction")


@feedback.get(
    "/{prediction_id}/image",
    summary="The image as it was posted",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}},
)
def image(store: StoreDep, prediction_id: PredictionId) -> Response:
    """Only when the service keeps images (FEEDBACK_IMAGE_DIR) and within their retention."""
    content, image_format = store.kept_image(prediction_id)
    media_type = ACCEPTED_FORMATS.get(image_format, "application/octet-stream")
    return _picture(content, media_type, "the image was not kept")


@feedback.post(
    "/{prediction_id}/feedback",
    summary="Say what it really was",
    status_code=201,
    response_model=FeedbackOut,
)
def give_feedback(
    store: StoreDep,
    metrics: MetricsDep,
    prediction_id: PredictionId,
    body: FeedbackIn,
) -> FeedbackOut:
    """real_defect, false_alarm or missed_defect, with an optional note; a later feedback on
    the same prediction replaces its verdict (all are kept)."""
    row = store.add_feedback(prediction_id, body.verdict, body.note, body.reviewer)
    metrics.feedback.labels(verdict=body.verdict.value).inc()
    return FeedbackOut.of(row)
