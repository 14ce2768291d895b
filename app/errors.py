"""Errors as JSON: one shape for every 4xx/5xx, never a stack trace or a server path.

Body: ``{"detail": "<one readable line>", "code": "<machine-readable>", "request_id": "..."}``;
validation errors (422) add ``errors``: where and what, without echoing the input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.middleware import REQUEST_ID_HEADER, security_headers

log = logging.getLogger("loomwatch.app")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",  # the body; an image's pixel count is "too_many_pixels"
    415: "unsupported_media_type",
    422: "invalid_input",
    503: "unavailable",
}


class ApiError(Exception):
    """A refusal the client can act on: status, a code, and one line saying why."""

    def __init__(
        self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "detail": self.detail}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail, "code": code, "request_id": request_id_of(request)}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status, exc.code, exc.detail, exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = str(exc.detail)
    code = STATUS_CODES.get(status, "http_error")
    return error_response(request, status, code, detail, exc.headers)


def _where(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in location]
    if len(parts) > 1 and parts[0] in ("query", "body", "path", "header"):
        kind = "query parameter" if parts[0] == "query" else parts[0]
        return f"{kind} '{'.'.join(parts[1:])}'"
    return ".".join(parts)


def _takes_a_form(request: Request) -> bool:
    """Whether the route reads its body as a form (the uploads), not as JSON."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    body = getattr(dependant, "body_params", None) or []
    return any(isinstance(field.field_info, params.Form) for field in body)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    declared = request.headers.get("content-type", "")
    body_missing = any(error.get("loc", ("",))[0] == "body" for error in exc.errors())
    upload = body_missing and _takes_a_form(request)
    if upload and declared and not declared.startswith("multipart/form-data"):
        detail = f"send images as multipart/form-data, not '{declared.split(';')[0]}'"
        return error_response(request, 415, "unsupported_media_type", detail)
    errors = [
        {"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", ""))}
        for error in exc.errors()
    ]
    first = exc.errors()[0] if exc.errors() else {}
    detail = f"{_where(first.get('loc', ()))}: {first.get('msg', 'invalid')}"
    return error_response(request, 422, "invalid_parameter", detail, errors=errors)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A 500 is answered outside the middleware (by Starlette's outermost error layer), so it
    adds the request id and the security headers itself."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    headers = security_headers(request.url.path)
    request_id = request_id_of(request)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    detail = "internal error; see the server log"
    return error_response(request, 500, "internal_error", detail, headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
