"""The pages a person opens in a browser, served from the app's own files so they work offline.

- ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc): the viewers' scripts and styles come from the
  ``fastapi-offline`` package (mounted at ``/static/vendor``), never from a CDN; each page starts
  its viewer from a script file of ours (``app/static``), so no page runs inline script.
- ``/ui``: the review page (``app/static/ui.*``).

The pages hold no data: what they show comes from the API, with the key the user gives the
page. Their Content-Security-Policy is in :func:`app.middleware.security_headers`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
VENDOR_PACKAGE = ("fastapi_offline", "static")  # Swagger UI, ReDoc and a favicon

pages = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8")


@pages.get("/docs")
def swagger_ui() -> FileResponse:
    return _page("docs.html")


@pages.get("/redoc")
def redoc() -> FileResponse:
    return _page("redoc.html")


@pages.get("/ui")
def review() -> FileResponse:
    return _page("ui.html")


def install_pages(app: FastAPI) -> None:
    """The page routes and the static files they load (vendor files first: /static matches
    every path below it)."""
    app.include_router(pages)
    app.mount("/static/vendor", StaticFiles(packages=[VENDOR_PACKAGE]), name="vendor")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
