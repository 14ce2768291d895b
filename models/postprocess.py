"""Post-processing with suppression: from a normalised anomaly map to kept defect regions.

Steps: smoothing (Gaussian, ``smooth``: ``Detector.finish`` smooths the raw map with
``smoothing_sigma`` before normalising it, so that the map shown and judged is the one the
regions come from), binarisation at the pixel threshold (0.5 in normalised units), connected
components (OpenCV, 8-connectivity), then suppression. A component is suppressed, in
this order of reasons, when

- ``outside_valid_area``: less than ``min_valid_fraction`` of its pixels lie on fabric;
- ``area_below_min``: its area (valid pixels) is below ``min_region_area``;
- ``peak_below_min``: its peak normalised score is below ``min_region_peak``;
- ``image_not_anomalous``: the image as a whole was decided normal (see below), so none of its
  regions is reported as a defect.

Every suppressed component is logged with its box, area, peak and mean score and the reason,
together with the settings in force.

The score's own evidence: when the image score reaches the threshold by ``veto_margin`` or more,
the pipeline passes the window (tile) that score came from, and the component holding that
window's highest fabric pixel is not suppressed for its area or peak (only for lying off the
fabric). When no component reaches the pixel threshold at that pixel (a defect of a few
pixels, faint after smoothing), the spot itself is kept (``evidence_region``): the fabric
pixels connected to the window's highest one that stand at least half as far above the
window's median as it does, marked ``below_threshold``. A decision made on a strong score thus
always shows where it came from, however small or faint the defect (AITEX defects can be 8 px
wide).

Image decision rule (:func:`decide`): the image score decides. An image is anomalous when its
normalised score reaches the image threshold, with one exception near the threshold: when the
score is less than ``veto_margin`` above the threshold, components were found and every one of
them was suppressed, the alarm is vetoed (the weak evidence was judged not to be a defect). A
score ``veto_margin`` or more above the threshold is never vetoed, even when no region survives:
the score is then the evidence, and the decision says so. A score above the threshold with no
component at the pixel threshold stays anomalous. Suppression can only turn an alarm off, never
on, and only a marginal one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, Field


class SuppressionSettings(BaseModel):
    min_region_area: int = Field(default=10, ge=0, description="pixels; smaller regions suppressed")
    min_region_peak: float = Field(
        default=0.5, ge=0.0, le=1.0, description="normalised peak score a region must reach"
    )
    smoothing_sigma: float = Field(default=1.0, ge=0.0, description="Gaussian sigma in pixels")
    min_valid_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="share of a region's pixels that must be fabric"
    )
    veto_margin: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="normalised score above the image threshold from which suppression of every "
        "region no longer vetoes the alarm",
    )
    evidence_region: bool = Field(
        default=True,
        description="when such a score has no region at the pixel threshold where it came from,"
        " keep that spot at half its height above the tile's median (below_threshold)",
    )


Window = tuple[int, int, int, int]  # y0, x0, y1, x1 (end exclusive)


@dataclass(frozen=True)
class Region:
    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float
    mean: float
    reason: str | None = None  # None for kept regions
    # below the pixel threshold: the spot a strong image score came from, at half its height
    below_threshold: bool = False

    def to_json(self) -> dict[str, Any]:
        box = {"x": self.x, "y": self.y, "width": self.width, "height": self.height}
        data: dict[str, Any] = {"bbox": box, "area": self.area, "peak": self.peak}
        data["mean"] = self.mean
        if self.reason is not None:
            data["reason"] = self.reason
        if self.below_threshold:
            data["below_threshold"] = True
        return data


@dataclass
class PostProcessResult:
    mask: np.ndarray  # uint8 H x W, 255 where a kept region is (valid pixels only)
    kept: list[Region]
    suppressed: list[Region]
    settings: SuppressionSettings

    @property
    def all_suppressed(self) -> bool:
        """Components were found and every one of them was suppressed."""
        return bool(self.suppressed) and not self.kept


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return values
    return np.asarray(cv2.GaussianBlur(values, (0, 0), sigmaX=sigma, sigmaY=sigma))


def _suppression_reason(
    area: int, valid_share: float, peak: float, settings: SuppressionSettings
) -> str | None:
    if valid_share < settings.min_valid_fraction:
        return "outside_valid_area"
    if area < settings.min_region_area:
        return "area_below_min"
    if peak < settings.min_region_peak:
        return "peak_below_min"
    return None


def _evidence_label(
    labels: np.ndarray, smoothed: np.ndarray, valid: np.ndarray, window: Window | None
) -> int:
    """The component holding the highest fabric pixel of ``window`` (0: none there)."""
    if window is None:
        return 0
    y0, x0, y1, x1 = window
    values = np.where(valid[y0:y1, x0:x1], smoothed[y0:y1, x0:x1], -np.inf)
    if not np.isfinite(values).any():
        return 0
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(labels[y0 + y, x0 + x])


def _evidence_region(
    normalized_map: np.ndarray, valid: np.ndarray, window: Window
) -> tuple[Region, np.ndarray] | None:
    """The spot the score came from when no component reaches the pixel threshold there: in
    ``window``, the fabric pixels connected to its highest one that stand at least half as far
    above the window's median as it does (its extent at half height), and their mask (bool,
    image-sized); None without fabric in the window or a spot above the median."""
    y0, x0, y1, x1 = window
    values = normalized_map[y0:y1, x0:x1]
    fabric = valid[y0:y1, x0:x1]
    if not fabric.any():
        return None
    on_fabric = np.where(fabric, values, -np.inf)
    y, x = np.unravel_index(int(np.argmax(on_fabric)), values.shape)
    peak, level = float(values[y, x]), float(np.median(values[fabric]))
    if not peak > level:
        return None
    half = (values >= level + 0.5 * (peak - level)) & fabric
    _, labels = cv2.connectedComponents(half.astype(np.uint8), connectivity=8)
    spot = labels == labels[y, x]
    rows, columns = np.nonzero(spot)
    top, left = int(rows.min()), int(columns.min())
    height, width = int(rows.max()) - top + 1, int(columns.max()) - left + 1
    pixels = values[spot]
    region = Region(
        x0 + left, y0 + top, width, height, int(spot.sum()), round(peak, 4),
        round(float(pixels.mean()), 4), None, True,
    )  # fmt: skip
    mask = np.zeros(normalized_map.shape, dtype=bool)
    mask[y0:y1, x0:x1] = spot
    return region, mask


def postprocess(
    normalized_map: np.ndarray,
    valid: np.ndarray,
    settings: SuppressionSettings,
    evidence: Window | None = None,
) -> PostProcessResult:
    """Find, judge and log the regions of a normalised anomaly map (threshold 0.5), smoothed
    already (see the module).

    ``evidence`` is the window (y0, x0, y1, x1) the image score came from, given when that
    score alone makes the image anomalous: the region at its highest pixel is the decision's
    own evidence and is not suppressed for its area or peak (only for lying off the fabric).
    """
    binary = (normalized_map >= 0.5).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    evidence_label = _evidence_label(labels, normalized_map, valid, evidence)
    mask = np.zeros(binary.shape, dtype=np.uint8)
    kept: list[Region] = []
    suppressed: list[Region] = []
    for label in range(1, count):
        x, y, width, height, total = (int(v) for v in stats[label])
        box_labels = labels[y : y + height, x : x + width] == label
        box_valid = valid[y : y + height, x : x + width] & box_labels
        area = int(box_valid.sum())
        box_map = normalized_map[y : y + height, x : x + width]
        region_pixels = box_map[box_valid if area else box_labels]
        peak, mean = float(region_pixels.max()), float(region_pixels.mean())
        reason = _suppression_reason(area, area / total, peak, settings)
        if label == evidence_label and reason in ("area_below_min", "peak_below_min"):
            reason = None
        region = Region(x, y, width, height, area, round(peak, 4), round(mean, 4), reason)
        if reason is None:
            kept.append(region)
            mask[y : y + height, x : x + width][box_valid] = 255
        else:
            suppressed.append(region)
    if evidence is not None and evidence_label == 0 and settings.evidence_region:
        # nothing at the pixel threshold where the score came from: show that spot anyway
        found = _evidence_region(normalized_map, valid, evidence)
        if found is not None:
            kept.append(found[0])
            mask[found[1]] = 255
    kept.sort(key=lambda r: r.peak, reverse=True)
    return PostProcessResult(mask=mask, kept=kept, suppressed=suppressed, settings=settings)


@dataclass(frozen=True)
class Verdict:
    anomalous: bool
    vetoed: bool  # the score reached the threshold but suppression turned the alarm off
    reason: str  # one line a person can read: why this decision


def decide(normalized_score: float, threshold: float, result: PostProcessResult) -> Verdict:
    """The image decision rule described in the module docstring."""
    score = f"score {normalized_score:.3f}"
    if normalized_score < threshold:
        return Verdict(False, False, f"{score} below the threshold {threshold:.3f}")
    above = f"{score} reached the threshold {threshold:.3f}"
    margin = result.settings.veto_margin
    if result.kept:
        below = sum(region.below_threshold for region in result.kept)
        extra = f" ({below} below the pixel threshold: where the score came from)" if below else ""
        return Verdict(True, False, f"{above}; {len(result.kept)} region(s) kept{extra}")
    if not result.suppressed:
        return Verdict(
            True, False, f"{above}; no region at the pixel threshold (the score is the evidence)"
        )
    count = len(result.suppressed)
    if normalized_score < threshold + margin:
        return Verdict(
            False,
            True,
            f"vetoed: {above} by less than {margin:.3f} and all {count} region(s) were suppressed",
        )
    return Verdict(
        True,
        False,
        f"{above} by {margin:.3f} or more; all {count} region(s) were suppressed, the score is "
        "the evidence",
    )


def settle(result: PostProcessResult, verdict: Verdict) -> PostProcessResult:
    """The regions as reported: an image decided normal keeps none (and says why in the log)."""
    if verdict.anomalous or not result.kept:
        return result
    dropped = [replace(region, reason="image_not_anomalous") for region in result.kept]
    suppressed = sorted([*result.suppressed, *dropped], key=lambda r: r.peak, reverse=True)
    return replace(result, mask=np.zeros_like(result.mask), kept=[], suppressed=suppressed)
