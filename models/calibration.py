"""Score calibration stored with the model: thresholds and a normalisation to [0, 1].

Raw scores (image and pixel) are in the model's own units. Normalisation is a min-max stretch
centred on the threshold, so that the threshold maps to exactly 0.5:

    normalised = clip((raw - threshold) / (max - min) + 0.5, 0, 1)

where min and max are the raw scores seen on the validation data. Raw scores stay available.
How the thresholds are learned lives in ``training.calibrate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field


class Calibration(BaseModel):
    image_threshold: float
    image_min: float
    image_max: float
    pixel_threshold: float
    pixel_min: float
    pixel_max: float
    method: str = (
        "uncalibrated"  # how the thresholds were chosen, e.g. "image:false-alarm,pixel:regions"
    )
    # The evidence behind the thresholds (held-back images, target, bounds, region figures), as
    # ``training.calibrate`` found it; informative only, never read when scoring.
    evidence: dict[str, Any] = Field(default_factory=dict)

    def normalize_image(self, raw: float) -> float:
        normalized = _normalize(
            np.float64(raw), self.image_threshold, self.image_min, self.image_max
        )
        return float(normalized)

    def normalize_pixels(self, raw: np.ndarray) -> np.ndarray:
        normalized = _normalize(raw, self.pixel_threshold, self.pixel_min, self.pixel_max)
        return np.asarray(normalized, dtype=np.float32)

    def image_threshold_from_normalized(self, normalized: float) -> float:
        """The raw image score that a normalised threshold corresponds to (inverse stretch)."""
        return self.image_threshold + (normalized - 0.5) * _span(self.image_min, self.image_max)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


def _span(low: float, high: float) -> float:
    return max(high - low, 1e-12)


def _normalize(raw: Any, threshold: float, low: float, high: float) -> Any:
    return np.clip((raw - threshold) / _span(low, high) + 0.5, 0.0, 1.0)
