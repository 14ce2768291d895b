"""Judging a fleet: every fabric it has a model for, one table, pooled figures, intervals.

Per fabric, the usual figures of ``loomwatch evaluate`` (computed exactly, as for one model) with
a 95 % percentile bootstrap interval beside each (``<key>_ci95_low`` / ``<key>_ci95_high``),
resampling whole strips (the strip is the unit: its tiles and pixels are not independent):

* ``image_auroc`` (over tiles), ``strip_auroc``, ``detection_rate``, ``false_alarm_rate``:
  recomputed on each resample of the fabric's strips (``training.decisions``' figures);
* ``pixel_auroc``, ``pixel_ap``, ``aupro``: on each resample, from a fixed per-strip sample of
  pixels, weighted back to the strip's totals (AUPRO weighs each defect region equally), with
  fewer resamples (``pixel_resamples``) because each costs three pixel-level curves.

The pixel sample of a strip: at most ``STRIP_PIXELS`` of its defect pixels (a uniform sample,
each weighing defect pixels / kept), and its defect-free pixels stratified by rank. Pixel AP
(and the low-FPR end of the ROC) is decided by the extreme upper tail of defect-free scores: the
few defect-free pixels, out of a million per strip, that outscore the defects. A uniform sample of
0.1 % of them almost never holds those, so AP on it came out far too high (and now and then one
drawn tail pixel, weighing a thousand, crushed it): intervals that missed their own point
estimate. So the defect-free scores are ranked (descending) and cut into geometric bands of
ranks, ``[0, S)``, ``[S, B S)``, ``[B S, B^2 S)``, ... up to the strip's count (``S`` =
``STRIP_PIXELS``, ``B`` = ``BAND_GROWTH``): the top band is kept whole (weight 1), and each further
band is a uniform sample of ``S`` of its pixels weighing band size / ``S`` (kept whole, weight 1,
when it holds no more). Every threshold's count of defect-free pixels above it is then exact
within the top ``S`` and an unbiased estimate with a relative error of about ``1/sqrt(S)`` per
band beyond; an AITEX strip (4096 x 256 pixels) keeps at most 5 x ``S`` of its defect-free pixels.

Pooled over fabrics: ``strip_auroc`` over all strips on normalised scores (each fabric's own
calibration maps its threshold to 0.5, so scores of different models are comparable),
``detection_rate`` and ``false_alarm_rate`` over all strips (each decided by its fabric's model),
and macro averages (the mean over fabrics where a figure is defined) of every per-fabric figure
under the same key names. Intervals of pooled figures resample strips within each fabric
(a stratified bootstrap), so every resample keeps each fabric's share of strips.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from models.pipeline import Detector, Prediction
from tracking.fleet import Fleet
from tracking.uris import resolve_model_uri
from training.data import DatasetError, Sample, fingerprint, load_dataset, recorded_split
from training.decisions import CONFIDENCE, FIGURES, StripOutcome
from training.evaluate import Analysed, EvaluationResult, analyse_samples, run_evaluation
from training.metrics import _area_up_to, to_jsonable

KEYS = ("image_auroc", "strip_auroc", "pixel_auroc", "aupro", "pixel_ap",
        "detection_rate", "false_alarm_rate")  # fmt: skip
STRIP_KEYS = ("image_auroc", "strip_auroc", "detection_rate", "false_alarm_rate")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "aupro")
STRIP_PIXELS = 1000
BAND_GROWTH = 10  # each rank band of defect-free pixels is this many times the previous
AUPRO_FPR_LIMIT = 0.3
WORST_STRIPS = 4


@dataclass(frozen=True)
class StripPixels:
    """A fixed sample of one strip's valid pixels, for pixel figures on resampled strips."""

    positives: np.ndarray  # scores of sampled defect pixels
    regions: np.ndarray  # their region (0..n_regions-1, of this strip)
    region_kept: np.ndarray  # sampled pixels per region
    positive_weight: float  # defect pixels seen / kept
    negatives: np.ndarray  # scores of sampled defect-free pixels
    negative_weights: np.ndarray  # defect-free pixels each stands for (its rank band / kept)


