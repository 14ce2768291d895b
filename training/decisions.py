"""Judging decisions, not rankings: detection and false-alarm rates, region recall and precision,
each with a bootstrap interval over strips, and the paired comparison that promotion rests on.

The unit of resampling is the strip (one input image): tiles and regions of one strip are not
independent, so resampling them would make intervals look narrower than they are.

- ``detection_rate``: defective strips decided anomalous / defective strips.
- ``false_alarm_rate``: defect-free strips decided anomalous / defect-free strips.
- ``region_recall``: ground-truth defect regions (8-connected components of the mask, on fabric)
  touched by a kept region / ground-truth regions. Strips without a mask do not count.
- ``region_precision``: kept regions that touch a defect / kept regions, over every strip with
  known pixels (a kept region on a defect-free strip is a false region).
- "touch" allows ``tolerance`` pixels of slack around the mask: AITEX masks are drawn by hand
  with soft edges and the maps are smoothed, so a region two pixels beside a defect found it.

Intervals are 95 % percentile bootstrap intervals over strips (2,000 resamples by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

DEFAULT_TOLERANCE = 4
DEFAULT_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class RegionCounts:
    defects: int  # ground-truth defect regions on fabric
    defects_found: int  # of those, touched by a kept region
    regions: int  # kept regions
    regions_on_defect: int  # of those, touching a defect


def count_regions(
    kept_mask: np.ndarray,
    defect_mask: np.ndarray | None,
    valid: np.ndarray,
    tolerance: int = DEFAULT_TOLERANCE,
) -> RegionCounts:
    """Match kept regions (non-zero pixels of ``kept_mask``) with ground-truth defect regions."""
    kept = (np.asarray(kept_mask) > 0).astype(np.uint8)
    n_kept, kept_labels = cv2.connectedComponents(kept, connectivity=8)
    if defect_mask is None:
        return RegionCounts(0, 0, n_kept - 1, 0)
    truth = ((np.asarray(defect_mask) > 0) & np.asarray(valid, bool)).astype(np.uint8)
    n_truth, truth_labels = cv2.connectedComponents(truth, connectivity=8)
    if tolerance > 0:
        size = 2 * tolerance + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        near_truth = cv2.dilate(truth, kernel) > 0
        near_kept = cv2.dilate(kept, kernel) > 0
    else:
        near_truth, near_kept = truth > 0, kept > 0
    found = np.unique(truth_labels[near_kept])
    on_defect = np.unique(kept_labels[near_truth])
    return RegionCounts(
        defects=n_truth - 1,
        defects_found=int((found > 0).sum()),
        regions=n_kept - 1,
        regions_on_defect=int((on_defect > 0).sum()),
    )


@dataclass
class StripOutcome:
    """What the detector decided about one strip, with what is needed to re-judge it."""

    name: str
    label: int  # 1 = has a defect
    defect: str | None
    score: float  # raw strip score
    decision: bool
    regions: RegionCounts | None  # None when the strip's pixels are not known (no mask)
    tile_labels: list[int] = field(default_factory=list)
    tile_scores: list[float] = field(default_factory=list)


# --- figures over a set of strips (given as indices, so that bootstrap can resample them) ------

Figure = Callable[[Sequence[StripOutcome], np.ndarray], float]


def _rate(outcomes: Sequence[StripOutcome], index: np.ndarray, label: int) -> float:
    chosen = [outcomes[i].decision for i in index if outcomes[i].label == label]
    return float(np.mean(chosen)) if chosen else math.nan


def detection_rate(outcomes: Sequence[StripOutcome], index: np.ndarray) -> float:
    return _rate(outcomes, index, 1)


def false_alarm_rate(outcomes: Sequence[StripOutcome], index: np.ndarray) -> float:
    return _rate(outcomes, index, 0)


def decision_balance(outcomes: Sequence[StripOutcome], index: np.ndarray) -> float:
    """Detection rate minus false-alarm rate (Youden's J of the decisions): 1 is perfect."""
    return detection_rate(outcomes, index) - false_alarm_rate(outcomes, index)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def region_recall(outcomes: Sequence[StripOutcome], index: np.ndarray) -> float:
    counts = [outcomes[i].regions for i in index]
    known = [c for c in counts if c is not None]
    return _ratio(sum(c.defects_found for c in known), sum(c.defects for c in known))


def region_precision(outcomes: Sequence[StripOutcome], index: np.ndarray) -> float:
    counts = [outcomes[i].regions for i in index]
    known = [c for c in counts if c is not None]
    return _ratio(sum(c.regions_on_defect for c in known), sum(c.regions for c in known))


def strip_auroc(outcomes: Sequence[StripOutcome], index: np.ndarray) -> float:
    labels = [outcomes[i].label for i in index]
    if len(set(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, [outcomes[i].score for i in index]))


def tile_auroc(outcomes: Sequence[StripOutcome], index: np.ndarray) -> float:
    labels = [label for i in index for label in outcomes[i].tile_labels]
    if len(set(labels)) < 2:
        return math.nan
    scores = [score for i in index for score in outcomes[i].tile_scores]
    return float(roc_auc_score(labels, scores))


FIGURES: dict[str, Figure] = {
    "detection_rate": detection_rate,
    "false_alarm_rate": false_alarm_rate,
    "decision_balance": decision_balance,
    "region_recall": region_recall,
    "region_precision": region_precision,
    "strip_auroc": strip_auroc,
    "image_auroc": tile_auroc,  # over tiles, as `evaluate` reports it for tiled strips
}
LOWER_IS_BETTER = frozenset({"false_alarm_rate"})


# --- intervals ----------------------------------------------------------------------------------


def _resampled(
    statistic: Callable[[np.ndarray], float], n: int, seed: int, resamples: int
) -> np.ndarray:
    """``statistic`` on ``resamples`` bootstrap resamples of the indices 0..n-1, NaNs dropped.

    Written out rather than ``scipy.stats.bootstrap``: a resample may lack a class (no defective
    strip, so no detection rate), and scipy turns any NaN statistic into a NaN interval.
    """
    if n == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    values = np.fromiter(
        (statistic(rng.integers(0, n, n)) for _ in range(resamples)), float, resamples
    )
    return values[np.isfinite(values)]


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - CONFIDENCE) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def interval(
    outcomes: Sequence[StripOutcome],
    figure: Figure,
    *,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``figure``, resampling whole strips (NaN when undefined).

    Resamples where the figure does not exist (no defective strip drawn, say) are left out.
    """
    if not math.isfinite(figure(outcomes, np.arange(len(outcomes)))):
        return math.nan, math.nan
    values = _resampled(lambda index: figure(outcomes, index), len(outcomes), seed, resamples)
    return _percentiles(values)


DECISION_KEYS = (
    "detection_rate",
    "false_alarm_rate",
    "region_recall",
    "region_precision",
)


def decision_metrics(
    outcomes: Sequence[StripOutcome], *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES
) -> dict[str, Any]:
    """The decision figures with their 95 % intervals (``<key>_ci95_low``, ``<key>_ci95_high``).

    Flat numbers only, so that they go to MLflow metrics and the bundle manifest as they are.
    """
    everything = np.arange(len(outcomes))
    result: dict[str, Any] = {}
    for key in DECISION_KEYS:
        figure = FIGURES[key]
        result[key] = figure(outcomes, everything)
        low, high = interval(outcomes, figure, seed=seed, resamples=resamples)
        result[f"{key}_ci95_low"], result[f"{key}_ci95_high"] = low, high
    known = [o.regions for o in outcomes if o.regions is not None]
    result.update(
        n_defective_strips=sum(o.label == 1 for o in outcomes),
        n_defect_free_strips=sum(o.label == 0 for o in outcomes),
        n_defect_regions=sum(c.defects for c in known),
        n_kept_regions=sum(c.regions for c in known),
    )
    return result


def per_defect_decisions(
    outcomes: Sequence[StripOutcome], *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES
) -> list[dict[str, Any]]:
    """Detection rate and region recall per defect code, with intervals; defect-free last."""
    groups: dict[str, list[StripOutcome]] = {}
    for outcome in outcomes:
        key = (outcome.defect or "unknown") if outcome.label == 1 else "defect-free"
        groups.setdefault(key, []).append(outcome)
    rows = []
    for code in sorted(groups, key=lambda c: (c == "defect-free", c)):
        group = groups[code]
        everything = np.arange(len(group))
        rate = false_alarm_rate if code == "defect-free" else detection_rate
        row: dict[str, Any] = {
            "defect": code,
            "n": len(group),
            "decided_anomalous": sum(o.decision for o in group),
            "rate": rate(group, everything),
            "rate_ci95": list(interval(group, rate, seed=seed, resamples=resamples)),
        }
        if code != "defect-free":
            row["region_recall"] = region_recall(group, everything)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class PairedComparison:
    metric: str
    champion: float
    challenger: float
    difference: float  # challenger - champion, signed so that positive is better
    low: float
    high: float
    n_strips: int

    def describe(self) -> str:
        return (
            f"{self.metric}: challenger {self.challenger:.4f}, champion {self.champion:.4f}; "
            f"improvement {self.difference:+.4f}, 95% CI [{self.low:+.4f}, {self.high:+.4f}] "
            f"over {self.n_strips} common strips (paired bootstrap)"
        )


class NoCommonDataError(ValueError):
    """The two outcome lists share no strip to compare on."""


def paired_comparison(
    champion: Sequence[StripOutcome],
    challenger: Sequence[StripOutcome],
    metric: str,
    *,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
) -> PairedComparison:
    """Challenger minus champion on the strips both were judged on, resampled together."""
    figure = FIGURES[metric]
    by_name = {o.name: o for o in champion}
    common = sorted(name for name in {o.name for o in challenger} if name in by_name)
    if not common:
        raise NoCommonDataError("the two models were judged on no common strip")
    theirs = [by_name[name] for name in common]
    ours_by_name = {o.name: o for o in challenger}
    ours = [ours_by_name[name] for name in common]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    everything = np.arange(len(common))
    champion_value, challenger_value = figure(theirs, everything), figure(ours, everything)
    differences = _resampled(
        lambda index: sign * (figure(ours, index) - figure(theirs, index)),
        len(common),
        seed,
        resamples,
    )
    low, high = _percentiles(differences)
    return PairedComparison(
        metric=metric,
        champion=champion_value,
        challenger=challenger_value,
        difference=sign * (challenger_value - champion_value),
        low=low,
        high=high,
        n_strips=len(common),
    )
