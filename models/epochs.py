"""The epoch loop shared by the models that train by gradient descent (VAE, DRAEM).

:func:`fit_epochs` is the whole fit: shuffled batches of the tiles, one training step per batch
(the model's own), epochs under the deadline. :func:`run_epochs` runs the epochs until
``max_epochs`` or the deadline, keeps the best state by the validation criterion
(``FitContext.validate``, higher is better) or else by the lowest value of a loss the model
names, reports one :class:`EpochLog` per epoch, shows progress, and restores the best state at
the end. Training time is not thrown away: the epoch the deadline cuts short counts
(its metrics are the mean over the batches it ran, ``epoch_fraction`` says how many), and the
time the last validation took is kept back from training so that the final state is scored
before the deadline too. On a loaded CPU one DRAEM epoch can take minutes; discarding the
unfinished one had left a 15-minute budget with a single epoch.

Devices: a model may split its step into a host-side data stage (``prepare``: augmentation and
anomaly synthesis on the CPU, in the order the seed fixes) and the device step (``train_batch``).
On an accelerator the data stage of the next batch runs in a background thread while the device
trains on this one (:class:`Prefetch`), in the same order, so the same seed draws the same
batches on every device; on the CPU the two run one after the other, as they always did.
With ``FitContext.profile`` the loop times each step's parts: ``data`` (the wait for the next
prepared batch), and what the model times itself (``forward``, ``backward``), the device
synchronised around each part; their means per step end in the summary (``step_*_ms``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.base import EpochLog, FitContext, TileData

log = logging.getLogger(__name__)


@dataclass
class EpochOutcome:
    """What one (possibly cut short) epoch of training did: its mean metrics over ``batches``
    batches, and whether it ran to the end of the data."""

    metrics: dict[str, float]
    batches: int
    finished: bool


@dataclass
class EpochTotals:
    """Running sums of one epoch's per-batch metrics, reported as means over the batches run;
    ``last`` holds values reported as they were at the last batch (learning rate, KL weight)."""

    sums: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    finished: bool = False
    non_finite: bool = False

    def add(self, values: dict[str, float], last: dict[str, float] | None = None) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.last.update(last or {})
        self.batches += 1

    def outcome(self) -> EpochOutcome | None:
        """The epoch's outcome; None when a loss was not finite."""
        if self.non_finite:
            return None
        count = max(self.batches, 1)
        metrics = {key: value / count for key, value in self.sums.items()} | self.last
        return EpochOutcome(metrics, self.batches, self.finished)


# One epoch of training, ``(epoch, stop_at)`` -> its outcome; the epoch stops before a batch
# that would start at or after ``stop_at`` (time.monotonic()). None: the loss was not finite.
EpochStep = Callable[[int, float], EpochOutcome | None]


def batches(
    loader: Iterable[Any], context: FitContext, epoch: int, total: int | None = None
) -> Iterator[Any]:
    """The loader's batches with a progress bar of their own, gone when the epoch ends: on a
    CPU one epoch can take minutes, and the epoch bar alone would show nothing for that long.
    """
    yield from tqdm(
        loader, desc=f"epoch {epoch}", total=total, leave=False, disable=not context.progress
    )


class Prefetch:
    """The prepared batches of ``loader``, made ``depth`` ahead in a background thread.

    Used on accelerators: the host prepares the next batch while the device trains on this one.
    The batches come in the loader's order and are prepared one after the other, so random
    draws happen in the same order as without it. Closing it (``with``) stops the thread.
    """

    _END = object()

    def __init__(
        self, loader: Iterable[Any], prepare: Callable[[Any], Any], depth: int = 2
    ) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(loader, prepare), name="loomwatch-prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, loader: Iterable[Any], prepare: Callable[[Any], Any]) -> None:
        try:
            for batch in loader:
                item = prepare(batch)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as exc:  # handed to the training thread, raised there
            self._queue.put(exc)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a worker waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)


# One training step on a prepared batch, ``(progress, batch)`` -> (metrics averaged over the
# epoch, values reported as at its last batch); ``progress`` counts epochs, fractions included.
# The metrics hold "loss": fitting stops when it is not finite.
BatchStep = Callable[[float, Any], tuple[dict[str, float], dict[str, float]]]


def _as_is(batch: Any) -> Any:
    return batch