def strip_pixels(
    analysed: Analysed, served: np.ndarray, rng: np.random.Generator
) -> StripPixels | None:
    """The pixel sample of one strip's ``served`` map (its prediction's smoothed, normalised
    map, as evaluation judges it); None when its pixels are not known (a defect without a mask,
    or with a mask that marks nothing on fabric)."""
    import cv2

    sample, analysis, mask = analysed
    if mask is None and sample.label == 1:
        return None
    valid = np.asarray(analysis.valid, bool)
    defect = (np.asarray(mask) > 0) & valid if mask is not None else np.zeros_like(valid)
    if sample.label == 1 and not defect.any():
        return None
    scores = np.asarray(served, np.float32)
    count, components = cv2.connectedComponents(defect.astype(np.uint8), connectivity=8)
    positive_scores, positive_regions = scores[defect], components[defect] - 1
    negative_scores = scores[valid & ~defect]
    keep_pos = _pick(positive_scores.size, rng)
    negatives, negative_weights = sample_negatives(negative_scores, rng)
    regions = positive_regions[keep_pos]
    return StripPixels(
        positives=positive_scores[keep_pos],
        regions=regions,
        region_kept=np.bincount(regions, minlength=count - 1) if count > 1 else np.zeros(0, int),
        positive_weight=positive_scores.size / max(keep_pos.size, 1),
        negatives=negatives,
        negative_weights=negative_weights,
    )


def _pick(size: int, rng: np.random.Generator) -> np.ndarray:
    if size <= STRIP_PIXELS:
        return np.arange(size)
    return np.sort(rng.choice(size, STRIP_PIXELS, replace=False))


def rank_bands(size: int) -> list[tuple[int, int]]:
    """The rank bands ``[start, end)`` of ``size`` defect-free pixels ranked by descending
    score: ``[0, S)``, then each ``BAND_GROWTH`` times as far as the last, the last cut at
    ``size`` (``S`` = ``STRIP_PIXELS``)."""
    bands: list[tuple[int, int]] = []
    start, end = 0, STRIP_PIXELS
    while start < size:
        bands.append((start, min(end, size)))
        start, end = end, end * BAND_GROWTH
    return bands


def sample_negatives(scores: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rank-stratified sample of one strip's defect-free scores and the weight of each kept
    score (how many pixels it stands for; the weights add up to ``scores.size``): the top
    ``STRIP_PIXELS`` exactly, and ``STRIP_PIXELS`` drawn uniformly from each further rank band
    (see ``rank_bands`` and the module notes)."""
    scores = np.asarray(scores, np.float32).ravel()
    bands = rank_bands(scores.size)
    if len(bands) <= 1:
        return scores.copy(), np.ones(scores.size)
    # A partition at the band edges puts every band's pixels together, without a full sort.
    ranked = np.partition(-scores, [end - 1 for _, end in bands[:-1]])
    kept: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for start, end in bands:
        band = -ranked[start:end]
        if band.size > STRIP_PIXELS:
            band = band[np.sort(rng.choice(band.size, STRIP_PIXELS, replace=False))]
        kept.append(band)
        weights.append(np.full(band.size, (end - start) / band.size))
    return np.concatenate(kept), np.concatenate(weights)


def pixel_figures(strips: Sequence[StripPixels]) -> dict[str, float]:
    """Pixel AUROC, pixel AP and AUPRO of a set of strip samples (NaN when undefined)."""
    nan = {key: math.nan for key in PIXEL_KEYS}
    if not strips:
        return nan
    positives = np.concatenate([s.positives for s in strips])
    negatives = np.concatenate([s.negatives for s in strips])
    if not positives.size or not negatives.size:
        return nan
    scores = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(positives.size, bool), np.zeros(negatives.size, bool)])
    weights = np.concatenate(
        [np.full(s.positives.size, s.positive_weight) for s in strips]
        + [s.negative_weights for s in strips]
    )
    # AUPRO: every region weighs the same, shared among its sampled pixels
    pro = np.concatenate(
        [1.0 / s.region_kept[s.regions] for s in strips if s.positives.size]
        + [s.negative_weights for s in strips]
    )
    fpr, overlap, _ = roc_curve(labels, scores, sample_weight=pro)
    return {
        "pixel_auroc": float(roc_auc_score(labels, scores, sample_weight=weights)),
        "pixel_ap": float(average_precision_score(labels, scores, sample_weight=weights)),
        "aupro": _area_up_to(fpr, overlap, AUPRO_FPR_LIMIT) / AUPRO_FPR_LIMIT,
    }


def _strip_figures(outcomes: Sequence[StripOutcome], index: np.ndarray) -> dict[str, float]:
    return {key: FIGURES[key](outcomes, index) for key in STRIP_KEYS}


@dataclass
class FabricJudgement:
    fabric: str
    uri: str
    detector: Detector
    metrics: dict[str, Any]
    result: EvaluationResult
    outcomes: list[StripOutcome]  # names prefixed with the fabric, scores normalised
    pixels: list[StripPixels | None]
    draws: dict[str, np.ndarray] = field(default_factory=dict)  # bootstrap values, NaN kept


def _resample_indices(n: int, count: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield rng.integers(0, n, n)


def bootstrap(
    judgement: FabricJudgement, resamples: int, pixel_resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each figure on resamples of the fabric's strips (NaN where a resample leaves it
    undefined); the strip figures on raw scores, as the single-model evaluation."""
    raw = judgement.result.outcomes
    n = len(raw)
    draws: dict[str, list[float]] = {key: [] for key in KEYS}
    for index in _resample_indices(n, resamples, seed):
        for key, value in _strip_figures(raw, index).items():
            draws[key].append(value)
    for index in _resample_indices(n, pixel_resamples, seed + 1):
        chosen = [judgement.pixels[i] for i in index]
        for key, value in pixel_figures([s for s in chosen if s is not None]).items():
            draws[key].append(value)
    return {key: np.asarray(values, float) for key, values in draws.items()}


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - CONFIDENCE) / 2.0
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha))


