"""Score drift: the raw image scores the service sees against the calibration's reference.

The reference is the defect-free raw scores the model was calibrated on (``reference`` in the
calibration's evidence, written by ``loomwatch train`` and ``loomwatch calibrate``). Over a
sliding window of the latest predictions this module computes

- the population-stability index (PSI) of the window's scores over bins cut at the reference's
  quantiles (so each bin holds an equal share of the reference): 0 when the shares match;
  the usual reading is < 0.1 stable, 0.1-0.25 a shift worth a look, > 0.25 a real shift;
- the two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical
  distribution functions (0 .. 1);
- the window's anomaly rate and the mean area of the regions it kept.

Fabric or lighting that drifts away from what the model was calibrated on moves the scores
first, usually long before the false alarms pile up.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_WINDOW = 20  # scores before PSI and KS mean anything
PSI_FLOOR = 1e-4  # a share of zero in a bin counts as this much (PSI takes logarithms)


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> float:
    """Population-stability index of ``window`` against ``reference``, over bins that hold
    equal shares of the reference (fewer bins for a small reference: at least 10 scores per
    bin, as the shares of a few scores are mostly noise)."""
    bins = max(2, min(bins, reference.size // 10))
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1))[1:-1])
    expected = np.bincount(
        np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1
    )
    actual = np.bincount(np.searchsorted(edges, window, side="right"), minlength=edges.size + 1)
    e = np.maximum(expected / reference.size, PSI_FLOOR)
    a = np.maximum(actual / window.size, PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(reference: np.ndarray, window: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max |F_reference - F_window|."""
    points = np.concatenate([reference, window])
    f_ref = np.searchsorted(np.sort(reference), points, side="right") / reference.size
    f_win = np.searchsorted(np.sort(window), points, side="right") / window.size
    return float(np.max(np.abs(f_ref - f_win)))


def reference_of(evidence: dict[str, Any]) -> np.ndarray | None:
    """The defect-free reference scores of a calibration's evidence; None when it has none (a
    bundle from before drift monitoring: ``loomwatch calibrate`` gives it one)."""
    scores = (evidence.get("reference") or {}).get("defect_free_scores") or []
    values = np.asarray([value for value in scores if math.isfinite(value)], dtype=np.float64)
    return values if values.size >= 3 else None


@dataclass(frozen=True)
class WindowStats:
    size: int
    anomaly_rate: float
    mean_kept_area: float
    psi: float  # NaN until MIN_WINDOW scores, or without a reference
    ks: float


class DriftWindow:
    """The latest ``size`` predictions of one model on one fabric (thread-safe)."""

    def __init__(self, reference: np.ndarray | None, size: int) -> None:
        self.reference = reference
        self._scores: deque[float] = deque(maxlen=size)
        self._alarms: deque[bool] = deque(maxlen=size)
        self._areas: deque[int] = deque(maxlen=size)  # kept area of each anomalous prediction
        self._lock = threading.Lock()

    def add(self, raw_score: float, anomalous: bool, kept_area: int) -> WindowStats:
        with self._lock:
            self._scores.append(raw_score)
            self._alarms.append(anomalous)
            self._areas.append(kept_area)
            scores = np.fromiter(self._scores, dtype=np.float64)
            alarms = np.fromiter(self._alarms, dtype=bool)
            areas = np.fromiter(self._areas, dtype=np.float64)
        kept = areas[alarms]
        drift_psi = drift_ks = math.nan
        if self.reference is not None and scores.size >= MIN_WINDOW:
            drift_psi, drift_ks = psi(self.reference, scores), ks(self.reference, scores)
        return WindowStats(
            size=int(scores.size),
            anomaly_rate=float(alarms.mean()),
            mean_kept_area=float(kept.mean()) if kept.size else 0.0,
            psi=drift_psi,
            ks=drift_ks,
        )
