"""Learning the calibration (operating point, pixel threshold, region settings) on held-out data.

The operating point is set where the decision is made: on whole images (strips), from images the
model never fitted on.

- Image threshold, rule ``false_alarm`` (the default): the defect-free validation images are held
  back from fitting and from best-state selection (``training.train`` selects on defective images
  only), so their scores are what a new defect-free strip scores. Two bounds turn ``n`` of them
  into a threshold for ``target`` false alarms (``false_alarm_bound``):

  - ``conformal``: with the scores sorted, just above the ``k``-th, ``k = ceil((n + 1)(1 -
    target))``; for exchangeable scores a new defect-free image exceeds it with probability at
    most ``(n + 1 - k)/(n + 1)`` (the split-conformal bound), whatever their law. It reaches a
    target only with ``n >= 1/target - 1`` images (19 for 5 %, 9 for 10 %); with fewer it sits
    just above the highest and promises ``1/(n + 1)``: 25 % from the 3 strips a fabric of AITEX
    holds back.
  - ``gaussian``: the one-sided prediction bound of a normal law fitted to them, ``mean + t(1 -
    target; n - 1) * sd * sqrt(1 + 1/n)`` (Student's t, so the uncertainty of a mean and a spread
    from ``n`` images is in it): a new defect-free image exceeds it with probability ``target``
    when the scores are normal, from 2 images on. Judged on held-out AITEX strips (docs/fleets.md,
    "Where the operating point comes from") the false alarms it gave matched the target.
  - ``auto`` (the default): conformal where the images reach the target, gaussian where not.

  The defect-free images the model was fitted on join the held-back ones
  (``use_training_images``) unless a one-sided Mann-Whitney test finds them scoring lower
  (p < ``optimism_p``): a model that learned them would make the threshold optimistic. On AITEX,
  DRAEM's fitted-on strips score like new ones, and 3 held back + 6 fitted on reach 10 %.
  A bootstrap over the images gives the threshold's 95 % interval.
- Image threshold, rule ``f1``: F1-optimal over validation images with the two classes weighted
  equally (the split holds every defective image but only some defect-free ones).
- Pixel threshold and region settings: the regions an operator is shown must find the defects
  and little else, so they are chosen by region F1 (``training.decisions``: defect regions found,
  kept regions on a defect) over the validation images, through the serving path (calibrate,
  post-process, decide) at the fitted image threshold. Candidates: the pixel-F1 threshold and
  high quantiles of defect-free pixel scores and a minimum area of 1, 5, 10 or 20 px (AITEX
  defects are 9-54 px). Without defect masks: the ``pixel_percentile`` percentile of
  defect-free pixels and the configured suppression.
- Smoothing: the map the regions are cut from is also the map an operator is shown and
  evaluation judges, so its Gaussian sigma (0, 1, 2 or 4 px) is chosen, with ``smoothing_by``
  ``pixel_ap`` (the default), by the pixel average precision of that map over the validation
  images with known pixels (defect-free ones and defective ones with a mask; ties go to the
  smaller sigma), before the threshold and area are fitted at it; with ``region_f1`` it is one
  more dimension of the region-F1 grid.
- Normalisation: min and max of the observed raw scores (see ``models.calibration``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import precision_recall_curve

from models.calibration import Calibration
from models.pipeline import Analysis, Detector
from models.postprocess import SuppressionSettings, smooth
from training.config import CalibrationConfig, FalseAlarmBound
from training.decisions import StripOutcome, count_regions, region_precision
from training.metrics import pixel_ap

PIXEL_QUANTILES = (99.9, 99.95, 99.99, 99.995, 99.999)
SMOOTHING_SIGMAS = (0.0, 1.0, 2.0, 4.0)
MIN_AREAS = (1, 5, 10, 20)
THRESHOLD_RESAMPLES = 1000


class CalibrationError(ValueError):
    """The validation data cannot support the calibration asked for (one line for the user)."""


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


def required_clean_images(target: float) -> int:
    """Held-back defect-free images for the conformal bound to reach ``target``."""
    return max(1, math.ceil(1.0 / target - 1.0 - 1e-9))


def check_clean_images(count: int, config: CalibrationConfig, where: str) -> None:
    """Fail early (one line) when too few defect-free images are held back for the rule."""
    if config.image_rule == "false_alarm" and count < config.min_clean_images:
        raise CalibrationError(
            f"{where}: the operating point needs at least {config.min_clean_images} defect-free "
            f"images held back from fitting, the split holds back {count}; add defect-free "
            "images or raise data.val_fraction (calibration.min_clean_images sets the minimum)"
        )


def _just_above(value: float) -> float:
    return float(np.nextafter(value, math.inf))


def conformal_threshold(
    clean: np.ndarray, target: float, seed: int
) -> tuple[float, dict[str, Any]]:
    """Just above the ``ceil((n + 1)(1 - target))``-th of ``n`` defect-free scores, and its
    evidence (the distribution-free bound)."""
    ordered = np.sort(np.asarray(clean, dtype=np.float64))
    n = ordered.size
    wanted = math.ceil((n + 1) * (1.0 - target))
    rank = min(wanted, n)
    threshold = _just_above(float(ordered[rank - 1]))
    rng = np.random.default_rng(seed)
    resampled = np.sort(rng.choice(ordered, size=(THRESHOLD_RESAMPLES, n), replace=True), axis=1)
    low, high = np.quantile(resampled[:, rank - 1], [0.025, 0.975])
    evidence = {
        "rule": "false_alarm",
        "bound": "conformal",
        "target_false_alarm": target,
        "held_back_defect_free": n,
        "defect_free_images": n,
        "rank": rank,
        "false_alarm_bound": (n + 1 - rank) / (n + 1),
        "target_reachable": wanted <= n,
        "images_needed_for_target": required_clean_images(target),
        "threshold_ci95": [float(low), float(high)],
        "held_back_false_alarms": int((ordered >= threshold).sum()),
    }
    return threshold, evidence


def gaussian_factor(n: int, target: float) -> float:
    """How many standard deviations above the mean of ``n`` normal scores a new one stays below
    with probability ``1 - target`` (the one-sided prediction bound, Student's t)."""
    return float(stats.t.ppf(1.0 - target, n - 1) * math.sqrt(1.0 + 1.0 / n))


def _gaussian_bound(scores: np.ndarray, factor: float) -> np.ndarray:
    """The bound for each row of ``scores`` (its mean plus ``factor`` sample deviations)."""
    return np.asarray(scores.mean(axis=-1) + factor * scores.std(axis=-1, ddof=1))


def gaussian_threshold(clean: np.ndarray, target: float, seed: int) -> tuple[float, dict[str, Any]]:
    """The normal prediction bound of ``n >= 2`` defect-free scores for ``target``, and its
    evidence."""
    values = np.asarray(clean, dtype=np.float64)
    n = values.size
    if n < 2:
        raise CalibrationError(
            f"the gaussian false-alarm bound needs at least 2 defect-free images held back, "
            f"there is {n}"
        )
    factor = gaussian_factor(n, target)
    threshold = float(_gaussian_bound(values, factor))
    rng = np.random.default_rng(seed)
    resampled = rng.choice(values, size=(THRESHOLD_RESAMPLES, n), replace=True)
    low, high = np.quantile(_gaussian_bound(resampled, factor), [0.025, 0.975])
    evidence = {
        "rule": "false_alarm",
        "bound": "gaussian",
        "target_false_alarm": target,
        "held_back_defect_free": n,
        "defect_free_images": n,
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)),
        "sd_factor": factor,
        # what the threshold promises if the defect-free scores are normal
        "false_alarm_bound": target,
        # what the highest held-back image alone would promise, whatever their law
        "conformal_bound": 1.0 / (n + 1),
        "images_needed_for_target": required_clean_images(target),
        "threshold_ci95": [float(low), float(high)],
        "held_back_false_alarms": int((values >= threshold).sum()),
    }
    return threshold, evidence


