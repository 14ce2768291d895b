"""Pure ASGI middleware (no body buffering: uploads stream through untouched).

- :class:`RequestContextMiddleware`: a request id (echoed as X-Request-ID), the security headers
  of :func:`security_headers` on every response, and request metrics.
- :class:`BodyLimitMiddleware`: 413 when the declared Content-Length is over MAX_UPLOAD_BYTES
  (before any of the body is read) or once the bytes read pass it, so an oversized upload is
  never held in memory (nor spooled to disk). The error goes through the API's JSON error
  handler (Starlette's own limiter answers in plain text).
"""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
# The pages (app.pages) load scripts, styles and images from the app itself and nowhere else, and
# run no inline script. Swagger UI and ReDoc set inline styles (ReDoc writes <style> elements), so
# their pages allow inline style; the review page does not.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'{style}; img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
DOCS_CSP = _PAGE_CSP.format(style=" 'unsafe-inline'")
UI_CSP = _PAGE_CSP.format(style="")
_DOCS_PAGES = ("/docs", "/redoc")
_UI_PAGES = ("/ui",)


def security_headers(path: str) -> dict[str, str]:
    """Headers every answer carries (a route may set its own Cache-Control)."""
    headers = dict(_SECURITY_HEADERS)
    if path in _DOCS_PAGES:
        headers["Content-Security-Policy"] = DOCS_CSP
    elif path in _UI_PAGES:
        headers["Content-Security-Policy"] = UI_CSP
    return headers


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = offered if _CLIENT_ID.match(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        extra_headers = security_headers(scope["path"])
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append(REQUEST_ID_HEADER, request_id)
                for name, value in extra_headers.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # a bounded label
            self.metrics.observe_request(
                scope["method"], route, status, time.perf_counter() - started
            )


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_long = declared.isdigit() and int(declared) > self.max_bytes
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if too_long:  # refused before a byte of the body is read
                raise BodyTooLargeError(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)  # answered by the error handler
            return message

        await self.app(scope, receive_within_limit, send)