def with_intervals(values: dict[str, float], draws: dict[str, np.ndarray]) -> dict[str, Any]:
    """``key``, ``key_ci95_low``, ``key_ci95_high`` for every figure (NaN when undefined)."""
    out: dict[str, Any] = {}
    for key in KEYS:
        value = values.get(key, math.nan)
        out[key] = value
        low, high = _interval(draws[key]) if math.isfinite(value) else (math.nan, math.nan)
        out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = low, high
    return out


def judge_fabric(
    fabric: str,
    uri: str,
    samples: Sequence[Sample],
    *,
    backend: str,
    device: str,
    precision: str,
    progress: bool,
    seed: int,
    resamples: int,
    pixel_resamples: int,
) -> FabricJudgement:
    detector = Detector.from_bundle(
        resolve_model_uri(uri), backend=backend, device=device, precision=precision
    )
    rng = np.random.default_rng(seed)
    pixels: list[StripPixels | None] = []

    def sample_pixels(item: Analysed, prediction: Prediction) -> None:
        pixels.append(strip_pixels(item, prediction.normalized_map, rng))

    analysed = analyse_samples(detector, samples, progress=progress, desc=f"fabric {fabric}")
    result = run_evaluation(detector, analysed, seed=seed, observe=sample_pixels)
    normalise = detector.calibration.normalize_image
    outcomes = [
        dataclasses.replace(o, name=f"{fabric}/{o.name}", score=normalise(o.score))
        for o in result.outcomes
    ]
    judgement = FabricJudgement(fabric, uri, detector, {}, result, outcomes, pixels)
    judgement.draws = bootstrap(judgement, resamples, pixel_resamples, seed)
    exact = {key: float(result.metrics.get(key, math.nan)) for key in KEYS}
    judgement.metrics = with_intervals(exact, judgement.draws)
    judgement.metrics.update(
        n_images=result.metrics["n_images"],
        n_anomalous=result.metrics["n_anomalous"],
        model_uri=uri,
        model_type=detector.manifest.model_type,
        calibration=detector.calibration.method,
        threshold=detector.calibration.image_threshold,
    )
    return judgement


