"""The promotion rule on hand-made outcomes (fast; promotion against a real registry is in
test_tracking.py)."""

from __future__ import annotations

import math

import pytest

from loomwatch.cli import PROMOTE_METRICS
from tracking.store import TrackingError
from training.decisions import FIGURES, NoCommonDataError, StripOutcome, paired_comparison
from training.promote import check_request, clears


def strips(decisions: dict[str, tuple[int, bool]]) -> list[StripOutcome]:
    """name -> (label, decided anomalous)."""
    return [
        StripOutcome(name, label, "hole" if label else None, float(decided), decided, None)
        for name, (label, decided) in decisions.items()
    ]


# Ten defective strips and ten defect-free ones.
LABELS = {f"d{i}": 1 for i in range(10)} | {f"n{i}": 0 for i in range(10)}


def deciding(anomalous: set[str]) -> list[StripOutcome]:
    """The twenty LABELS strips, decided anomalous exactly when named in ``anomalous``."""
    return strips({name: (label, name in anomalous) for name, label in LABELS.items()})


def test_metric_names_for_help_are_the_figures() -> None:
    assert tuple(FIGURES) == PROMOTE_METRICS


def test_a_challenger_that_finds_every_defect_clears_the_margin() -> None:
    blind = strips({name: (label, False) for name, label in LABELS.items()})
    sharp = strips({name: (label, label == 1) for name, label in LABELS.items()})
    comparison = paired_comparison(blind, sharp, "decision_balance", resamples=500)
    assert (comparison.champion, comparison.challenger, comparison.difference) == (0.0, 1.0, 1.0)
    assert comparison.low == comparison.high == 1.0 and comparison.n_strips == 20
    assert clears(comparison, 0.0) and clears(comparison, 0.99)
    # The other way round the improvement is -1: never promoted.
    backwards = paired_comparison(sharp, blind, "decision_balance", resamples=500)
    assert backwards.high == -1.0 and not clears(backwards, 0.0)


def test_identical_outcomes_give_an_interval_of_zero_and_no_promotion() -> None:
    same = deciding({"d0", "d1", "n0"})
    comparison = paired_comparison(same, list(same), "decision_balance", resamples=500)
    assert comparison.low == comparison.high == 0.0 and not clears(comparison, 0.0)
    assert "95% CI [+0.0000, +0.0000] over 20 common strips" in comparison.describe()


def test_a_small_uncertain_gain_does_not_clear_the_margin() -> None:
    # The challenger finds one more defect of ten: better on the point figure, not clearly.
    champion = deciding({"d0", "d1"})
    challenger = deciding({"d0", "d1", "d2"})
    comparison = paired_comparison(champion, challenger, "detection_rate", resamples=500)
    assert comparison.difference == pytest.approx(0.1)
    assert comparison.low <= 0.0 < comparison.high and not clears(comparison, 0.0)


def test_fewer_false_alarms_is_an_improvement() -> None:
    noisy = strips({name: (label, True) for name, label in LABELS.items()})
    quiet = strips({name: (label, label == 1) for name, label in LABELS.items()})
    comparison = paired_comparison(noisy, quiet, "false_alarm_rate", resamples=500)
    assert comparison.difference == 1.0 and clears(comparison, 0.5)


def test_an_undefined_interval_never_clears() -> None:
    # No defect-free strip in common: a false-alarm rate does not exist.
    only_defects = strips({f"d{i}": (1, True) for i in range(5)})
    comparison = paired_comparison(only_defects, only_defects, "false_alarm_rate", resamples=200)
    assert math.isnan(comparison.low) and not clears(comparison, 0.0)


def test_no_common_strip_is_an_error() -> None:
    ours = strips({"a": (1, True)})
    theirs = strips({"b": (1, True)})
    with pytest.raises(NoCommonDataError):
        paired_comparison(theirs, ours, "detection_rate")


@pytest.mark.parametrize(
    ("metric", "margin", "resamples", "needle"),
    [
        ("loss", 0.0, 2000, "decision_balance"),
        ("decision_balance", 1.5, 2000, "--margin"),
        ("decision_balance", -0.1, 2000, "--margin"),
        ("decision_balance", math.nan, 2000, "--margin"),
        ("decision_balance", 0.0, 10, "--resamples"),
    ],
)
def test_bad_requests_are_refused(metric: str, margin: float, resamples: int, needle: str) -> None:
    with pytest.raises(TrackingError, match=needle):
        check_request(metric, margin, resamples)
