from __future__ import annotations

import numpy as np
import pytest

from bench.operating_point import resample
from training.calibrate import (
    CalibrationError,
    CalibrationSamples,
    describe_operating_point,
    f1_optimal_threshold,
    false_alarm_threshold,
    fit_calibration,
    gaussian_factor,
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


def test_conformal_bound_says_when_too_few_images_reach_the_target() -> None:
    config = CalibrationConfig(target_false_alarm=0.05, false_alarm_bound="conformal")
    calibration = fit_calibration(_samples([1.0, 3.0, 2.0], [0, 0, 0]), config)
    assert 3.0 < calibration.image_threshold < 3.0001  # just above the highest
    evidence = calibration.evidence["operating_point"]
    assert evidence["bound"] == "conformal" and evidence["target_reachable"] is False
    assert evidence["false_alarm_bound"] == 0.25 and evidence["images_needed_for_target"] == 19
    assert "needs 19 defect-free images" in describe_operating_point(evidence)
    assert calibration.method == "image:false-alarm-0.05,pixel:p99.99"


def test_gaussian_bound_is_the_normal_prediction_bound_by_hand() -> None:
    # 1, 2, 3: mean 2, sd 1; target 10 %: t(0.9; 2) = 1.8856, times sqrt(1 + 1/3) -> 2 + 2.1773.
    calibration = fit_calibration(_samples([1.0, 3.0, 2.0], [0, 0, 0]), CalibrationConfig())
    assert calibration.image_threshold == pytest.approx(4.1773, abs=1e-4)
    evidence = calibration.evidence["operating_point"]  # the default: auto, 3 < 9 images
    assert evidence["bound"] == "gaussian" and evidence["false_alarm_bound"] == 0.1
    assert evidence["conformal_bound"] == 0.25 and evidence["held_back_false_alarms"] == 0
    low, high = evidence["threshold_ci95"]
    assert low < 4.1773 < high
    assert "normal law" in describe_operating_point(evidence)
    assert calibration.method == "image:false-alarm-0.1,pixel:p99.99"


@pytest.mark.parametrize("n", [3, 5])
def test_gaussian_bound_keeps_its_promise_where_the_highest_image_does_not(n: int) -> None:
    """Normal defect-free scores: from n held back, a new one passes the gaussian threshold
    about `target` of the time; just above the highest, 1/(n + 1) of the time."""
    rng = np.random.default_rng(7)
    held_back = rng.normal(0.4, 0.03, size=(20000, n))
    new = rng.normal(0.4, 0.03, size=20000)
    for target in (0.05, 0.1):
        factor = gaussian_factor(n, target)
        bound = held_back.mean(axis=1) + factor * held_back.std(axis=1, ddof=1)
        assert (new > bound).mean() == pytest.approx(target, abs=0.01)
        for row, expected in zip(held_back[:3], bound[:3], strict=True):  # the rule itself
            assert false_alarm_threshold(row, target, 0, "gaussian")[0] == pytest.approx(expected)
    assert (new > held_back.max(axis=1)).mean() == pytest.approx(1 / (n + 1), abs=0.01)
    assert gaussian_factor(n, 0.1) > gaussian_factor(n, 0.2) > 0


def test_auto_bound_is_conformal_once_the_images_reach_the_target() -> None:
    clean = np.arange(1.0, 10.0)  # 9 images reach 10 %: k = ceil(10 * 0.9) = 9
    _, evidence = false_alarm_threshold(clean, 0.1, seed=0)
    assert evidence["bound"] == "conformal" and evidence["target_reachable"] is True
    _, evidence = false_alarm_threshold(clean[:8], 0.1, seed=0)
    assert evidence["bound"] == "gaussian"
    config = CalibrationConfig(false_alarm_bound="gaussian", min_clean_images=1)
    with pytest.raises(CalibrationError, match="gaussian false-alarm bound needs at least 2"):
        fit_calibration(_samples([1.0, 5.0], [0, 1]), config)


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


def test_resampling_the_held_back_strips_gives_each_rules_average() -> None:
    """bench.operating_point --scores: over every choice of 3 of 8 distinct defect-free scores,
    just above the highest passes exactly 1/4 of the other 5 on average (the conformal bound is
    exact for exchangeable scores); the gaussian bound at 10 % passes fewer; a defective strip
    far above every defect-free one is always found."""
    rng = np.random.default_rng(3)
    scores = {
        fabric: {
            "validation": [{"label": 0, "score": float(v)} for v in rng.normal(0.4, 0.02, 3)],
            "test": [{"label": 0, "score": float(v)} for v in rng.normal(0.4, 0.02, 5)]
            + [{"label": 1, "score": 0.9}, {"label": 1, "score": 0.0}],
        }
        for fabric in ("00", "01")
    }
    results = resample(scores, None, [0.1])
    conformal, gaussian = results["conformal@0.1"], results["gaussian@0.1"]
    assert conformal["00"]["draws"] == 56 and conformal["00"]["held_back"] == 3
    assert conformal["pooled"]["false_alarm_rate"] == pytest.approx(0.25)
    assert gaussian["pooled"]["false_alarm_rate"] < 0.25
    assert conformal["pooled"]["detected"] == gaussian["pooled"]["detected"] == 2.0
    assert conformal["pooled"]["defective"] == 4


def test_fitted_on_images_join_the_held_back_ones_when_they_score_no_lower() -> None:
    """3 held back and 6 fitted on that score alike: 9 images reach 10 % (conformal, just
    above the highest of all 9); fitted-on images that score lower than every held-back one (a
    memory bank that holds them) are left out, and the evidence says which and why."""
    held_back = [0.40, 0.42, 0.41]
    alike = [0.39, 0.43, 0.405, 0.415, 0.40, 0.425]
    samples = _samples([*held_back, 0.9], [0, 0, 0, 1])
    calibration = fit_calibration(samples, CalibrationConfig(), trained=alike)
    evidence = calibration.evidence["operating_point"]
    assert evidence["bound"] == "conformal" and evidence["defect_free_images"] == 9
    assert evidence["held_back_defect_free"] == 3 and evidence["training_images"]["used"]
    assert 0.43 < calibration.image_threshold < 0.4301
    assert "9 defect-free images (3 held back, 6 fitted on" in describe_operating_point(evidence)

    lower = [0.05, 0.06, 0.04, 0.05, 0.07, 0.03]
    calibration = fit_calibration(samples, CalibrationConfig(), trained=lower)
    evidence = calibration.evidence["operating_point"]
    assert evidence["training_images"]["used"] is False
    assert evidence["training_images"]["p_lower"] < 0.05
    assert evidence["bound"] == "gaussian" and evidence["defect_free_images"] == 3
    assert "the 6 fitted on left out" in describe_operating_point(evidence)

    off = CalibrationConfig(use_training_images=False)
    evidence = fit_calibration(samples, off, trained=alike).evidence["operating_point"]
    assert "training_images" not in evidence and evidence["defect_free_images"] == 3