def train_epoch(
    loader: DataLoader[Any],
    context: FitContext,
    train_batch: BatchStep,
    epoch: int,
    stop_at: float,
    name: str,
    prepare: Callable[[Any], Any] = _as_is,
) -> EpochTotals:
    """One pass over the tiles; stops early (finished=False) at ``stop_at`` or a NaN loss."""
    totals = EpochTotals()
    steps = len(loader)
    background = context.prefetch if context.prefetch is not None else not context.runtime.on_cpu
    source: Iterable[Any] = Prefetch(loader, prepare) if background else map(prepare, loader)
    try:
        stream = iter(batches(source, context, epoch, steps))
        for index in range(steps):
            if time.monotonic() >= stop_at:
                return totals
            with context.timer.stage("data", sync=False):
                batch = next(stream, None)
            if batch is None:
                break
            values, last = train_batch(epoch + index / steps, batch)
            if not math.isfinite(values["loss"]):
                log.warning("%s loss is not finite at epoch %d; fitting stops", name, epoch)
                totals.non_finite = True
                return totals
            totals.add(values, last)
        # Ask once more, as a for loop over the loader does: its sampler draws one more
        # permutation from the generator when it runs out, and later epochs depend on that
        # (the background thread runs the loader out by itself).
        next(stream, None)
    finally:
        if isinstance(source, Prefetch):
            source.__exit__(None, None, None)
    totals.finished = True
    return totals


