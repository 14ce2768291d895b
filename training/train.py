"""Training orchestration: split -> fit -> calibrate on validation -> evaluate -> save a bundle.

Model-specific fitting lives with each model (``models/``); this module only wires data, time
budget, calibration and the bundle together. ``--max-minutes`` is a hard budget for fitting:
the model gets ``FIT_SHARE`` of it (it stops in time and keeps its best state), and the rest is
meant for calibrating and evaluating the validation split, which runs to completion (on a large
validation split or a loaded machine it can take longer than that rest; its time is printed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from models.base import AnomalyModel, EpochCallback, FitContext
from models.baseline import column_levels, learn_column_baseline
from models.bundle import Manifest, library_versions, save_bundle
from models.calibration import Calibration
from models.device import Runtime
from models.isolation import MIN_IMAGES, learn_isolated_peak, peak_gap
from models.manifest import PipelineConfig
from models.network import TorchNetwork
from models.pipeline import Detector
from models.preprocessing import learn_field_of_view, valid_area
from models.registry import model_class
from models.tile_dataset import TileDataset
from models.tiling import pad_to_tile, plan_tiles
from training.calibrate import check_clean_images, fit_operating_point
from training.config import TrainConfig
from training.data import (
    Dataset,
    Sample,
    Split,
    evenly_spread,
    fingerprint,
    has_pixel_labels,
    load_dataset,
    load_image,
    load_mask,
    split_dataset,
)
from training.evaluate import (
    EvaluationResult,
    analyse_samples,
    fitted_clean_scores,
    run_evaluation,
)
from training.metrics import pixel_ap

log = logging.getLogger(__name__)

FIT_SHARE = 0.75


@dataclass
class TrainResult:
    bundle: Path
    manifest: Manifest
    detector: Detector
    evaluation: EvaluationResult
    split: Split
    dataset: Dataset
    seconds: dict[str, float] = field(default_factory=dict)


def _load_train_images(
    split: Split, config: TrainConfig, progress: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, valids = [], []
    for sample in tqdm(split.train, desc="load", disable=not progress, unit="img"):
        image = load_image(sample)
        images.append(image)
        valids.append(valid_area(image, config.pipeline.valid_area))
    return images, valids


def with_field_of_view(config: TrainConfig, valids: list[np.ndarray]) -> TrainConfig:
    """``config`` with the field of view of the training images' valid areas in its pipeline
    (``pipeline.valid_area.learn_field_of_view``), which every later valid area then applies:
    the validation criterion, calibration, evaluation and serving."""
    area = config.pipeline.valid_area
    if not area.learn_field_of_view:
        return config
    view = learn_field_of_view(valids, area.field_of_view_share)
    if view is None:
        log.info(
            "no field of view learned: the training images differ in width, or no column"
            " shows fabric in %.0f%% of them",
            100 * area.field_of_view_share,
        )
        return config
    log.info(
        "field of view: columns %d-%d of %d (fabric in %.0f%% or more of %d training images)",
        view.start, view.stop, view.width, 100 * area.field_of_view_share, view.images,
    )  # fmt: skip
    pipeline = config.pipeline.model_copy(
        update={"valid_area": area.model_copy(update={"field_of_view": view})}
    )
    return config.model_copy(update={"pipeline": pipeline})


BASELINE_IMAGES = 32


def with_column_baseline(
    detector: Detector, samples: list[Sample], learn: bool, progress: bool = False
) -> PipelineConfig:
    """The detector's pipeline with the column baseline (:mod:`models.baseline`) learned from
    the maps of ``samples`` (defect-free; at most ``BASELINE_IMAGES`` of them, evenly spread),
    and set on the detector, when ``learn``; otherwise, or when none can be learned, the
    pipeline without one."""
    pipeline = detector.pipeline.model_copy(update={"column_baseline": None})
    detector.pipeline = pipeline  # the maps it learns from are the network's own
    if not learn or not samples:
        return pipeline
    samples = evenly_spread(samples, BASELINE_IMAGES)
    levels = [
        column_levels(analysis.anomaly_map, analysis.valid)
        for _, analysis, _ in analyse_samples(detector, samples, progress=progress, desc="baseline")
    ]
    baseline = learn_column_baseline(levels, pipeline.column_baseline_window)
    if baseline is None:
        log.info("no column baseline learned: training images differ in width or show no fabric")
        return pipeline
    profile = np.asarray(baseline.values)
    log.info(
        "column baseline from %d training images: %.4g-%.4g (median %.4g) across %d columns",
        baseline.images, profile.min(), profile.max(), np.median(profile), baseline.width,
    )  # fmt: skip
    learned = pipeline.model_copy(update={"column_baseline": baseline})
    detector.pipeline = learned
    return learned


def with_isolated_peak(
    detector: Detector, samples: list[Sample], learn: bool, progress: bool = False
) -> PipelineConfig:
    """The detector's pipeline with the isolated-peak reference (:mod:`models.isolation`)
    learned from the image scores and peak gaps of ``samples`` (the defect-free strips it was
    fitted on; at most ``BASELINE_IMAGES``, evenly spread), and set on the detector, when
    ``learn``; otherwise, or when none can be learned, the pipeline without one."""
    pipeline = detector.pipeline.model_copy(update={"isolated_peak": None})
    detector.pipeline = pipeline  # the scores it learns from are the plain ones
    if not learn or not samples:
        return pipeline
    scores: list[float] = []
    gaps: list[float] = []
    analysed = analyse_samples(
        detector, evenly_spread(samples, BASELINE_IMAGES), progress=progress, desc="peaks"
    )
    for _, analysis, _ in analysed:
        scores.append(analysis.score)
        gap = peak_gap(
            analysis.anomaly_map, analysis.valid, pipeline.isolated_peak_pool,
            pipeline.isolated_peak_radius, pipeline.isolated_peak_rank,
        )  # fmt: skip
        gaps.append(gap)
    reference = learn_isolated_peak(
        scores, gaps, pipeline.isolated_peak_pool, pipeline.isolated_peak_radius,
        pipeline.isolated_peak_rank,
    )  # fmt: skip
    if reference is None:
        log.info(
            "no isolated-peak reference learned: %d training images (at least %d, whose scores"
            " and peak gaps vary)", len(scores), MIN_IMAGES,
        )  # fmt: skip
        return pipeline
    log.info(
        "isolated peak from %d training images: score %.4g +- %.2g, peak gap %.4g +- %.2g",
        reference.images, reference.score_mean, reference.score_sd, reference.gap_mean,
        reference.gap_sd,
    )  # fmt: skip
    learned = pipeline.model_copy(update={"isolated_peak": reference})
    detector.pipeline = learned
    return learned


def validation_scorer(
    split: Split,
    config: TrainConfig,
    seed: int,
    max_tiles: int = 96,
    runtime: Runtime | None = None,
) -> Callable[[AnomalyModel], float] | None:
    """Tile AUROC on a fixed sample of validation tiles, for models that pick their best state;
    with ``data.selection`` ``tile_auroc+pixel_ap``, its mean with the pixel average precision
    over the fabric pixels of the same tiles (with two or three defective validation strips the
    AUROC of a few defect tiles saturates early: the state of epoch 2 of 68 was kept on AITEX
    fabric 06, its map high over all of the fabric).

    Only defective validation images with a mask take part: their defect tiles against their
    defect-free tiles. The defect-free validation images stay out, held back for the operating
    point (``training.calibrate``), so that the state chosen here cannot have been chosen for
    scoring them low. All defect tiles (up to half the sample) and a seeded sample of the others.
    None when no validation image has a defect mask: the model then falls back to its loss.
    """
    pipeline = config.pipeline
    positives: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    negatives: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for sample in split.validation:
        if sample.label == 0 or not has_pixel_labels(sample):
            continue
        image = load_image(sample)
        valid = valid_area(image, pipeline.valid_area)
        mask = load_mask(sample, image.shape)
        image, valid = pad_to_tile(image, valid, pipeline.tile_size)
        mask = np.pad(
            mask, [(0, image.shape[0] - mask.shape[0]), (0, image.shape[1] - mask.shape[1])]
        )
        height, width = image.shape
        for box in plan_tiles(height, width, pipeline.tile_size, pipeline.stride, valid):
            window = (slice(box.y0, box.y1), slice(box.x0, box.x1))
            if not valid[window].any():
                continue
            defect = mask[window] & valid[window]
            target = positives if defect.any() else negatives
            target.append((image[window], valid[window], defect))
    if not positives or not negatives:
        return None
    rng = np.random.default_rng(seed)
    positives = positives[: max_tiles // 2]
    picked = rng.choice(len(negatives), min(len(negatives), max_tiles - len(positives)), False)
    chosen = positives + [negatives[i] for i in sorted(picked)]
    labels = np.array([1] * len(positives) + [0] * (len(chosen) - len(positives)))
    tiles = torch.from_numpy(np.stack([t for t, _, _ in chosen])).float()[:, None] / 255.0
    fabric = [v for _, v, _ in chosen]
    valids = torch.from_numpy(np.stack(fabric))[:, None]
    defects = [m for _, _, m in chosen]
    with_pixels = config.data.selection == "tile_auroc+pixel_ap"

    on = runtime or Runtime.cpu()

    def validate(model: AnomalyModel) -> float:
        scores, maps = [], []
        for start in range(0, len(chosen), pipeline.batch_size):
            end = start + pipeline.batch_size
            output = on.predict(model, tiles[start:end], valids[start:end])
            scores.append(output.score)
            if with_pixels:
                maps.extend(output.anomaly_map.float().cpu().numpy())
        tile_auroc = float(roc_auc_score(labels, torch.cat(scores).numpy()))
        if not with_pixels:
            return tile_auroc
        return (tile_auroc + pixel_ap(defects, maps, fabric, seed=seed)) / 2.0

    return validate


def _uncalibrated() -> Calibration:
    return Calibration(
        image_threshold=0.0, image_min=0.0, image_max=1.0, pixel_threshold=0.0, pixel_min=0.0,
        pixel_max=1.0,
    )  # fmt: skip


def check_split(split: Split, config: TrainConfig, where: str) -> None:
    """What the split must hold besides training images: enough held-back defect-free images."""
    held_back = sum(sample.label == 0 for sample in split.validation)
    check_clean_images(held_back, config.calibration, where)


def train(
    model_type: str,
    data: Path,
    config: TrainConfig,
    *,
    out: Path,
    fabric: str | None = None,
    max_minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: EpochCallback | None = None,
    on_split: Callable[[Dataset, Split], None] | None = None,
    runtime: Runtime | None = None,
    profile: bool = False,
) -> TrainResult:
    """Train on ``runtime`` (default: the CPU in fp32); ``profile`` times each training step's
    parts (data, forward, backward: ``step_*_ms`` in the fit summary)."""
    started = time.monotonic()
    runtime = runtime or Runtime.cpu()
    torch.manual_seed(seed)
    budget = max_minutes * 60.0 if max_minutes else None
    dataset = load_dataset(data, fabric=fabric)
    split = split_dataset(dataset, val_fraction=config.data.val_fraction, seed=seed)
    check_split(split, config, str(data))
    if on_split is not None:
        on_split(dataset, split)
    cls = model_class(model_type)
    model = cls(cls.config_class.model_validate(config.model))

    images, valids = _load_train_images(split, config, progress)
    config = with_field_of_view(config, valids)
    pipeline = config.pipeline
    tiles = TileDataset(
        images, valids, pipeline.tile_size, pipeline.stride, pipeline.train_min_valid_fraction
    )
    log.info("%d training images -> %d tiles", len(images), len(tiles))
    fit_budget = budget * FIT_SHARE - (time.monotonic() - started) if budget else None
    context = FitContext(
        deadline=time.monotonic() + fit_budget if fit_budget else None,
        budget_seconds=fit_budget,
        callback=callback,
        progress=progress,
        seed=seed,
        batch_size=pipeline.batch_size,
        validate=(
            validation_scorer(split, config, seed, runtime=runtime)
            if cls.selects_best_state
            else None
        ),
        runtime=runtime,
        profile=profile,
    )
    fit_started = time.monotonic()
    fit_summary = model.fit(tiles, context)
    fit_seconds = time.monotonic() - fit_started
    del images, valids, tiles

    manifest = Manifest(
        model_type=model_type,
        config=config.model,
        pipeline=pipeline,
        calibration=_uncalibrated(),
        suppression=config.suppression.model_dump(),
        versions=library_versions(),
    )
    detector = Detector(TorchNetwork(model, runtime=runtime), manifest)
    manifest.pipeline = with_column_baseline(
        detector, list(split.train), pipeline.learn_column_baseline, progress
    )
    peaked = pipeline.learn_isolated_peak and cls.representative_training_maps
    manifest.pipeline = with_isolated_peak(detector, list(split.train), peaked, progress)
    # Validation analyses are kept in memory once, then used to calibrate and to evaluate.
    analysed = list(analyse_samples(detector, split.validation, progress=progress, desc="validate"))
    labelled = [(sample.label, analysis, mask) for sample, analysis, mask in analysed]
    trained = fitted_clean_scores(detector, split.train, config.calibration, progress=progress)
    calibration, settings = fit_operating_point(
        detector, labelled, config.calibration, config.suppression, seed, trained
    )  # the same function re-fits a model's calibration (loomwatch calibrate --data)
    manifest.suppression = settings.model_dump()
    detector.suppression = settings
    manifest.calibration = calibration
    evaluation = run_evaluation(detector, analysed, seed=seed)
    del analysed

    manifest.metrics = {k: _number(v) for k, v in evaluation.metrics.items()}
    manifest.training = {
        "data": str(Path(data).resolve()),  # absolute: promote finds it from anywhere
        "layout": dataset.layout,
        "fabric": fabric,
        "seed": seed,
        "val_fraction": config.data.val_fraction,
        "fingerprint": fingerprint(dataset.samples, dataset.root),
        "train_images": len(split.train),
        "validation_images": len(split.validation),
        "max_minutes": max_minutes,
        "fit_seconds": round(fit_seconds, 2),
        "fit_summary": {k: _number(v) for k, v in fit_summary.items()},
        "runtime": runtime.describe(),  # where it was trained; the bundle loads anywhere
        "full_config": config.model_dump(mode="json"),
    }
    bundle = save_bundle(out, model, manifest)
    seconds = {"fit": fit_seconds, "total": time.monotonic() - started}
    return TrainResult(bundle, manifest, detector, evaluation, split, dataset, seconds)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None
