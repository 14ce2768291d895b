"""Evaluation: run the serving pipeline over labelled images and compute the metrics.

Training runs the model once over its validation split and uses those analyses twice: first to
learn the calibration, then to evaluate with it.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.overlay import encode_png, render_overlay, wrap_wide
from models.pipeline import Analysis, Detector, Prediction
from training.calibrate import describe_operating_point
from training.config import CalibrationConfig
from training.data import Sample, evenly_spread, has_pixel_labels, load_image, load_mask
from training.decisions import StripOutcome, count_regions, decision_metrics, per_defect_decisions
from training.metrics import EvaluationAccumulator, ImageRecord, to_jsonable

WORST_MISSES = 4


@dataclass(order=True)
class _Miss:
    badness: float
    caption: str = field(compare=False)
    png: bytes = field(compare=False)


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    accumulator: EvaluationAccumulator
    misses: list[tuple[str, bytes]]
    # One per image: the decision and its regions, for decision figures and paired comparisons.
    outcomes: list[StripOutcome] = field(default_factory=list)
    # A few tiles worth looking at (the top tile of the first defective images, one clean tile):
    # uint8 pixels and valid masks, for the figures a model offers (its report_panels).
    sample_tiles: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)


def _keep_worst(heap: list[_Miss], badness: float, make: Any) -> None:
    """Keep the WORST_MISSES worst entries; render an overlay only when it makes the cut."""
    if len(heap) < WORST_MISSES:
        heapq.heappush(heap, make())
    elif badness > heap[0].badness:
        heapq.heapreplace(heap, make())


Analysed = tuple[Sample, Analysis, np.ndarray | None]


def analyse_samples(
    detector: Detector, samples: Sequence[Sample], *, progress: bool = True, desc: str = "analyse"
) -> Iterator[Analysed]:
    """Run the model over labelled samples, one at a time: (sample, analysis, mask or None)."""
    for sample in tqdm(samples, desc=desc, disable=not progress, unit="img"):
        image = load_image(sample)
        analysis = detector.analyse(image)
        mask = load_mask(sample, image.shape) if has_pixel_labels(sample) else None
        yield sample, analysis, mask


def fitted_clean_scores(
    detector: Detector,
    samples: Sequence[Sample],
    config: CalibrationConfig,
    *,
    progress: bool = True,
) -> list[float]:
    """Image scores of the defect-free images the model was fitted on (at most
    ``config.max_training_images``, evenly spread), for the operating point
    (``training.calibrate.image_threshold``); none when the config does not use them."""
    clean = [sample for sample in samples if sample.label == 0]
    if not (config.use_training_images and config.image_rule == "false_alarm" and clean):
        return []
    chosen = evenly_spread(clean, config.max_training_images)
    analysed = analyse_samples(detector, chosen, progress=progress, desc="score fitted")
    return [analysis.score for _, analysis, _ in analysed]


def run_evaluation(
    detector: Detector,
    analysed: Iterable[Analysed],
    *,
    seed: int = 0,
    observe: Callable[[Analysed, Prediction], None] | None = None,
) -> EvaluationResult:
    """Calibrate and post-process each analysis as served; feed the metric accumulator.
    ``observe`` is shown each analysis with its prediction (the fleet's pixel samples)."""
    accumulator = EvaluationAccumulator(seed=seed)
    outcomes: list[StripOutcome] = []
    misses: list[_Miss] = []
    tiles: list[tuple[str, np.ndarray, np.ndarray]] = []
    for sample, analysis, mask in analysed:
        prediction = detector.finish(analysis)
        if observe is not None:
            observe((sample, analysis, mask), prediction)
        _keep_sample_tile(tiles, sample, analysis)
        record = ImageRecord(
            name=sample.name,
            label=sample.label,
            defect=sample.defect,
            score=analysis.score,
            normalized_score=prediction.score,
            decision=prediction.decision,
            has_mask=mask is not None,
        )
        accumulator.add_image(
            record,
            prediction.normalized_map,  # the map served: normalised and smoothed
            mask,
            analysis.valid,
            tile_boxes=[box.as_tuple() for box in analysis.boxes],
            tile_scores=analysis.tile_scores,
        )
        outcomes.append(_outcome(sample, analysis, mask, prediction))
        # A miss: a defect scored low, or a defect-free image scored high.
        badness = (1.0 - prediction.score) if sample.label == 1 else prediction.score
        verdict = "anomalous" if prediction.decision else "normal"
        kind = sample.defect or "defect-free"
        caption = f"{sample.name} ({kind}): score {prediction.score:.3f}, decided {verdict}"
        _keep_worst(
            misses,
            badness,
            lambda p=prediction, c=caption, b=badness, m=mask: _Miss(b, c, _png(p, m)),
        )
    ordered = sorted(misses, reverse=True)
    metrics = {**decision_metrics(outcomes, seed=seed), **accumulator.compute()}
    pairs = [(m.caption, m.png) for m in ordered]
    return EvaluationResult(metrics, accumulator, pairs, outcomes, tiles)


def _outcome(
    sample: Sample, analysis: Analysis, mask: np.ndarray | None, prediction: Prediction
) -> StripOutcome:
    """The decision on one image with its region counts and labelled tiles (as the metrics
    count them: a tile is defective when a defect pixel on fabric lies in it)."""
    known = sample.label == 0 or mask is not None
    regions = count_regions(prediction.post.mask, mask, analysis.valid) if known else None
    labels: list[int] = []
    scores: list[float] = []
    if known:
        defect = (mask > 0) & analysis.valid if mask is not None else None
        for box, score in zip(analysis.boxes, analysis.tile_scores, strict=True):
            window = (slice(box.y0, box.y1), slice(box.x0, box.x1))
            if not analysis.valid[window].any():
                continue
            labels.append(int(defect is not None and bool(defect[window].any())))
            scores.append(float(score))
    return StripOutcome(
        name=sample.name,
        label=sample.label,
        defect=sample.defect,
        score=analysis.score,
        decision=prediction.decision,
        regions=regions,
        tile_labels=labels,
        tile_scores=scores,
    )


SAMPLE_TILES = 4


def _keep_sample_tile(
    tiles: list[tuple[str, np.ndarray, np.ndarray]], sample: Sample, analysis: Analysis
) -> None:
    defective = sum(1 for name, _, _ in tiles if not name.endswith("(defect-free)"))
    clean = len(tiles) - defective
    if (sample.label == 1 and defective >= SAMPLE_TILES - 1) or (sample.label == 0 and clean):
        return
    on_fabric = [i for i, share in enumerate(analysis.tile_valid) if share > 0]
    if not on_fabric:
        return
    best = max(on_fabric, key=lambda i: analysis.tile_scores[i])
    box = analysis.boxes[best]
    window = (slice(box.y0, box.y1), slice(box.x0, box.x1))
    if analysis.image[window].shape != (box.y1 - box.y0, box.x1 - box.x0):
        return  # an image smaller than a tile: nothing tile-sized to show
    kind = sample.defect or "defect-free"
    tiles.append((f"{sample.name} ({kind})", analysis.image[window], analysis.valid[window]))


def model_figures(detector: Detector, result: EvaluationResult) -> list[tuple[str, bytes]]:
    """The figures the model offers on the sample tiles (``AnomalyModel.report_panels``: for
    the VAE and DRAEM, input | reconstruction | map), as (caption, PNG) pairs."""
    if not result.sample_tiles or detector.model is None:
        return []  # an exported network offers no pictures of its insides
    tiles = torch.from_numpy(np.stack([t for _, t, _ in result.sample_tiles])).float()[:, None]
    valid = torch.from_numpy(np.stack([v for _, _, v in result.sample_tiles]))[:, None]
    with torch.inference_mode():
        panels = detector.model.report_panels(tiles / 255.0, valid)
    names = ", ".join(name for name, _, _ in result.sample_tiles)
    return [
        (f"{panel.title}, one row per tile: {names}", encode_png(panel.image)) for panel in panels
    ]


def _png(prediction: Prediction, truth: np.ndarray | None) -> bytes:
    return encode_png(wrap_wide(render_overlay(prediction, truth)))


def evaluation_summary(
    detector: Detector, result: EvaluationResult, model_uri: str
) -> dict[str, Any]:
    summary = dict(result.metrics)
    summary["threshold"] = detector.calibration.image_threshold
    summary["pixel_threshold"] = detector.calibration.pixel_threshold
    summary["model_uri"] = model_uri
    summary["model_type"] = detector.manifest.model_type
    summary["decisions_by_defect"] = per_defect_decisions(result.outcomes)
    cleaned: dict[str, Any] = to_jsonable(summary)
    return cleaned


def write_outputs(
    detector: Detector,
    result: EvaluationResult,
    summary: dict[str, Any],
    *,
    json_path: Path | None,
    report_dir: Path | None,
    data: str,
) -> Path | None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(f".{json_path.name}.tmp")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        tmp.replace(json_path)
    if report_dir is None:
        return None
    from training.report import write_report  # matplotlib is heavy: import only when reporting

    info = {
        "model": summary["model_uri"],
        "model type": detector.manifest.model_type,
        "data": data,
        "image threshold (raw)": f"{detector.calibration.image_threshold:.5g}",
        "pixel threshold (raw)": f"{detector.calibration.pixel_threshold:.5g}",
        "calibration": detector.calibration.method,
    }
    operating_point = detector.calibration.evidence.get("operating_point")
    if operating_point:
        info["operating point"] = describe_operating_point(operating_point)
    return write_report(
        report_dir,
        title=f"Loomwatch evaluation: {detector.manifest.model_type}",
        metrics=result.metrics,
        curves=result.accumulator.curves(),
        per_defect=result.accumulator.per_defect(),
        decisions=per_defect_decisions(result.outcomes),
        misses=result.misses,
        figures=model_figures(detector, result),
        info=info,
    )