def false_alarm_threshold(
    clean: np.ndarray, target: float, seed: int, bound: FalseAlarmBound = "auto"
) -> tuple[float, dict[str, Any]]:
    """The raw threshold for ``target`` false alarms on new defect-free images, and its evidence:
    ``bound`` conformal, gaussian, or auto (conformal where the images reach the target)."""
    n = np.asarray(clean).size
    if bound == "conformal" or (bound == "auto" and n >= required_clean_images(target)):
        return conformal_threshold(clean, target, seed)
    return gaussian_threshold(clean, target, seed)


def _images_text(evidence: dict[str, Any]) -> str:
    """What the operating point's defect-free images were: held back, and fitted on."""
    held = evidence["held_back_defect_free"]
    extra = evidence.get("training_images")
    if extra is None:
        return f"{held} held-back defect-free images"
    if extra["used"]:
        return (
            f"{held + extra['images']} defect-free images ({held} held back, {extra['images']} "
            f"fitted on, which score no lower: p {extra['p_lower']:.2f})"
        )
    return (
        f"{held} held-back defect-free images (the {extra['images']} fitted on left out: they "
        f"score lower, p {extra['p_lower']:.3f})"
    )


def describe_operating_point(evidence: dict[str, Any]) -> str:
    """One line for the user: what the operating point rests on and how sure it is."""
    if evidence.get("rule") != "false_alarm":
        return f"image threshold by {evidence.get('rule', 'unknown rule')}"
    bound = evidence["false_alarm_bound"]
    low, high = evidence["threshold_ci95"]
    target = evidence["target_false_alarm"]
    images = _images_text(evidence)
    if evidence.get("bound") == "gaussian":
        return (
            f"operating point from {images}, a normal law fitted to them: false alarms on new "
            f"images {bound:.0%} expected if their scores are normal (target {target:.0%}; the "
            f"highest of them alone promises <= {evidence['conformal_bound']:.0%}); raw "
            f"threshold 95% CI [{low:.5g}, {high:.5g}]"
        )
    text = (
        f"operating point from {images}: false alarms on new images <= {bound:.0%} expected "
        f"(target {target:.0%}); raw threshold 95% CI [{low:.5g}, {high:.5g}]"
    )
    if not evidence["target_reachable"]:
        text += (
            f"; the target needs {evidence['images_needed_for_target']} defect-free images, "
            "so the threshold sits just above the highest one"
        )
    return text


