"""Dynamic batching: the tiles of concurrent callers scored in shared forward passes.

An accelerator runs a pass of 64 tiles in little more time than a pass of 8, so a service that
scores each request's tiles alone leaves most of it idle. :class:`BatchingNetwork` wraps any
:class:`~models.network.Network`: callers (the service's inference workers, each doing its own
decoding, post-processing and PNG encoding on the CPU) hand it their tiles and wait; one thread
owns the network and runs passes of up to ``max_batch`` tiles, gathered from every caller that
is waiting. A pass starts when ``max_batch`` tiles are queued or ``max_wait_ms`` after the first
of them arrived, whichever is sooner (0: at once, with whatever is queued: while a pass runs,
the next one fills up by itself). A caller with more tiles than ``max_batch`` is split over
passes. Tiles are scored independently, so results do not depend on who shared a pass.

The service turns it on for accelerators (``BATCH_MAX_TILES``); on the CPU, where a pass costs
in proportion to its tiles, it only adds a hop between threads and is off by default.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from models.network import Network


@dataclass
class _Piece:
    tiles: np.ndarray
    valid: np.ndarray
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    maps: np.ndarray | None = None
    scores: np.ndarray | None = None
    error: BaseException | None = None


class BatcherClosedError(RuntimeError):
    """The batcher was closed (the service is shutting down)."""


class BatchingNetwork:
    """A :class:`~models.network.Network` whose passes gather the tiles of concurrent callers."""

    def __init__(self, network: Network, max_batch: int, max_wait_ms: float = 0.0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.network = network
        self.backend = network.backend
        self.device = network.device
        self.precision = network.precision
        self.max_batch = max_batch
        self.max_wait = max(max_wait_ms, 0.0) / 1000.0
        self._queue: deque[_Piece] = deque()
        self._queued_tiles = 0
        self._condition = threading.Condition()
        self._closed = False
        self.passes = 0  # forward passes run
        self.tiles_run = 0  # tiles scored in them
        self._thread = threading.Thread(target=self._serve, name="loomwatch-batcher", daemon=True)
        self._thread.start()

    @property
    def model(self) -> object:
        """The wrapped network's model (a TorchNetwork's), for report pictures."""
        return getattr(self.network, "model", None)

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pieces = [
            _Piece(tiles[start : start + self.max_batch], valid[start : start + self.max_batch])
            for start in range(0, len(tiles), self.max_batch)
        ]
        if not pieces:
            return self.network.run(tiles, valid)
        with self._condition:
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            self._queue.extend(pieces)
            self._queued_tiles += len(tiles)
            self._condition.notify_all()
        for piece in pieces:
            piece.done.wait()
            if piece.error is not None:
                raise piece.error
        maps = np.concatenate([piece.maps for piece in pieces if piece.maps is not None])
        scores = np.concatenate([piece.scores for piece in pieces if piece.scores is not None])
        return maps, scores

    def _gather(self) -> list[_Piece] | None:
        """The pieces of the next pass (None once closed and drained)."""
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].arrived + self.max_wait
            while self._queued_tiles < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            taken: list[_Piece] = []
            count = 0
            while self._queue and (
                not taken or count + len(self._queue[0].tiles) <= self.max_batch
            ):
                piece = self._queue.popleft()
                taken.append(piece)
                count += len(piece.tiles)
            self._queued_tiles -= count
            return taken

    def _serve(self) -> None:
        while True:
            taken = self._gather()
            if taken is None:
                return
            try:
                tiles = np.concatenate([piece.tiles for piece in taken])
                valid = np.concatenate([piece.valid for piece in taken])
                maps, scores = self.network.run(tiles, valid)
                self.passes += 1
                self.tiles_run += len(tiles)
                start = 0
                for piece in taken:
                    stop = start + len(piece.tiles)
                    piece.maps, piece.scores = maps[start:stop], scores[start:stop]
                    start = stop
            except BaseException as exc:  # every caller of the pass gets the error
                for piece in taken:
                    piece.error = exc
            finally:
                for piece in taken:
                    piece.done.set()

    def close(self) -> None:
        """Finish the queued passes, then stop the thread; later calls raise."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()
