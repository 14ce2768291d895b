"""The isolated peak: how far a strip's highest spot stands above the strip's other spots.

A DRAEM map of defect-free fabric is not clean: it holds scattered spots where the weave looks
unusual, and how many and how high depends on the strip (focus, tension, the part of the roll).
On AITEX fabric 02 two defect-free strips of the dev data carry dozens of spots near 0.66 while
a held-out fuzzyball (a 4 x 4 px type-019 defect) gives one spot of 0.65 on an otherwise quiet
map: by its highest spot alone (the image score) the defect ranks below those strips, though the
network found it (its highest pixel lies on the defect's mask). What tells them apart is the
context: in the noisy strips the highest spot is one of many, in the defective one it stands
alone.

``peak_gap`` measures that: the map averaged over ``pool`` x ``pool`` pixels on fabric, its
local maxima (at least ``radius`` pixels apart; a plateau is one), and the highest minus the
``rank``-th highest. A large defect keeps a large gap when it yields fewer than ``rank`` maxima;
a noisy strip's highest spot has many neighbours in height, so its gap is small.

Neither figure is enough alone (docs/fleets.md, "The isolated peak": the gap alone loses the
large defects of fabrics 01 and 03, the image score alone the fuzzyballs), so with
``pipeline.learn_isolated_peak`` training learns both figures' mean and spread on the
defect-free strips the model was fitted on (:class:`IsolatedPeak`), and every later analysis
scores the strip by the larger of the two standardised figures: a strip is as anomalous as the
more unusual of "its worst spot is high" and "its worst spot stands alone". Calibration then
sets the operating point on that score as on any other.

Written with NumPy and OpenCV (``cv2.blur`` for the pooling, ``cv2.dilate`` for the local
maxima): no library we use ranks the local maxima of a map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# the least spread a figure may have over the training strips to be standardised by it
MIN_SPREAD = 1e-6
MIN_IMAGES = 3


def peak_gap(
    anomaly: np.ndarray, valid: np.ndarray, pool: int = 5, radius: int = 63, rank: int = 20
) -> float:
    """The highest local maximum of ``anomaly`` (averaged over ``pool`` x ``pool`` fabric
    pixels; maxima at least ``radius`` pixels apart) less the ``rank``-th highest (the lowest
    one when there are fewer); 0 without fabric."""
    if not valid.any():
        return 0.0
    weight = valid.astype(np.float32)
    size = (pool, pool)
    total = cv2.blur(anomaly.astype(np.float32) * weight, size, borderType=cv2.BORDER_CONSTANT)
    share = cv2.blur(weight, size, borderType=cv2.BORDER_CONSTANT)
    pooled = np.full(anomaly.shape, -np.inf, dtype=np.float32)
    np.divide(total, share, out=pooled, where=valid & (share > 1e-6))
    widest = cv2.dilate(pooled, np.ones((radius, radius), np.uint8))
    tops = (pooled == widest) & np.isfinite(pooled)
    if not tops.any():
        return 0.0
    # neighbouring maxima are equal (each is the other's neighbourhood maximum): a plateau,
    # such as a saturated defect, is one peak
    _, plateau = cv2.connectedComponents(tops.astype(np.uint8), connectivity=8)
    _, first = np.unique(plateau[tops], return_index=True)
    peaks = np.sort(pooled[tops][first])[::-1]
    return float(peaks[0] - peaks[min(rank, peaks.size - 1)])


class IsolatedPeak(BaseModel):
    """The image score's and the peak gap's mean and spread on ``images`` defect-free training
    strips, and the gap's settings; :meth:`combine` scores a strip by the larger standardised
    figure."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pool: int = Field(ge=1)
    radius: int = Field(ge=1)
    rank: int = Field(ge=1)
    score_mean: float
    score_sd: float = Field(gt=0)
    gap_mean: float
    gap_sd: float = Field(gt=0)
    images: int = Field(ge=MIN_IMAGES)

    def gap(self, anomaly: np.ndarray, valid: np.ndarray) -> float:
        return peak_gap(anomaly, valid, self.pool, self.radius, self.rank)

    def combine(self, score: float, gap: float) -> float:
        """The strip's score: the larger of the standardised image score and peak gap."""
        return max((score - self.score_mean) / self.score_sd, (gap - self.gap_mean) / self.gap_sd)


def learn_isolated_peak(
    scores: Sequence[float], gaps: Sequence[float], pool: int, radius: int, rank: int
) -> IsolatedPeak | None:
    """The reference from defect-free training strips' image scores and peak gaps; None with
    fewer than ``MIN_IMAGES`` strips or when either figure does not vary over them."""
    if len(scores) != len(gaps) or len(scores) < MIN_IMAGES:
        return None
    score_sd = float(np.std(scores, ddof=1))
    gap_sd = float(np.std(gaps, ddof=1))
    if not (math.isfinite(score_sd) and math.isfinite(gap_sd)):
        return None
    if score_sd < MIN_SPREAD or gap_sd < MIN_SPREAD:
        return None
    return IsolatedPeak(
        pool=pool,
        radius=radius,
        rank=rank,
        score_mean=round(float(np.mean(scores)), 8),
        score_sd=round(score_sd, 8),
        gap_mean=round(float(np.mean(gaps)), 8),
        gap_sd=round(gap_sd, 8),
        images=len(scores),
    )