REFERENCE_MAX = 1000  # raw scores kept as the drift reference


def reference_scores(clean: np.ndarray) -> dict[str, Any]:
    """Defect-free raw image scores (at most REFERENCE_MAX, evenly spread quantiles when there
    are more), kept with the calibration: the service compares the scores it sees against them
    (score drift, ``app.drift``)."""
    ordered = np.sort(np.asarray(clean, dtype=np.float64))
    if ordered.size > REFERENCE_MAX:
        ordered = np.quantile(ordered, np.linspace(0.0, 1.0, REFERENCE_MAX))
    return {"defect_free_scores": [float(f"{value:.6g}") for value in ordered]}


def training_evidence(
    held_back: np.ndarray, trained: np.ndarray, config: CalibrationConfig
) -> dict[str, Any]:
    """Whether the scores of defect-free images the model was fitted on may join the held-back
    ones: not when they look optimistic (lower), by a one-sided Mann-Whitney test."""
    p_value = float(stats.mannwhitneyu(held_back, trained, alternative="greater").pvalue)
    return {
        "images": int(trained.size),
        "mean": float(trained.mean()),
        "held_back_mean": float(held_back.mean()),
        "p_lower": p_value,
        "used": p_value >= config.optimism_p,
    }


def image_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    config: CalibrationConfig,
    seed: int,
    where: str,
    trained: Sequence[float] = (),
) -> tuple[float, dict[str, Any], str]:
    """The raw image threshold ``config``'s rule sets from labelled image scores alone, its
    evidence and the method text (``where`` names the data in an error). ``trained``: scores
    of defect-free images the model was fitted on, joined to the held-back defect-free ones
    for the false-alarm rule when ``training_evidence`` allows."""
    if config.image_rule == "false_alarm":
        clean = scores[labels == 0]
        check_clean_images(clean.size, config, where)
        pooled, extra = clean, None
        if config.use_training_images and len(trained) > 0:
            extra = training_evidence(clean, np.asarray(trained, dtype=np.float64), config)
            if extra["used"]:
                pooled = np.concatenate([clean, np.asarray(trained, dtype=np.float64)])
        threshold, evidence = false_alarm_threshold(
            pooled, config.target_false_alarm, seed, config.false_alarm_bound
        )
        evidence["held_back_defect_free"] = int(clean.size)
        if extra is not None:
            evidence["training_images"] = extra
        return threshold, evidence, f"image:false-alarm-{config.target_false_alarm:g}"
    if 0 < labels.sum() < labels.size:
        # Both classes weigh the same: a validation split is mostly defective images (every
        # defective image goes there), and plain F1 then rewards flagging everything.
        counts = np.bincount(labels, minlength=2)
        balance = np.where(labels == 1, 0.5 / counts[1], 0.5 / counts[0])
        return f1_optimal_threshold(labels, scores, balance), {"rule": "f1"}, "image:f1-balanced"
    raise CalibrationError(
        f"{where}: image_rule f1 needs both defective and defect-free images; there are "
        f"{int(labels.sum())} defective of {labels.size}"
    )


