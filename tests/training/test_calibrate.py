from __future__ import annotations

import numpy as np

from training.calibrate import CalibrationSamples, f1_optimal_threshold, fit_calibration
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


def test_image_threshold_does_not_flag_everything_when_defects_dominate() -> None:
    # 2 clean (1, 2) and 8 defective (1.5, 3..9). Plain F1 is best at threshold 1.5 (flags one
    # of the two clean images: P = 8/9, R = 1 -> 0.941 vs P = 1, R = 7/8 -> 0.933 at 3). With the
    # classes weighted equally (each defective 1/16, each clean 1/4), threshold 1.5 gives
    # P = 0.5 / 0.75, R = 1 -> 0.8, and threshold 3 gives P = 1, R = 7/8 -> 0.933: 3 wins.
    scores = [1.0, 2.0, 1.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    labels = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert f1_optimal_threshold(np.array(labels), np.array(scores)) == 1.5
    calibration = fit_calibration(_samples(scores, labels), CalibrationConfig())
    assert calibration.image_threshold == 3.0
    assert calibration.method.startswith("image:f1-balanced")
    assert calibration.pixel_threshold == 2.0  # defect pixels score 2, the rest 0.5


def test_percentiles_without_defective_images() -> None:
    calibration = fit_calibration(_samples([1.0, 2.0, 3.0], [0, 0, 0]), CalibrationConfig())
    assert calibration.method == "image:p99,pixel:p99.99"
    assert 2.9 < calibration.image_threshold <= 3.0
