from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import (
    CalibrationError,
    CalibrationSamples,
    describe_operating_point,
    f1_optimal_threshold,
    fit_calibration,
    required_clean_images,
)
from training.config import CalibrationConfig


def test_f1_optimal_threshold_by_hand() -> None:
    # scores 1,2,3,4 with labels 0,0,1,1: threshold 3 gives P=R=1 -> F1 = 1.
    assert f1_optimal_threshold(np.array([0, 0, 1, 1]), np.array([1.0, 2.0, 3.0, 4.0])) == 3.0


def _samples(scores: list[float], labels: list[int]) -> CalibrationSamples:
    samples = CalibrationSamples(rate=1.0)
    valid = np.ones((4, 4), bool)
    for score, label in zip(scores, labels, strict=True):
        mask = np.zeros((4, 4), bool) if label == 0 else np.eye(4, dtype=bool)
        samples.add(score, label, np.where(mask, 2.0, 0.5).astype(np.float32), valid, mask)
    return samples


def test_f1_rule_does_not_flag_everything_when_defects_dominate() -> None:
    # 2 clean (1, 2) and 8 defective (1.5, 3..9). Plain F1 is best at threshold 1.5 (flags one
    # of the two clean images: P = 8/9, R = 1 -> 0.941 vs P = 1, R = 7/8 -> 0.933 at 3). With the
    # classes weighted equally (each defective 1/16, each clean 1/4), threshold 1.5 gives
    # P = 0.5 / 0.75, R = 1 -> 0.8, and threshold 3 gives P = 1, R = 7/8 -> 0.933: 3 wins.
    scores = [1.0, 2.0, 1.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    labels = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert f1_optimal_threshold(np.array(labels), np.array(scores)) == 1.5
    config = CalibrationConfig(image_rule="f1")
    calibration = fit_calibration(_samples(scores, labels), config)
    assert calibration.image_threshold == 3.0
    assert calibration.method.startswith("image:f1-balanced")
    assert calibration.pixel_threshold == 2.0  # defect pixels score 2, the rest 0.5


def test_false_alarm_rule_uses_the_conformal_rank_of_held_back_clean_images() -> None:
    # 39 clean images scoring 1..39, target 5 %: k = ceil(40 * 0.95) = 38, so the threshold sits
    # just above 38 and a new clean image exceeds it with probability <= (40 - 38) / 40 = 5 %.
    clean = [float(v) for v in range(1, 40)]
    samples = _samples([*clean, 50.0], [0] * 39 + [1])
    calibration = fit_calibration(samples, CalibrationConfig(target_false_alarm=0.05))
    assert 38.0 < calibration.image_threshold < 38.0001
    evidence = calibration.evidence["operating_point"]
    assert evidence["rank"] == 38 and evidence["target_reachable"] is True
    assert evidence["false_alarm_bound"] == 0.05 and evidence["held_back_false_alarms"] == 1
    low, high = evidence["threshold_ci95"]
    assert low <= 38.0 <= high
    assert "<= 5% expected" in describe_operating_point(evidence)


def test_false_alarm_rule_says_when_too_few_images_reach_the_target() -> None:
    calibration = fit_calibration(_samples([1.0, 3.0, 2.0], [0, 0, 0]), CalibrationConfig())
    assert 3.0 < calibration.image_threshold < 3.0001  # just above the highest
    evidence = calibration.evidence["operating_point"]
    assert evidence["target_reachable"] is False and evidence["false_alarm_bound"] == 0.25
    assert evidence["images_needed_for_target"] == 19
    assert "needs 19 held-back images" in describe_operating_point(evidence)
    assert calibration.method == "image:false-alarm-0.05,pixel:p99.99"


def test_too_few_held_back_clean_images_is_a_clear_error() -> None:
    with pytest.raises(CalibrationError, match=r"at least 3 defect-free images.*holds back 2"):
        fit_calibration(_samples([1.0, 2.0, 5.0], [0, 0, 1]), CalibrationConfig())
    assert required_clean_images(0.05) == 19 and required_clean_images(0.1) == 9


def test_recalibration_settings_lay_overrides_over_the_recorded_ones() -> None:
    from types import SimpleNamespace

    from training.recalibrate import calibration_config

    manifest = SimpleNamespace(training={"full_config": {"calibration": {"image_rule": "f1"}}})
    config = calibration_config(manifest, {"target_false_alarm": 0.2})  # type: ignore[arg-type]
    assert (config.image_rule, config.target_false_alarm) == ("f1", 0.2)
    assert calibration_config(SimpleNamespace(training={})).image_rule == "false_alarm"  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match=r"^calibration\.target_false_alarm: .*less than 1"):
        calibration_config(manifest, {"target_false_alarm": 2.0})  # type: ignore[arg-type]
