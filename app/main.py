"""The FastAPI application: `create_app(settings)`, and `app` for `uvicorn app.main:app`.

Start-up (lifespan) loads the one model from MODEL_URI and warms it; until that is done, and
once shutdown begins, /ready and the scoring routes answer 503. A model that cannot be loaded
stops start-up with :class:`~app.model.StartupError` (no fallback model).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from app.errors import install_error_handlers
from app.feedback.routes import feedback, install_feedback_errors
from app.feedback.store import FeedbackStore, FeedbackUnavailableError
from app.fleet import FleetModels, open_fleet
from app.inference_log import InferenceLog
from app.metrics import Metrics
from app.middleware import REQUEST_ID_HEADER, BodyLimitMiddleware, RequestContextMiddleware
from app.model import StartupError, load_model
from app.pages import install_pages
from app.pool import InferencePool
from app.routes import api, probes
from app.service import Scorer
from app.settings import Settings

log = logging.getLogger("loomwatch.app")

DESCRIPTION = """
Fabric-defect detection. POST an image of fabric to **/predict** and get its anomaly score, the
decision, the defect regions kept, the log of what post-processing suppressed and why, a mask
and per-stage timings. **/predict/overlay** answers the same as a picture.

Scores are normalised so that the calibrated threshold is **0.5**; raw scores are included.
When the service runs with `API_KEY`, use **Authorize** (X-API-Key or Bearer).
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    app.state.not_ready_reason = "loading the model"
    try:
        fleet = await run_in_threadpool(open_fleet, settings)  # one model per fabric, lazily
        model = None if fleet is not None else await run_in_threadpool(load_model, settings)
        store = app.state.feedback_store = await run_in_threadpool(open_store, settings)
    except StartupError as exc:
        app.state.startup_error = str(exc)
        app.state.not_ready_reason = str(exc)
        raise
    pool = InferencePool(settings.inference_workers, settings.max_queue_depth, metrics)
    inference_log = InferenceLog(
        settings.inference_log_path,
        settings.inference_log_max_bytes,
        settings.inference_log_backups,
        metrics.log_failures,
    )
    if fleet is not None:
        app.state.fleet = models = FleetModels(
            fleet,
            settings,
            lambda loaded: Scorer(loaded, pool, inference_log, metrics, settings, store),
        )
        models.start_polling()
        kind = str(fleet.manifest.get("model_type", "fleet"))
        metrics.model.info({"name": fleet.uri, "version": "fleet", "type": kind})
        log.info("ready: fleet %s (%s)", fleet.uri, ", ".join(fleet.fabrics))
    else:
        assert model is not None
        app.state.scorer = Scorer(model, pool, inference_log, metrics, settings, store)
        metrics.model.info({"name": model.name, "version": model.version, "type": model.type})
        log.info("ready: %s version %s", model.name, model.version)
    metrics.ready.set(1)
    try:
        yield
    finally:
        app.state.scorer = None
        fleet_models, app.state.fleet = app.state.fleet, None
        app.state.not_ready_reason = "shutting down"
        metrics.ready.set(0)
        await run_in_threadpool(pool.shutdown)
        if fleet_models is not None:
            await run_in_threadpool(fleet_models.close)
        if model is not None:
            await run_in_threadpool(model.close)  # the batcher's thread, if any
        inference_log.close()
        if store is not None:
            store.close()


def open_store(settings: Settings) -> FeedbackStore | None:
    """The feedback database, migrated to the newest schema. One that is down does not stop
    the service: scoring goes on, feedback answers 503, and the store retries on each use."""
    if not settings.database_url:
        return None
    try:
        store = FeedbackStore(
            settings.database_url,
            timeout_s=settings.database_timeout_s,
            image_dir=settings.feedback_image_dir,
            retention_days=settings.feedback_retention_days,
            thumbnails=settings.feedback_thumbnails,
        )
    except (ValueError, ImportError) as exc:  # a malformed URL, a driver not installed
        raise StartupError(f"DATABASE_URL: {str(exc).splitlines()[0]}") from None
    try:
        store.upgrade()
        store.purge_expired()
        log.info("feedback database %s ready", store.url)
    except FeedbackUnavailableError as exc:
        log.warning("%s; scoring goes on, predictions are not recorded until it is back", exc)
    return store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="Loomwatch",
        summary="Fabric-defect detection: anomaly scores, defect masks and suppression logs.",
        description=DESCRIPTION,
        version="1",
        lifespan=lifespan,
        docs_url=None,  # app.pages serves /docs and /redoc from the app's own files
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    app.state.scorer = None
    app.state.fleet = None  # MODEL_URI naming a fleet: app/fleet.py
    app.state.feedback_store = None
    app.state.not_ready_reason = "the model is not loaded (start-up has not run)"
    app.state.startup_error = None
    install_error_handlers(app)
    install_feedback_errors(app)
    app.include_router(probes)
    app.include_router(api)
    app.include_router(feedback)
    install_pages(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