def fit_calibration(
    samples: CalibrationSamples,
    config: CalibrationConfig,
    seed: int = 0,
    trained: Sequence[float] = (),
) -> Calibration:
    """Image threshold by the configured rule, pixel threshold by pixel F1 (or a percentile)."""
    if not samples.image_scores:
        raise ValueError("no validation image to calibrate on")
    image_scores = np.asarray(samples.image_scores, dtype=np.float64)
    image_labels = np.asarray(samples.image_labels)
    pixels = np.concatenate(samples.pixel_scores) if samples.pixel_scores else np.zeros(1)
    truth = np.concatenate(samples.pixel_labels) if samples.pixel_labels else np.zeros(1, bool)
    clean = image_scores[image_labels == 0]
    image_threshold_, evidence, method = image_threshold(
        image_scores, image_labels, config, seed, "calibration", trained
    )
    methods = [method]
    if truth.any() and not truth.all():
        weights = np.where(truth, 1.0, 1.0 / config.negative_pixel_rate)
        pixel_threshold = f1_optimal_threshold(truth, pixels, weights)
        methods.append("pixel:f1")
    else:
        pixel_threshold = float(np.percentile(pixels[~truth], config.pixel_percentile))
        methods.append(f"pixel:p{config.pixel_percentile:g}")
    return Calibration(
        image_threshold=image_threshold_,
        image_min=float(image_scores.min()),
        image_max=float(max(image_scores.max(), image_threshold_)),
        pixel_threshold=pixel_threshold,
        pixel_min=float(pixels.min()),
        pixel_max=float(max(pixels.max(), pixel_threshold)),
        method=",".join(methods),
        evidence={"operating_point": evidence, "reference": reference_scores(clean)},
    )


# --- region settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionCandidate:
    pixel_threshold: float
    source: str  # where the threshold came from, e.g. "pixel-f1" or "defect-free q99.99"
    smoothing_sigma: float
    min_region_area: int

    def apply(
        self, calibration: Calibration, base: SuppressionSettings
    ) -> tuple[Calibration, SuppressionSettings]:
        """The calibration and suppression settings this candidate stands for."""
        fitted = calibration.model_copy(
            update={
                "pixel_threshold": self.pixel_threshold,
                "pixel_max": max(calibration.pixel_max, self.pixel_threshold),
            }
        )
        settings = base.model_copy(
            update={
                "smoothing_sigma": self.smoothing_sigma,
                "min_region_area": self.min_region_area,
                "min_region_peak": 0.5,  # the fitted pixel threshold is the peak a region needs
            }
        )
        return fitted, settings


LabelledAnalysis = tuple[int, Analysis, np.ndarray | None]  # label, analysis, mask or None


def _judge(
    detector: Detector,
    analysed: Sequence[LabelledAnalysis],
    calibration: Calibration,
    settings: SuppressionSettings,
) -> list[StripOutcome]:
    outcomes = []
    for index, (label, analysis, mask) in enumerate(analysed):
        prediction = detector.finish(analysis, suppression=settings, calibration=calibration)
        known = label == 0 or mask is not None
        counts = count_regions(prediction.post.mask, mask, analysis.valid) if known else None
        outcomes.append(
            StripOutcome(str(index), label, None, analysis.score, prediction.decision, counts)
        )
    return outcomes


def fit_regions(
    detector: Detector,
    analysed: Sequence[LabelledAnalysis],
    calibration: Calibration,
    samples: CalibrationSamples,
    base: SuppressionSettings,
    sigmas: Sequence[float] = SMOOTHING_SIGMAS,
) -> tuple[Calibration, SuppressionSettings, dict[str, Any]]:
    """The pixel threshold, smoothing (of ``sigmas``) and minimum area with the best region F1
    (see the module).

    Returns the inputs unchanged, with the reason, when no validation image has a defect mask.
    """
    if not has_defect_masks(analysed):
        return calibration, base, {"fitted": False, "reason": "no defect mask in validation"}
    clean_pixels = [
        scores[~truth]
        for scores, truth in zip(samples.pixel_scores, samples.pixel_labels, strict=True)
    ]
    pool = np.concatenate(clean_pixels) if clean_pixels else np.zeros(0)
    thresholds = {"pixel-f1": calibration.pixel_threshold}
    if pool.size:
        for quantile in PIXEL_QUANTILES:
            thresholds[f"defect-free q{quantile:g}"] = float(np.percentile(pool, quantile))
    # Only images that can raise an alarm show regions; the others add nothing to region F1.
    alarms = [calibration.normalize_image(item[1].score) >= 0.5 for item in analysed]
    alarming = [item for item, alarm in zip(analysed, alarms, strict=True) if alarm]
    missed = [item for item, alarm in zip(analysed, alarms, strict=True) if not alarm]
    missed_defects = sum(
        count_regions(np.zeros_like(mask), mask, analysis.valid).defects
        for label, analysis, mask in missed
        if label == 1 and mask is not None
    )
    best: tuple[tuple[float, float, float], RegionCandidate, dict[str, float]] | None = None
    for (source, threshold), sigma, area in itertools.product(
        thresholds.items(), sigmas, MIN_AREAS
    ):
        candidate = RegionCandidate(threshold, source, sigma, area)
        trial, settings = candidate.apply(calibration, base)
        outcomes = _judge(detector, alarming, trial, settings)
        index = np.arange(len(outcomes))
        found = sum(o.regions.defects_found for o in outcomes if o.regions)
        defects = sum(o.regions.defects for o in outcomes if o.regions) + missed_defects
        recall = found / defects if defects else math.nan
        precision = region_precision(outcomes, index)
        if not (math.isfinite(recall) and math.isfinite(precision)):
            continue
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        key = (f1, recall, -area)
        if best is None or key > best[0]:
            best = (key, candidate, {"region_f1": f1, "region_recall": recall})
            best[2]["region_precision"] = precision
    if best is None:
        return calibration, base, {"fitted": False, "reason": "no candidate kept any region"}
    _, chosen, figures = best
    fitted, settings = chosen.apply(calibration, base)
    fitted.method = calibration.method.replace("pixel:f1", "pixel:regions")
    evidence = {
        "fitted": True,
        "pixel_threshold_from": chosen.source,
        "smoothing_sigma": chosen.smoothing_sigma,
        "min_region_area": chosen.min_region_area,
        "candidates": len(thresholds) * len(sigmas) * len(MIN_AREAS),
        "validation_images": len(analysed),
        **figures,
    }
    return fitted, settings, evidence


