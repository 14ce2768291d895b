"""`loomwatch serve`: the app under uvicorn, with start-up failures as one clear line."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.listen import listen_problem, setting_error, settings_with
from app.main import create_app
from app.model import StartupError

EXIT_STARTUP_FAILED = 2
log = logging.getLogger("loomwatch.app")


class _HideStartupTraceback(logging.Filter):
    """Uvicorn logs the lifespan's traceback; a StartupError is reported as one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Traceback") and StartupError.__name__ in message)


@contextmanager
def _sigterm_is_a_normal_stop() -> Iterator[None]:
    """Uvicorn handles SIGTERM itself (stop accepting, let in-flight requests finish, shut the
    app down) and then raises the signal again under the handler that was there before, which by
    default kills the process (status -15). A stop that was asked for and went well exits 0."""
    try:
        previous = signal.signal(signal.SIGTERM, _ignore_signal)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    log.info("stopped by signal %d", signum)


def run(
    model_uri: str | None = None,
    host: str | None = None,
    port: int | None = None,
    backend: str | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> int:
    """Serve until interrupted; arguments override the settings (environment, .env).

    Returns the exit status: 0 after a normal shutdown (SIGTERM included: requests in flight
    get up to SHUTDOWN_TIMEOUT_S to finish, new connections are refused), 2 when start-up failed
    (no model, a bad setting, a port already taken: all before the model is loaded).
    """
    try:
        settings = settings_with(model_uri, host, port, backend, device, precision)
    except ValidationError as exc:
        print(f"loomwatch: error: {setting_error(exc)}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    if not settings.model_uri:
        print("loomwatch: error: no model: pass --model-uri or set MODEL_URI", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    problem = listen_problem(settings.host, settings.port)
    if problem:
        print(f"loomwatch: error: {problem}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        server_header=False,
    )
    logging.getLogger("uvicorn.error").addFilter(_HideStartupTraceback())
    server = uvicorn.Server(config)
    try:
        with _sigterm_is_a_normal_stop():
            server.run()
    except SystemExit:  # uvicorn exits (status 3) when start-up fails
        if server.started:
            raise
    if not server.started:
        reason = app.state.startup_error or "the server did not start (see the log above)"
        print(f"loomwatch: error: {reason}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    return 0
