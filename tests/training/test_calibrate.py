from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import (
    CalibrationError,
    CalibrationSamples,
    describe_operating_point,
    f1_optimal_threshold,
    false_alarm_threshold,
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


def _gumbel_strips(rng: np.random.Generator, strips: int, tiles: int = 16) -> list[np.ndarray]:
    return [rng.gumbel(0.0, 1.0, tiles) for _ in range(strips)]


def test_tile_rule_holds_the_target_where_three_strip_maxima_cannot() -> None:
    # Tiles score a standard Gumbel law, 16 to a strip. A threshold t lets a new defect-free strip
    # through with probability 1 - G(t)^16, known exactly. From 3 held-back strips the conformal
    # rule sits just above the highest (expected false alarms 1/4); the tile rule fits 48 scores.
    from scipy.stats import gumbel_r

    from training.calibrate import tile_tail_threshold

    def false_alarms(threshold: float) -> float:
        return float(1.0 - gumbel_r.cdf(threshold) ** 16)

    rng = np.random.default_rng(0)
    tile_rates, strip_rates = [], []
    for _ in range(200):
        strips = _gumbel_strips(rng, 3)
        threshold, evidence = tile_tail_threshold(strips, 0.05, seed=0, resamples=0)
        assert evidence["rule"] == "false_alarm_tiles" and evidence["tile_scores"] == 48
        tile_rates.append(false_alarms(threshold))
        conformal = false_alarm_threshold(np.array([s.max() for s in strips]), 0.05, seed=0)[0]
        strip_rates.append(false_alarms(conformal))
    assert 0.02 < float(np.median(tile_rates)) < 0.09
    assert float(np.mean(strip_rates)) > 0.18
    assert float(np.mean(np.abs(np.array(tile_rates) - 0.05))) < float(
        np.mean(np.abs(np.array(strip_rates) - 0.05))
    )


def test_tile_rule_interval_and_check_of_the_held_back_maxima() -> None:
    from training.calibrate import tile_tail_threshold

    strips = _gumbel_strips(np.random.default_rng(3), 5)
    threshold, evidence = tile_tail_threshold(strips, 0.05, seed=0)
    low, high = evidence["threshold_ci95"]
    assert low < threshold < high
    assert evidence["tiles_per_image"] == 16 and evidence["held_back_defect_free"] == 5
    assert len(evidence["held_back_maximum_exceedance"]) == 5
    assert all(0.0 <= p <= 1.0 for p in evidence["held_back_maximum_exceedance"])
    # one strip with a tile far beyond the law: its maximum is improbable under the fit
    odd = [*strips[:4], np.append(strips[4][:-1], 40.0)]
    _, flagged = tile_tail_threshold(odd, 0.05, seed=0)
    assert min(flagged["held_back_maximum_exceedance"]) < 0.01


def test_tile_rule_falls_back_to_the_maxima_when_tiles_cannot_support_a_fit() -> None:
    from training.calibrate import tile_tail_threshold

    few = [np.array([1.0, 2.0]), np.array([3.0]), np.array([2.5, 0.5])]
    threshold, evidence = tile_tail_threshold(few, 0.05, seed=0)
    assert 3.0 < threshold < 3.0001 and evidence["rule"] == "false_alarm"
    assert evidence["fallback_from"] == "false_alarm_tiles" and "needs 10" in evidence["reason"]
    flat = [np.full(8, 0.25) for _ in range(3)]
    _, evidence = tile_tail_threshold(flat, 0.05, seed=0)
    assert evidence["reason"] == "every fabric tile scores the same"


def test_fit_calibration_reads_the_tiles_of_held_back_clean_images_only() -> None:
    rng = np.random.default_rng(1)
    samples = CalibrationSamples(rate=1.0)
    valid = np.ones((4, 4), bool)
    clean_map = np.full((4, 4), 0.5, np.float32)
    for tiles in _gumbel_strips(rng, 4):
        samples.add(float(tiles.max()), 0, clean_map, valid, np.zeros((4, 4), bool), tiles)
    # a defective image with an extreme tile must not move the threshold
    samples.add(99.0, 1, clean_map * 4, valid, np.eye(4, dtype=bool), np.array([99.0, 0.0]))
    config = CalibrationConfig(image_rule="false_alarm_tiles")
    calibration = fit_calibration(samples, config)
    evidence = calibration.evidence["operating_point"]
    assert evidence["rule"] == "false_alarm_tiles" and evidence["tile_scores"] == 64
    assert calibration.method.startswith("image:false-alarm-tiles-0.05")
    assert calibration.image_threshold < 20.0
    assert "64 tile scores of 4 held-back" in describe_operating_point(evidence)
