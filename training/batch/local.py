"""The local engine: a pool of worker processes on this machine (one worker: this process).

Each worker loads the model once (the pool's initializer) and scores chunks of a few images;
the parent collects the rows in order of completion and writes a checkpoint every
``checkpoint_every`` rows. Workers are started with ``spawn``: a fresh interpreter each, so no
PyTorch or OpenMP state is inherited by ``fork``.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import pyarrow as pa

from models.pipeline import Detector
from training.batch.output import write_checkpoint
from training.batch.schema import ImageFile, to_batch
from training.batch.scoring import WorkerSettings, score_file, score_files, worker_detector

CHUNK = 4  # images per task: small enough to balance the workers, large enough to be cheap

_SETTINGS: WorkerSettings | None = None


def _start_worker(settings: WorkerSettings) -> None:
    global _SETTINGS
    _SETTINGS = settings
    worker_detector(settings)  # the model loads once, before the first chunk


def _score_chunk(images: Sequence[ImageFile]) -> list[dict[str, Any]]:
    assert _SETTINGS is not None, "worker not initialised"
    return list(score_files(images, _SETTINGS))


def run_local(
    images: Sequence[ImageFile],
    settings: WorkerSettings,
    workers: int,
    work: Path,
    checkpoint_every: int,
    on_rows: Callable[[int], None] = lambda n: None,
    detector: Detector | None = None,
) -> int:
    """Score ``images`` in ``workers`` processes, checkpointing into ``work``; the row count.

    With one worker and the driver's ``detector`` the images are scored in this process: no
    second interpreter to start and no second copy of the model to load."""
    if not images:
        return 0
    chunks = [images[i : i + CHUNK] for i in range(0, len(images), CHUNK)]
    pending: list[dict[str, Any]] = []
    written = 0

    def flush() -> None:
        nonlocal written
        if pending:
            write_checkpoint(work, pa.Table.from_batches([to_batch(pending)]))
            written += len(pending)
            pending.clear()

    if workers == 1 and detector is not None:
        try:
            for image in images:
                pending.append(score_file(detector, image, settings))
                on_rows(1)
                if len(pending) >= checkpoint_every:
                    flush()
        finally:
            flush()
        return written

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(settings,),
    ) as pool:
        queue = iter(chunks)
        running: set[Future[list[dict[str, Any]]]] = set()
        for chunk in queue:  # two chunks per worker in flight: no idle worker, little queued
            running.add(pool.submit(_score_chunk, chunk))
            if len(running) >= 2 * workers:
                break
        try:
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    rows = future.result()
                    pending.extend(rows)
                    on_rows(len(rows))
                    next_chunk = next(queue, None)
                    if next_chunk is not None:
                        running.add(pool.submit(_score_chunk, next_chunk))
                if len(pending) >= checkpoint_every:
                    flush()
        finally:  # what was scored before a failure or Ctrl-C is kept for the next run
            flush()
    return written
