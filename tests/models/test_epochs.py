from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import models.base
import models.epochs
from models.base import EpochLog, FitContext
from models.epochs import EpochOutcome, EpochStep, EpochTotals, fit_epochs, run_epochs


def marked_step(model: nn.Linear, cut_at: int, stops: list[float]) -> EpochStep:
    """A stand-in epoch: writes its number into the weight; the epoch `cut_at` is cut short."""

    def step(epoch: int, stop_at: float) -> EpochOutcome:
        stops.append(stop_at)
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        finished = epoch < cut_at
        return EpochOutcome({"loss": 1.0 / (epoch + 1)}, 4 if finished else 1, finished)

    return step


def test_an_epoch_cut_short_is_scored_and_can_be_the_best() -> None:
    model = nn.Linear(1, 1)
    scores = iter([0.2, 0.5, 0.9])
    logs: list[EpochLog] = []
    context = FitContext(callback=logs.append, progress=False,
                         validate=lambda _: next(scores))  # fmt: skip
    summary = run_epochs(model, context, marked_step(model, 2, []), max_epochs=10,
                         loss_key="loss", name="test", steps_per_epoch=4)  # fmt: skip
    assert summary["epochs"] == 3 and summary["stopped_at_deadline"] == 1.0
    assert summary["best_epoch"] == 2 and model.weight.item() == 2.0  # the cut-short epoch won
    assert logs[2].metrics["epoch_fraction"] == 0.25 and "epoch_fraction" not in logs[1].metrics


def fake_clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The epoch loop's clock, moved only by the test (``clock["now"]``)."""
    clock = {"now": 1000.0}
    fake_time = SimpleNamespace(monotonic=lambda: clock["now"])
    monkeypatch.setattr(models.epochs, "time", fake_time)
    monkeypatch.setattr(models.base, "time", fake_time)
    return clock


