"""The map an operator is shown is the map the regions are cut from, and its smoothing is chosen
by pixel average precision on validation images (training.calibrate)."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import Calibration
from models.manifest import ImageLevel, Manifest, PipelineConfig
from models.pipeline import Analysis, Detector
from models.postprocess import SuppressionSettings, smooth
from models.preprocessing import ValidAreaSettings
from tests.helpers import PixelsAsMap
from training.calibrate import fit_operating_point
from training.config import CalibrationConfig
from training.evaluate import run_evaluation
from training.metrics import pixel_ap

UNCALIBRATED = Calibration(
    image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5, pixel_min=0.0,
    pixel_max=1.0,
)  # fmt: skip


def _detector(calibration: Calibration = UNCALIBRATED, level: ImageLevel = "median") -> Detector:
    area = ValidAreaSettings(end_margin=0, learn_field_of_view=False)
    pipeline = PipelineConfig(tile_size=64, stride=64, valid_area=area, image_level=level)
    manifest = Manifest(model_type="fake", config={}, pipeline=pipeline, calibration=calibration)
    return Detector(PixelsAsMap(pool=9), manifest)


def _strip(seed: int, defect: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A 64 x 128 strip of independent pixel noise (grey 100, sd 25: speckle as bright as a
    defect pixel); with ``defect`` a 10 x 10 px patch 30 grey brighter, and its mask."""
    rng = np.random.default_rng(seed)
    image = 100 + rng.normal(0, 25, (64, 128))
    mask = None
    if defect:
        y, x = 10 + seed % 40, 10 + (7 * seed) % 100
        image[y : y + 10, x : x + 10] += 30
        mask = np.zeros(image.shape, bool)
        mask[y : y + 10, x : x + 10] = True
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _analysed(detector: Detector, seeds: range) -> list[tuple[int, Analysis, np.ndarray | None]]:
    items = []
    for seed in seeds:
        image, mask = _strip(seed, defect=seed % 2 == 1)
        items.append((int(mask is not None), detector.analyse(image), mask))
    return items


def test_speckled_maps_are_smoothed_because_smoothing_raises_pixel_ap() -> None:
    detector = _detector()
    analysed = _analysed(detector, range(16))
    config = CalibrationConfig(min_clean_images=3)
    calibration, settings = fit_operating_point(detector, analysed, config, SuppressionSettings())
    regions = calibration.evidence["regions"]
    by_sigma = regions["pixel_ap_by_sigma"]
    assert regions["smoothing_by"] == "pixel_ap"
    assert by_sigma["0"] < by_sigma["2"]  # speckle outscores the patch pixel by pixel
    chosen = max(by_sigma, key=lambda key: by_sigma[key])
    assert settings.smoothing_sigma == float(chosen) >= 2.0
    assert regions["smoothing_sigma"] == settings.smoothing_sigma

    # the grid way: smoothing is one more dimension of region F1, no pixel AP is computed
    grid = config.model_copy(update={"smoothing_by": "region_f1"})
    calibration, _ = fit_operating_point(detector, analysed, grid, SuppressionSettings())
    assert "pixel_ap_by_sigma" not in calibration.evidence["regions"]
    assert calibration.evidence["regions"]["smoothing_by"] == "region_f1"


def test_the_served_map_is_the_smoothed_map_the_regions_come_from_and_evaluation_judges_it() -> (
    None
):
    # thresholds the patches pass (raw grey 130/255 on speckle of 100/255, the map as the
    # network gives it) and the speckle not
    passing = {"image_threshold": 0.45, "pixel_threshold": 0.45}
    detector = _detector(UNCALIBRATED.model_copy(update=passing), level="none")
    detector.suppression = SuppressionSettings(smoothing_sigma=3.0, min_region_area=1)
    analysed = _analysed(detector, range(8))
    predictions = [detector.finish(analysis) for _, analysis, _ in analysed]
    for (_, analysis, _), prediction in zip(analysed, predictions, strict=True):
        expected = detector.calibration.normalize_pixels(smooth(analysis.anomaly_map, 3.0))
        np.testing.assert_allclose(prediction.normalized_map, expected, atol=1e-6)
        # the regions are cut from that map: every kept pixel reaches 0.5 on it, and the peak
        # each region reports is that map's highest value inside it
        kept = prediction.post.mask > 0
        assert (prediction.normalized_map[kept] >= 0.5).all()
        for region in prediction.post.kept:
            box = (
                slice(region.y, region.y + region.height),
                slice(region.x, region.x + region.width),
            )
            inside = kept[box]
            assert region.peak == pytest.approx(
                prediction.normalized_map[box][inside].max(), abs=1e-4
            )

    assert sum(len(p.post.kept) for p in predictions) >= 2  # the checks above saw regions

    samples = [
        type("S", (), {"name": f"s{i}", "label": label, "defect": None})()
        for i, (label, _, _) in enumerate(analysed)
    ]
    observed: list[np.ndarray] = []  # what the fleet evaluation samples its pixels from
    result = run_evaluation(
        detector,
        [(s, a, m) for s, (_, a, m) in zip(samples, analysed, strict=True)],
        observe=lambda _, prediction: observed.append(prediction.normalized_map),
    )
    assert len(observed) == len(predictions)
    for seen, prediction in zip(observed, predictions, strict=True):
        np.testing.assert_array_equal(seen, prediction.normalized_map)
    masks = [np.zeros(a.valid.shape, bool) if m is None else m for _, a, m in analysed]
    valids = [a.valid for _, a, _ in analysed]
    served = pixel_ap(masks, [p.normalized_map for p in predictions], valids)
    raw = pixel_ap(masks, [a.anomaly_map for _, a, _ in analysed], valids)
    assert result.metrics["pixel_ap"] == served
    assert served > raw + 0.1  # the smoothing is what lifts it: the raw map is judged no more
