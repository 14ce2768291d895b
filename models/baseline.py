"""The column baseline: what a defect-free image's anomaly map reaches in each column.

A line-scan camera sees each column of a strip under its own light and at its own angle, and a
network's anomaly map on defect-free fabric is not flat across the width: on AITEX fabric 02 a
DRAEM map's column maxima run from about 0.22 in the middle of the strip to 0.29 near its ends.
The image score is the map's maximum, so on a defect-free strip it comes from the columns where
the map runs high, and a faint defect elsewhere (a 3 x 3 px fuzzyball) scores below it.

With ``pipeline.learn_column_baseline`` (off by default: it helped fabric 02 and hurt fabrics
03 and 06, see docs/fleets.md, "The column baseline") ``loomwatch train`` learns, from the
training images' maps (the fitted network on the images it
was fitted on), the median over images of each column's highest value on fabric, widened by a
running maximum and smoothed over ``window`` columns (stored every ``step`` columns). Every
analysis of an image as wide as the training images then subtracts it from the map (clipped at 0)
before the image score, the calibration, the mask and the regions: scores and maps say how far
above a defect-free strip's own level in that column a pixel lies, and a tile's score becomes
its highest such pixel (not the model's pooled score).

Written here with NumPy and OpenCV (running maximum: ``cv2.dilate``; smoothing: ``cv2.blur``):
nothing in the libraries we use learns a per-column profile of a map.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ColumnBaseline(BaseModel):
    """Each column's defect-free map level in images ``width`` pixels wide, every ``step``
    columns (``values``), learned from ``images`` training images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(ge=1)
    step: int = Field(ge=1)
    values: list[float] = Field(min_length=1)
    images: int = Field(ge=1)

    def applies(self, width: int) -> bool:
        """Whether it holds for an image ``width`` pixels wide (as wide as its training images)."""
        return width == self.width

    def profile(self) -> np.ndarray:
        """The level of every column (float32 [width]), interpolated between the stored ones."""
        stored = np.arange(len(self.values)) * self.step
        return np.interp(np.arange(self.width), stored, self.values).astype(np.float32)


def column_levels(anomaly: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each column's highest value of ``anomaly`` on fabric (float64 [W]; NaN without fabric)."""
    seen = valid.any(axis=0)
    highest = np.where(valid, anomaly, -np.inf).max(axis=0)
    return np.where(seen, highest, np.nan)


def learn_column_baseline(
    levels: list[np.ndarray], window: int = 65, step: int = 8
) -> ColumnBaseline | None:
    """The baseline from defect-free images' :func:`column_levels`; None when there are no
    images, their widths differ, or no column has fabric."""
    widths = {item.shape[0] for item in levels}
    if not levels or len(widths) != 1:
        return None
    width = widths.pop()
    columns = np.stack(levels).astype(np.float64)
    known = ~np.isnan(columns).all(axis=0)
    if not known.any():
        return None
    level = np.full(width, np.nan)
    level[known] = np.nanmedian(columns[:, known], axis=0)
    # columns no image showed fabric in take their nearest neighbours' level
    level = np.interp(np.arange(width), np.flatnonzero(known), level[known])
    size = max(1, min(window, width))
    row_vector = level.astype(np.float32)[None, :]
    widened = cv2.dilate(row_vector, np.ones((1, size), np.uint8), borderType=cv2.BORDER_REPLICATE)
    smooth = cv2.blur(widened, (size, 1), borderType=cv2.BORDER_REPLICATE)[0]
    stored = smooth[::step]
    return ColumnBaseline(
        width=width, step=step, values=[round(float(v), 6) for v in stored], images=len(levels)
    )


def subtract_baseline(anomaly: np.ndarray, baseline: ColumnBaseline) -> np.ndarray:
    """``anomaly`` (H x W, as wide as the baseline) less each column's level, clipped at 0."""
    return np.maximum(anomaly - baseline.profile()[None, :], 0.0).astype(np.float32)