def test_validate_every_and_the_time_kept_for_the_last_score(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fake clock that only a validation moves (by 0.25 s, exact in binary): no real waiting.
    clock = fake_clock(monkeypatch)
    model = nn.Linear(1, 1)
    scored: list[int] = []

    def validate(_: nn.Module) -> float:
        scored.append(int(model.weight.item()))
        clock["now"] += 0.25
        return 0.1 * len(scored)

    stops: list[float] = []
    deadline = clock["now"] + 100.0
    context = FitContext(deadline=deadline, progress=False, validate=validate)
    summary = run_epochs(model, context, marked_step(model, 4, stops), max_epochs=10,
                         loss_key="loss", name="test", steps_per_epoch=4,
                         validate_every=3)  # fmt: skip
    assert scored == [0, 3, 4] and summary["best_epoch"] == 4  # first, every third, last
    assert stops[0] == deadline  # nothing scored yet: nothing kept back
    assert stops[1:] == [deadline - 0.25] * 4  # a validation's time kept back


def test_no_criterion_keeps_the_lowest_loss_and_a_passed_deadline_trains_nothing() -> None:
    model = nn.Linear(1, 1)
    summary = run_epochs(model, FitContext(progress=False), marked_step(model, 99, []),
                         max_epochs=3, loss_key="loss", name="test", steps_per_epoch=4)  # fmt: skip
    assert summary["best_epoch"] == 2 and summary["stopped_at_deadline"] == 0.0
    stops: list[float] = []
    context = FitContext(deadline=time.monotonic() - 1.0, progress=False)
    summary = run_epochs(model, context, marked_step(model, 99, stops), max_epochs=3,
                         loss_key="loss", name="test", steps_per_epoch=4)  # fmt: skip
    assert stops == [] and summary["epochs"] == 0 and summary["stopped_at_deadline"] == 1.0


def test_epoch_totals_report_means_and_last_values() -> None:
    totals = EpochTotals()
    totals.add({"loss": 1.0, "focal": 0.5}, last={"lr": 1e-3})
    totals.add({"loss": 3.0, "focal": 0.25}, last={"lr": 2e-4})
    outcome = totals.outcome()
    assert outcome is not None and outcome.batches == 2 and not outcome.finished
    assert outcome.metrics == {"loss": 2.0, "focal": 0.375, "lr": 2e-4}
    totals.non_finite = True
    assert totals.outcome() is None


def test_a_moving_average_of_the_weights_is_scored_and_kept() -> None:
    # Each step adds 1 to the raw weight; with decay 0.5 the average after steps 1..k follows
    # a_1 = 1, a_k = 0.5 a_(k-1) + 0.5 k. Two steps an epoch (4 tiles, batch 2), two epochs.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)

    def train_batch(progress: float, batch: object) -> tuple[dict[str, float], dict[str, float]]:
        with torch.no_grad():
            model.weight.add_(1.0)
        return {"loss": 1.0}, {}

    seen: list[float] = []

    def validate(scored: nn.Module) -> float:
        seen.append(float(scored.weight.item()))  # type: ignore[operator]
        return -abs(seen[-1] - 1.5)  # the average after epoch 0 is the best

    tiles = TensorDataset(torch.zeros(4, 1), torch.zeros(4, 1))
    context = FitContext(progress=False, validate=validate, batch_size=2)
    summary = fit_epochs(model, tiles, context, train_batch,  # type: ignore[arg-type]
                         generator=torch.Generator().manual_seed(0), max_epochs=2,
                         loss_key="loss", name="test", ema_decay=0.5)  # fmt: skip
    assert seen == [1.5, 3.125]  # the averages, not the raw weights 2 and 4
    assert summary["best_epoch"] == 0 and model.weight.item() == 1.5
    assert summary["ema_decay"] == 0.5
    with pytest.raises(ValueError, match="ema_decay"):
        fit_epochs(model, tiles, context, train_batch,  # type: ignore[arg-type]
                   generator=torch.Generator(), max_epochs=1, loss_key="loss", name="test",
                   ema_decay=1.0)  # fmt: skip


def test_select_from_keeps_early_states_out_by_epochs_or_by_the_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Validation likes the untrained state best (scores fall epoch by epoch): with select_from
    # only the states at or past that share of the schedule may be kept.
    def fit(
        select_from: float, max_epochs: int, budget: float | None, every: int = 1
    ) -> tuple[list[int], float]:
        clock = fake_clock(monkeypatch)
        model = nn.Linear(1, 1)
        scored: list[int] = []

        def validate(_: nn.Module) -> float:
            scored.append(int(model.weight.item()))
            return 1.0 - 0.01 * len(scored)

        def step(epoch: int, stop_at: float) -> EpochOutcome:
            clock["now"] += 10.0  # an epoch takes 10 s
            with torch.no_grad():
                model.weight.fill_(float(epoch))
            return EpochOutcome({"loss": 1.0}, 4, True)

        deadline = None if budget is None else clock["now"] + budget
        context = FitContext(deadline=deadline, budget_seconds=budget, progress=False,
                             validate=validate)  # fmt: skip
        summary = run_epochs(model, context, step, max_epochs=max_epochs, loss_key="loss",
                             name="test", steps_per_epoch=4, select_from=select_from,
                             validate_every=every)  # fmt: skip
        assert model.weight.item() == summary["best_epoch"]  # the kept state is restored
        return scored, summary["best_epoch"]

    assert fit(0.0, 10, None) == (list(range(10)), 0)
    # by epochs: 5 of 10 epochs is half the schedule; epoch 0 is scored (timed) but not kept
    assert fit(0.5, 10, None) == ([0, 4, 5, 6, 7, 8, 9], 4)
    # by time: 100 epochs would take 1000 s, the budget is 100 s; half of it has passed
    # after epoch 4 (the larger share counts)
    assert fit(0.5, 100, 100.0) == ([0, 4, 5, 6, 7, 8, 9], 4)
    # past the end of the schedule nothing is eligible but the last state
    assert fit(1.0, 10, None) == ([0, 9], 9)
    # the budget runs out after epoch 8 (90 s), between two regular scores (every third
    # epoch): that final state is scored and kept rather than none
    assert fit(0.8, 100, 90.0, every=3) == ([0, 8], 8)
