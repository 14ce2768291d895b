"""Where the service listens, checked before anything is loaded: a taken port fails at once.

Light on purpose (no torch, no FastAPI): ``loomwatch serve`` and ``loomwatch demo`` ask here
before they import the application or load a model.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from pydantic import ValidationError

from app.settings import Settings


def settings_with(
    model_uri: str | None,
    host: str | None,
    port: int | None,
    backend: str | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> Settings:
    """The settings (environment, .env) with the arguments that were given laid over them."""
    given: dict[str, Any] = {"model_uri": model_uri, "host": host, "port": port}
    given.update(backend=backend, device=device, precision=precision)
    return Settings(**{key: value for key, value in given.items() if value is not None})


def setting_error(exc: ValidationError) -> str:
    """A settings error in one line: ``setting PORT: Input should be ...``."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]).upper()
    return f"setting {where}: {first['msg']}"


def listen_problem(host: str, port: int) -> str | None:
    """Why the service could not listen on host:port right now, in one line; None if it can.

    Checked before the model is loaded, so a taken port fails in a second, not after start-up.
    The probe binds as uvicorn does (SO_REUSEADDR: a port in TIME_WAIT is free) and lets go.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}: {exc.strerror}; choose another with --host or HOST"
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {port} on {host} is already in use; choose another with --port N (or PORT=N)"
            )
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def address_problem(host: str | None = None, port: int | None = None) -> str | None:
    """Why `run(host=host, port=port)` could not listen (its settings, or the port), or None."""
    try:
        settings = settings_with(None, host, port)
    except ValidationError as exc:
        return setting_error(exc)
    return listen_problem(settings.host, settings.port)