def fit_epochs(
    model: nn.Module,
    tiles: TileData,
    context: FitContext,
    train_batch: BatchStep,
    *,
    generator: torch.Generator,
    max_epochs: int,
    loss_key: str,
    name: str,
    validate_every: int = 1,
    prepare: Callable[[Any], Any] = _as_is,
    ema_decay: float = 0.0,
    select_from: float = 0.0,
) -> dict[str, Any]:
    """Fit by epochs of shuffled batches (shuffled by ``generator``, a host generator) under
    the deadline, keeping the best state (:func:`run_epochs`); returns the summary, with the
    number of tiles. ``prepare`` turns a loader batch (tiles, valid) into what ``train_batch``
    takes: the host-side data stage (on accelerators, a batch ahead in a thread).

    With ``ema_decay`` in (0, 1), an exponential moving average of the weights is kept after
    every step (torch's ``AveragedModel``); the averaged weights, not the raw ones, are scored
    and can become the best state, while training goes on with the raw ones. ``select_from``:
    see :func:`run_epochs`."""
    loader: DataLoader[Any] = DataLoader(
        tiles,
        batch_size=context.batch_size,
        shuffle=True,
        generator=generator,
        pin_memory=context.runtime.device.type == "cuda",
    )

    averaged = weight_average(model, ema_decay)
    batch_step = train_batch if averaged is None else averaging(train_batch, averaged, model)

    def step(epoch: int, stop_at: float) -> EpochOutcome | None:
        totals = train_epoch(loader, context, batch_step, epoch, stop_at, name, prepare)
        return totals.outcome()

    summary = run_epochs(
        model,
        context,
        step,
        max_epochs=max_epochs,
        loss_key=loss_key,
        name=name,
        steps_per_epoch=len(loader),
        validate_every=validate_every,
        scored=None if averaged is None else averaged.module,
        select_from=select_from,
    )
    summary["train_tiles"] = float(len(tiles))
    summary["ema_decay"] = float(ema_decay if averaged is not None else 0.0)
    summary["select_from"] = float(select_from)
    summary.update(context.timer.summary())
    return summary


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights (and floating buffers) with
    ``decay`` per step; None when ``decay`` is 0 (off)."""
    if decay == 0.0:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def averaging(train_batch: BatchStep, averaged: AveragedModel, model: nn.Module) -> BatchStep:
    """``train_batch`` followed by an update of the moving average from ``model``."""

    def step(progress: float, batch: Any) -> tuple[dict[str, float], dict[str, float]]:
        result = train_batch(progress, batch)
        averaged.update_parameters(model)
        return result

    return step


@dataclass
class BestState:
    """The best state seen so far by a criterion where higher is better."""

    criterion: float = -math.inf
    epoch: int = -1
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def offer(self, criterion: float, epoch: int, model: nn.Module) -> None:
        if math.isnan(criterion) or (self.epoch >= 0 and criterion <= self.criterion):
            return
        self.criterion, self.epoch = criterion, epoch
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}


def criterion(
    model: nn.Module, metrics: dict[str, float], context: FitContext, loss_key: str
) -> float:
    """Higher is better: the validation score of ``model`` when there is one, else minus the
    named training loss."""
    if context.validate is None:
        return -metrics[loss_key]
    was_training = model.training
    model.eval()
    metrics["val_score"] = float(context.validate(model))  # type: ignore[arg-type]
    model.train(was_training)
    return metrics["val_score"]


def run_epochs(
    model: nn.Module,
    context: FitContext,
    step: EpochStep,
    *,
    max_epochs: int,
    loss_key: str,
    name: str,
    steps_per_epoch: int,
    validate_every: int = 1,
    scored: nn.Module | None = None,
    select_from: float = 0.0,
) -> dict[str, Any]:
    """Train epoch by epoch under the deadline; restore the best state; return a summary.

    With a validation criterion, only the first, every ``validate_every``-th and the last epoch
    are scored and can become the best state: scoring costs inference time. ``scored`` is the
    module whose weights are scored and kept (a moving average of ``model``'s; by default
    ``model`` itself); without a validation criterion it is kept by ``model``'s training loss.

    ``select_from`` (0..1): only states at or past that share of the schedule
    (:meth:`FitContext.schedule_share`, as the learning-rate steps count it) can become the
    best state; the last state always can. Before it, only the first
    epoch is scored (it times a validation, and its figure is logged); the criterion of a few
    defective validation strips swings from epoch to epoch, and the maximum over every early
    epoch had kept untrained states (docs/fleets.md, "Which state is kept").
    """
    judged = model if scored is None else scored
    started = time.monotonic()
    best = BestState()
    reserve, epochs, stop = 0.0, 0, "max_epochs"  # reserve: seconds kept for the last score
    model.train()
    with tqdm(total=max_epochs, desc=name, disable=not context.progress) as bar:
        for epoch in range(max_epochs):
            if context.seconds_left() <= reserve:
                stop = "deadline"
                break
            epoch_started = time.monotonic()
            outcome = step(epoch, epoch_started + context.seconds_left() - reserve)
            if outcome is None:
                stop = "non_finite_loss"
                break
            if outcome.batches == 0:
                stop = "deadline"
                break
            metrics = dict(outcome.metrics)
            if not outcome.finished:
                metrics["epoch_fraction"] = outcome.batches / max(steps_per_epoch, 1)
            # Scored: the first epoch (which also times a validation), every validate_every-th
            # from select_from on, and the last one (cut short by the deadline, or the last of
            # max_epochs, or one after which only the time kept for its score is left); offered
            # as the best state from select_from on, and the last one.
            last = (
                not outcome.finished or epoch == max_epochs - 1 or context.seconds_left() <= reserve
            )
            share = context.schedule_share(epoch + 1, max_epochs)
            eligible = last or share >= select_from
            regular = context.validate is None or epoch % validate_every == 0
            if last or (regular and eligible) or (epoch == 0 and context.validate is not None):
                scored_at = time.monotonic()
                value = criterion(judged, metrics, context, loss_key)
                if eligible:
                    best.offer(value, epoch, judged)
                if context.validate is not None:
                    reserve = time.monotonic() - scored_at
            epochs += 1
            seconds = time.monotonic() - epoch_started
            context.report(EpochLog(epoch=epoch, metrics=metrics, seconds=seconds))
            bar.set_postfix(loss=f"{metrics[loss_key]:.4f}", refresh=False)
            bar.update()
            if not outcome.finished:
                stop = "deadline"
                break
    model.eval()
    if best.epoch >= 0:
        model.load_state_dict(best.state)
    else:
        log.warning("%s has no best epoch (none finished or scored); keeping the last state", name)
    return {
        "epochs": float(epochs),
        "best_epoch": float(best.epoch),
        "best_criterion": best.criterion if best.epoch >= 0 else math.nan,
        "stopped_at_deadline": float(stop == "deadline"),
        "stopped_on_non_finite_loss": float(stop == "non_finite_loss"),
        "fit_seconds": time.monotonic() - started,
    }


def optimiser_step(
    loss: torch.Tensor, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward and one optimiser step, through the float16 gradient scaler when there is one."""
    optimiser.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimiser.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