def has_defect_masks(analysed: Sequence[LabelledAnalysis]) -> bool:
    return any(label == 1 and mask is not None and mask.any() for label, _, mask in analysed)


def smoothing_pixel_ap(
    analysed: Sequence[LabelledAnalysis], sigmas: Sequence[float]
) -> dict[float, float]:
    """Pixel AP of the map smoothed with each sigma (as ``Detector.finish`` smooths it) over the
    images whose pixels are known: defect-free ones, and defective ones with a mask."""
    known = [(label, a, m) for label, a, m in analysed if label == 0 or m is not None]
    masks = [np.zeros(a.valid.shape, bool) if m is None else m > 0 for _, a, m in known]
    valids = [a.valid for _, a, _ in known]
    return {
        float(sigma): float(
            pixel_ap(masks, [smooth(a.anomaly_map, sigma) for _, a, _ in known], valids)
        )
        for sigma in sigmas
    }


def fit_operating_point(
    detector: Detector,
    analysed: Sequence[LabelledAnalysis],
    config: CalibrationConfig,
    suppression: SuppressionSettings,
    seed: int = 0,
    trained: Sequence[float] = (),
) -> tuple[Calibration, SuppressionSettings]:
    """The whole calibration of labelled, analysed images, as training does it: the image
    threshold by the configured rule, the pixel threshold, and (with ``fit_regions`` and defect
    masks) the region settings by region F1; the evidence is in the calibration. ``trained``:
    the image scores of defect-free images the model was fitted on (``image_threshold``)."""
    chosen = 0.0  # the sigma chosen by pixel AP; 0: none chosen (region_f1's grid, no masks)
    sigmas: Sequence[float] = SMOOTHING_SIGMAS
    smoothing: dict[str, Any] = {"smoothing_by": config.smoothing_by}
    by_pixel_ap = config.fit_regions and config.smoothing_by == "pixel_ap"
    if by_pixel_ap and has_defect_masks(analysed):
        by_sigma = smoothing_pixel_ap(analysed, SMOOTHING_SIGMAS)
        chosen = max(by_sigma, key=lambda sigma: (by_sigma[sigma], -sigma))
        sigmas = (chosen,)
        smoothing["pixel_ap_by_sigma"] = {f"{k:g}": round(v, 4) for k, v in by_sigma.items()}
    # The pixel threshold and range are fitted on the map as served: smoothed with the sigma
    # chosen by pixel AP (with the grid of region_f1, on the map as the network gives it).
    samples = CalibrationSamples(rate=config.negative_pixel_rate, seed=seed)
    for label, analysis, mask in analysed:
        pixels = smooth(analysis.anomaly_map, chosen)
        samples.add(analysis.score, label, pixels, analysis.valid, mask)
    calibration = fit_calibration(samples, config, seed, trained)
    if config.fit_regions:
        calibration, suppression, regions = fit_regions(
            detector, analysed, calibration, samples, suppression, sigmas
        )
        calibration.evidence["regions"] = {**regions, **smoothing}
    return calibration, suppression
