"""The epoch loop shared by the models that train by gradient descent (VAE, DRAEM).

It runs epochs until ``max_epochs`` or the deadline (an epoch that the last one's duration says
cannot finish is not started; one cut short is discarded), keeps the best state by the
validation criterion (``FitContext.validate``, higher is better) or else by the lowest value of
a loss the model names, reports one :class:`EpochLog` per epoch, shows progress, and restores
the best state at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.base import EpochLog, FitContext

log = logging.getLogger(__name__)

# One epoch of training: its metrics, or None when it did not finish (deadline, NaN loss).
EpochStep = Callable[[int], dict[str, float] | None]


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
    """Higher is better: the validation score when there is one, else minus the named loss."""
    if context.validate is None:
        return -metrics[loss_key]
    model.eval()
    metrics["val_score"] = float(context.validate(model))  # type: ignore[arg-type]
    model.train()
    return metrics["val_score"]


def run_epochs(
    model: nn.Module,
    context: FitContext,
    step: EpochStep,
    *,
    max_epochs: int,
    loss_key: str,
    name: str,
) -> dict[str, Any]:
    """Train epoch by epoch under the deadline; restore the best state; return a summary."""
    started = time.monotonic()
    best = BestState()
    epoch_seconds, epochs, stop = 0.0, 0, "max_epochs"
    model.train()
    with tqdm(total=max_epochs, desc=name, disable=not context.progress) as bar:
        for epoch in range(max_epochs):
            if context.seconds_left() < epoch_seconds:  # the next epoch would not finish
                stop = "deadline"
                break
            epoch_started = time.monotonic()
            metrics = step(epoch)
            if metrics is None:
                stop = "deadline" if context.seconds_left() <= 0 else "non_finite_loss"
                break
            best.offer(criterion(model, metrics, context, loss_key), epoch, model)
            epoch_seconds = time.monotonic() - epoch_started
            epochs += 1
            context.report(EpochLog(epoch=epoch, metrics=metrics, seconds=epoch_seconds))
            bar.set_postfix(loss=f"{metrics[loss_key]:.4f}", refresh=False)
            bar.update()
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