def pooled_figures(
    judgements: Sequence[FabricJudgement], resamples: int, pixel_resamples: int, seed: int
) -> dict[str, Any]:
    """Pooled strip AUROC and decision rates over all strips, macro averages of the rest."""
    pooled_keys = ("strip_auroc", "detection_rate", "false_alarm_rate")

    def pooled(index_by_fabric: Sequence[np.ndarray]) -> dict[str, float]:
        chosen = [j.outcomes[i] for j, index in zip(judgements, index_by_fabric, strict=True)
                  for i in index]  # fmt: skip
        every = np.arange(len(chosen))
        return {key: FIGURES[key](chosen, every) for key in pooled_keys}

    values: dict[str, float] = pooled([np.arange(len(j.outcomes)) for j in judgements])
    draws: dict[str, np.ndarray] = {}
    streams = [_resample_indices(len(j.outcomes), resamples, seed) for j in judgements]
    rows = [pooled([next(stream) for stream in streams]) for _ in range(resamples)]
    for key in pooled_keys:
        draws[key] = np.asarray([row[key] for row in rows], float)
    macro_keys = [key for key in KEYS if key not in pooled_keys]
    for key in macro_keys:
        per_fabric = [j.metrics[key] for j in judgements if math.isfinite(j.metrics[key])]
        values[key] = float(np.mean(per_fabric)) if per_fabric else math.nan
        stacked = np.vstack([j.draws[key] for j in judgements])  # the same resample r of each
        draws[key] = _nanmean_columns(stacked)
    result = with_intervals(values, draws)
    macro: dict[str, Any] = {}
    for key in ("strip_auroc", "detection_rate", "false_alarm_rate"):  # macro forms too
        per_fabric = [j.metrics[key] for j in judgements if math.isfinite(j.metrics[key])]
        macro[key] = float(np.mean(per_fabric)) if per_fabric else math.nan
    result.update(
        n_fabrics=len(judgements),
        n_images=sum(j.metrics["n_images"] for j in judgements),
        n_anomalous=sum(j.metrics["n_anomalous"] for j in judgements),
        pooled_over_strips=list(pooled_keys),
        macro_averaged=macro_keys,
        macro_of_pooled_keys=macro,
    )
    return result


def _nanmean_columns(stacked: np.ndarray) -> np.ndarray:
    counts = np.isfinite(stacked).sum(axis=0)
    sums = np.where(np.isfinite(stacked), stacked, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def fleet_samples(
    fleet: Fleet, data: Path, split: str, only: str | None
) -> tuple[dict[str, list[Sample]], dict[str, str]]:
    """The strips to judge each fabric on, and the fabrics skipped with the reason.

    ``only`` (``--fabric``) keeps one fabric: DatasetError when the fleet has no model for it
    or the data has no image of it. Without it, every fabric the fleet has a model for and the
    data has images of; DatasetError when there is none.
    """
    from models.manifest import read_manifest

    if only is not None:
        member = fleet.member(only)
        if member is None:
            raise DatasetError(
                f"the fleet has no model for fabric {only!r}; "
                f"its fabrics: {', '.join(fleet.fabrics)}"
            )
        wanted = [member.fabric]
    else:
        wanted = fleet.fabrics
    present = set(load_dataset(data).fabrics)
    chosen: dict[str, list[Sample]] = {}
    skipped: dict[str, str] = {}
    for fabric in wanted:
        if fabric not in present:
            if only is not None:
                raise DatasetError(f"{data}: no image of fabric {fabric}")
            skipped[fabric] = "no image of this fabric in the data"
            continue
        dataset = load_dataset(data, fabric=fabric)
        if split == "test":
            training = read_manifest(resolve_model_uri(fleet.members[fabric].source)).training
            if training.get("fingerprint") != fingerprint(dataset.samples, dataset.root):
                raise DatasetError(
                    f"{data} fabric {fabric} is not the data its model was trained on "
                    "(fingerprint differs); use --split all to evaluate on other data"
                )
            chosen[fabric] = list(recorded_split(dataset, training).validation)
        else:
            chosen[fabric] = list(dataset.samples)
    if not chosen:
        raise DatasetError(
            f"{data}: no image of any fabric the fleet has a model for ({', '.join(fleet.fabrics)})"
        )
    return chosen, skipped


def evaluate_fleet(
    fleet: Fleet,
    data: Path,
    *,
    split: str = "all",
    fabric: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "32",
    progress: bool = False,
    seed: int = 0,
    resamples: int = 1000,
    pixel_resamples: int = 200,
) -> tuple[dict[str, Any], list[FabricJudgement]]:
    """The fleet's JSON summary (``fabrics``, ``pooled``) and the per-fabric judgements."""
    chosen, skipped = fleet_samples(fleet, data, split, fabric)
    judgements = [
        judge_fabric(
            code, fleet.members[code].source, samples, backend=backend, device=device,
            precision=precision, progress=progress, seed=seed, resamples=resamples,
            pixel_resamples=pixel_resamples,
        )
        for code, samples in chosen.items()
    ]  # fmt: skip
    summary = {
        "model_uri": fleet.uri,
        "data": str(data),
        "split": split,
        "confidence": CONFIDENCE,
        "resamples": resamples,
        "pixel_resamples": pixel_resamples,
        "fabrics": {j.fabric: j.metrics for j in judgements},
        "pooled": pooled_figures(judgements, resamples, pixel_resamples, seed),
        "skipped": skipped,
    }
    cleaned: dict[str, Any] = to_jsonable(summary)
    return cleaned, judgements


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def table(summary: dict[str, Any]) -> str:
    """The per-fabric table and the pooled row, as plain text."""
    head = ["fabric", "n", "defective", *KEYS]
    rows = [[code, str(m["n_images"]), str(m["n_anomalous"]), *(_cell(m, k) for k in KEYS)]
            for code, m in summary["fabrics"].items()]  # fmt: skip
    pooled = summary["pooled"]
    rows.append(["pooled", str(pooled["n_images"]), str(pooled["n_anomalous"]),
                 *(_cell(pooled, k) for k in KEYS)])  # fmt: skip
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
             for row in [head, *rows]]  # fmt: skip
    return "\n".join(lines)


