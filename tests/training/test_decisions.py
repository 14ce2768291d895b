from __future__ import annotations

import math

import numpy as np
import pytest

from training.decisions import (
    NoCommonDataError,
    RegionCounts,
    StripOutcome,
    count_regions,
    decision_metrics,
    interval,
    paired_comparison,
    per_defect_decisions,
    region_precision,
    region_recall,
)


def _mask(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((40, 200), np.uint8)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = 255
    return mask


def test_regions_are_matched_with_defects_with_a_small_tolerance() -> None:
    valid = np.ones((40, 200), bool)
    truth = _mask((5, 10, 10, 15), (5, 100, 10, 105), (30, 180, 35, 185))
    kept = _mask((5, 12, 9, 14), (5, 108, 10, 110), (20, 50, 25, 55))  # on, 3 px beside, none
    counts = count_regions(kept, truth, valid, tolerance=4)
    assert counts == RegionCounts(defects=3, defects_found=2, regions=3, regions_on_defect=2)
    strict = count_regions(kept, truth, valid, tolerance=0)
    assert (strict.defects_found, strict.regions_on_defect) == (1, 1)
    # a defect off the fabric does not count; a defect-free strip's regions are all false
    off_fabric = valid.copy()
    off_fabric[:, 170:] = False
    assert count_regions(kept, truth, off_fabric).defects == 2
    assert count_regions(kept, None, valid) == RegionCounts(0, 0, 3, 0)


def _outcome(name: str, label: int, decision: bool, found: int = 1, kept: int = 1) -> StripOutcome:
    regions = RegionCounts(1 if label else 0, found if label else 0, kept, found if label else 0)
    return StripOutcome(name, label, "019" if label else None, 0.5, decision, regions)


def test_decision_metrics_count_strips_and_regions_with_intervals() -> None:
    outcomes = [_outcome(f"d{i}", 1, i < 9, found=int(i < 8)) for i in range(10)]
    outcomes += [_outcome(f"c{i}", 0, i < 1, kept=int(i < 1)) for i in range(10)]
    metrics = decision_metrics(outcomes, resamples=500)
    assert metrics["detection_rate"] == 0.9 and metrics["false_alarm_rate"] == 0.1
    assert metrics["region_recall"] == 0.8  # 8 of 10 defects touched
    assert metrics["region_precision"] == 8 / 11  # 10 regions on defective strips, 1 on a clean
    for key in ("detection_rate", "false_alarm_rate", "region_recall", "region_precision"):
        low, high = metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"]
        assert low <= metrics[key] <= high and low < high, key
    assert metrics["n_defective_strips"] == 10 and metrics["n_defect_free_strips"] == 10
    rows = per_defect_decisions(outcomes, resamples=200)
    assert [row["defect"] for row in rows] == ["019", "defect-free"]
    assert rows[0]["decided_anomalous"] == 9 and rows[1]["rate"] == 0.1


def test_intervals_are_nan_when_a_figure_is_undefined() -> None:
    only_clean = [_outcome(f"c{i}", 0, False, kept=0) for i in range(5)]
    index = np.arange(5)
    assert math.isnan(region_recall(only_clean, index))
    assert math.isnan(region_precision(only_clean, index))  # no region kept at all
    low, high = interval(only_clean, region_recall, resamples=100)
    assert math.isnan(low) and math.isnan(high)


def test_paired_comparison_sees_a_real_improvement_and_no_difference() -> None:
    champion = [_outcome(f"d{i}", 1, False) for i in range(12)]
    champion += [_outcome(f"c{i}", 0, False) for i in range(12)]
    better = [_outcome(f"d{i}", 1, True) for i in range(12)]
    better += [_outcome(f"c{i}", 0, False) for i in range(12)]
    gain = paired_comparison(champion, better, "decision_balance", resamples=500)
    assert gain.difference == 1.0 and gain.low > 0.5 and gain.n_strips == 24
    same = paired_comparison(champion, champion, "decision_balance", resamples=200)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    # lower false-alarm rate is better: the sign is turned so that positive means better
    noisy = [_outcome(f"c{i}", 0, True) for i in range(12)]
    quiet = [_outcome(f"c{i}", 0, False) for i in range(12)]
    assert paired_comparison(noisy, quiet, "false_alarm_rate", resamples=200).difference == 1.0
    assert "95% CI" in gain.describe()


def test_paired_comparison_needs_common_strips() -> None:
    with pytest.raises(NoCommonDataError):
        paired_comparison([_outcome("a", 1, True)], [_outcome("b", 1, True)], "detection_rate")
