"""Learning the calibration (thresholds and normalisation) on validation data.

- Image threshold: the F1-optimal threshold over the validation images' raw scores when both
  defect-free and defective images are present, with the two classes weighted equally (the
  split holds every defective image but only some defect-free ones; unweighted F1 would then
  favour flagging every image); otherwise the ``image_percentile`` percentile of the
  defect-free scores.
- Pixel threshold: the F1-optimal threshold over valid pixels when defect masks are present;
  otherwise the ``pixel_percentile`` percentile of defect-free pixel scores. Pixels are
  collected as all defect pixels plus a seeded sample of the others (rate
  ``negative_pixel_rate``), weighted back by 1/rate, so F1 is estimated without bias.
- Normalisation: min and max of the observed raw scores (see ``models.calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import precision_recall_curve

from models.calibration import Calibration
from training.config import CalibrationConfig


def f1_optimal_threshold(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> float:
    precision, recall, thresholds = precision_recall_curve(labels, scores, sample_weight=weights)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


@dataclass
class CalibrationSamples:
    """Scores gathered over validation images, kept small enough to hold in memory."""

    rate: float
    seed: int = 0
    image_scores: list[float] = field(default_factory=list)
    image_labels: list[int] = field(default_factory=list)
    pixel_scores: list[np.ndarray] = field(default_factory=list)
    pixel_labels: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def add(
        self,
        score: float,
        label: int,
        anomaly_map: np.ndarray,
        valid: np.ndarray,
        mask: np.ndarray | None,
    ) -> None:
        self.image_scores.append(float(score))
        self.image_labels.append(int(label))
        values = anomaly_map[valid]
        truth = mask[valid] if mask is not None else np.zeros(values.shape, dtype=bool)
        if label == 1 and mask is None:
            return  # a defective image without a mask says nothing about its pixels
        chosen = truth | (self._rng.random(values.shape) < self.rate)
        self.pixel_scores.append(values[chosen].astype(np.float32))
        self.pixel_labels.append(truth[chosen])


def fit_calibration(samples: CalibrationSamples, config: CalibrationConfig) -> Calibration:
    if not samples.image_scores:
        raise ValueError("no validation image to calibrate on")
    image_scores = np.asarray(samples.image_scores, dtype=np.float64)
    image_labels = np.asarray(samples.image_labels)
    pixels = np.concatenate(samples.pixel_scores) if samples.pixel_scores else np.zeros(1)
    truth = np.concatenate(samples.pixel_labels) if samples.pixel_labels else np.zeros(1, bool)
    methods = []
    if 0 < image_labels.sum() < image_labels.size:
        # Both classes weigh the same: a validation split is mostly defective images (every
        # defective image goes there), and plain F1 then rewards flagging everything.
        counts = np.bincount(image_labels, minlength=2)
        balance = np.where(image_labels == 1, 0.5 / counts[1], 0.5 / counts[0])
        image_threshold = f1_optimal_threshold(image_labels, image_scores, balance)
        methods.append("image:f1-balanced")
    else:
        normal = image_scores[image_labels == 0] if (image_labels == 0).any() else image_scores
        image_threshold = float(np.percentile(normal, config.image_percentile))
        methods.append(f"image:p{config.image_percentile:g}")
    if truth.any() and not truth.all():
        weights = np.where(truth, 1.0, 1.0 / config.negative_pixel_rate)
        pixel_threshold = f1_optimal_threshold(truth, pixels, weights)
        methods.append("pixel:f1")
    else:
        pixel_threshold = float(np.percentile(pixels[~truth], config.pixel_percentile))
        methods.append(f"pixel:p{config.pixel_percentile:g}")
    return Calibration(
        image_threshold=image_threshold,
        image_min=float(image_scores.min()),
        image_max=float(max(image_scores.max(), image_threshold)),
        pixel_threshold=pixel_threshold,
        pixel_min=float(pixels.min()),
        pixel_max=float(max(pixels.max(), pixel_threshold)),
        method=",".join(methods),
    )
