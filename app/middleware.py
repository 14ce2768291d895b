"""Pure ASGI middleware (no body buffering: uploads stream through untouched).

- :class:`RequestContextMiddleware`: a request id (echoed as X-Request-ID) and request metrics.
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
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
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
