"""A bounded pool of inference threads: CPU work never runs on the event loop.

At most ``workers`` jobs run at once and at most ``max_queue`` more wait; a job beyond that is
refused at once (:class:`QueueFullError`, answered 503 with Retry-After) instead of piling up.
A caller that gives up (:class:`InferenceTimeoutError`) cancels its job if it has not started;
a running job finishes, and its slot is freed only then, so the bound always holds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from app.metrics import Metrics

T = TypeVar("T")


class QueueFullError(RuntimeError):
    pass


class InferenceTimeoutError(RuntimeError):
    pass


class InferencePool:
    def __init__(self, workers: int, max_queue: int, metrics: Metrics) -> None:
        self.workers = workers
        self.capacity = workers + max_queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._metrics = metrics
        self._lock = threading.Lock()
        self._pending = 0  # waiting + running
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue `fn` or raise QueueFullError; the returned future is a plain thread future."""
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFullError(f"{self._pending} inference jobs in flight")
            self._pending += 1
            self._waiting += 1
            self._metrics.queue_depth.set(self._waiting)
        queued_at = time.perf_counter()

        def job() -> T:
            with self._lock:
                self._waiting -= 1
                self._metrics.queue_depth.set(self._waiting)
            self._metrics.queue_wait.observe(time.perf_counter() - queued_at)
            with self._metrics.in_progress.track_inprogress():
                return fn()

        try:
            future = self._executor.submit(job)
        except RuntimeError:  # shut down
            self._release(None, waiting=True)
            raise QueueFullError("the service is shutting down") from None
        future.add_done_callback(self._release)
        return future

    def _release(self, future: Future[T] | None, waiting: bool = False) -> None:
        with self._lock:
            self._pending -= 1
            if waiting or (future is not None and future.cancelled()):
                self._waiting -= 1
                self._metrics.queue_depth.set(self._waiting)

    async def run(self, fn: Callable[[], T], timeout: float) -> T:
        """Run `fn` in the pool and wait for it at most `timeout` seconds."""
        future = self.submit(fn)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            raise InferenceTimeoutError(f"no result within {timeout:g} s") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
