"""The inference log: one JSON line per prediction, written off the request path.

A request only puts its record on a bounded in-memory queue (``QueueHandler``); a background
thread (``QueueListener``) serialises it and appends it to a size-rotated file
(``RotatingFileHandler``). Any failure — a full queue, an unwritable file, a full disk — is
counted in ``loomwatch_inference_log_failures_total`` and never reaches the request.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
from pathlib import Path
from typing import Any, cast

from prometheus_client import Counter

QUEUE_SIZE = 10_000
STOP_TIMEOUT_S = 30.0  # at shutdown, the longest wait for the writer to take the last records
log = logging.getLogger("loomwatch.app")


class _JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(getattr(record, "payload", {}), separators=(",", ":"), allow_nan=False)


class _CountingQueueHandler(logging.handlers.QueueHandler):
    def __init__(self, target: queue.Queue[Any], failures: Counter) -> None:
        super().__init__(target)
        self.failures = failures

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatting (JSON) happens in the listener thread

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging API)
        self.failures.inc()


class _CountingFileHandler(logging.handlers.RotatingFileHandler):
    def __init__(self, path: Path, max_bytes: int, backups: int, failures: Counter) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, delay=True)
        self.failures = failures
        self._warned = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging API)
        self.failures.inc()
        if not self._warned:  # once: the counter tells how often
            self._warned = True
            log.warning("cannot write the inference log %s", self.baseFilename)


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        """The stock listener uses put_nowait, which raises when a burst (or a slow disk) has
        filled the queue, and then never stops: wait for the writer to make room instead."""
        records = cast("queue.Queue[Any]", self.queue)
        records.put(getattr(self, "_sentinel", None), timeout=STOP_TIMEOUT_S)


class InferenceLog:
    """Append-only JSON lines; `close()` flushes what is queued."""

    def __init__(self, path: Path | None, max_bytes: int, backups: int, failures: Counter) -> None:
        self.path = path
        self._logger = logging.getLogger(f"loomwatch.inference.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._listener: _Listener | None = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("inference log folder %s cannot be created: %s", path.parent, exc)
        records: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        writer = _CountingFileHandler(path, max_bytes, backups, failures)
        writer.setFormatter(_JsonLineFormatter())
        self._handler = _CountingQueueHandler(records, failures)
        self._logger.addHandler(self._handler)
        self._listener = _Listener(records, writer)
        self._listener.start()

    def append(self, payload: dict[str, Any]) -> None:
        if self._listener is not None:
            self._logger.info("prediction", extra={"payload": payload})

    def close(self) -> None:
        if self._listener is None:
            return
        self._logger.removeHandler(self._handler)
        try:
            self._listener.stop()  # writes what is still queued
        except queue.Full:
            log.warning("the inference log writer is stuck; records still queued are lost")
        for handler in self._listener.handlers:
            try:
                handler.close()
            except OSError:  # the last flush hit the same full or read-only disk
                log.warning("the inference log could not be closed cleanly")
        self._listener = None