def write_json(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    staging.replace(path)


def write_fleet_report(
    folder: Path,
    summary: dict[str, Any],
    judgements: Sequence[FabricJudgement],
    data: str,
    write_one: Callable[..., Path | None],
) -> Path:
    """``folder/index.html``: the per-fabric table with the pooled row and the worst strips of
    each fabric; each fabric's full report (curves, per-defect table) in ``folder/<fabric>/``."""
    folder.mkdir(parents=True, exist_ok=True)
    head = ["fabric", "images", "defective", *KEYS]
    body = []
    for code, metrics in [*summary["fabrics"].items(), ("pooled", summary["pooled"])]:
        link = f'<a href="{html.escape(code)}/report.html">{html.escape(code)}</a>'
        name = link if code != "pooled" else "<b>pooled / macro</b>"
        cells = [name, str(metrics["n_images"]), str(metrics["n_anomalous"])]
        cells += [html.escape(_cell(metrics, key)) for key in KEYS]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    worst = []
    for judgement in judgements:
        write_one(judgement, folder / judgement.fabric)
        items = []
        for index, (caption, _) in enumerate(judgement.result.misses[:WORST_STRIPS], start=1):
            name = f"{judgement.fabric}/miss_{index:02d}.png"  # written by the fabric's report
            items.append(
                f'<figure><img src="{name}" style="max-width:100%">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        worst.append(f"<h3>fabric {html.escape(judgement.fabric)}</h3>" + "".join(items))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Loomwatch fleet</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>Loomwatch fleet evaluation</h1>
<p>fleet {html.escape(str(summary["model_uri"]))}; data {html.escape(data)}; 95% intervals from
{summary["resamples"]} strip-level bootstrap resamples ({summary["pixel_resamples"]} for pixel
figures). Pooled: strip AUROC on normalised scores and decision rates over all strips; the other
figures are macro averages over fabrics.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{"".join(body)}</table>
<h2>Worst strips of each fabric</h2>{"".join(worst)}
</body></html>
"""
    path = folder / "index.html"
    staging = folder / ".index.html.tmp"
    staging.write_text(page)
    staging.replace(path)  # last: the page never links a missing image
    return path
