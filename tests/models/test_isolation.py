"""The isolated peak (models/isolation.py): a strip is scored by the more unusual of "its
highest spot is high" and "its highest spot stands alone", each measured against the
defect-free strips the model was fitted on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.calibration import Calibration
from models.isolation import IsolatedPeak, learn_isolated_peak, peak_gap
from models.manifest import Manifest, PipelineConfig
from models.pipeline import Detector
from models.preprocessing import ValidAreaSettings
from tests.helpers import PixelsAsMap

UNCALIBRATED = Calibration(
    image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5, pixel_min=0.0,
    pixel_max=1.0,
)  # fmt: skip
ALL = np.ones((128, 1024), bool)


def _spots(seed: int, count: int, height: float, size: int = 4, spread: float = 0.0) -> np.ndarray:
    """A 128 x 1024 map at 0.1 with ``count`` square spots ``size`` px wide, of ``height`` (less
    up to ``spread``), at random places at least 70 px apart."""
    rng = np.random.default_rng(seed)
    anomaly = np.full((128, 1024), 0.1, np.float32)
    columns = rng.permutation(np.arange(8, 1010, 70))[:count]
    for x in columns:
        y = int(rng.integers(8, 120 - size))
        anomaly[y : y + size, x : x + size] = height - spread * rng.random()
    return anomaly


def test_the_gap_is_large_for_a_lone_spot_and_small_among_many() -> None:
    lone = peak_gap(_spots(0, 1, 0.6), ALL, rank=5)
    crowded = peak_gap(_spots(1, 14, 0.6), ALL, rank=5)
    assert lone > 0.3  # the spot's pooled height above the quiet map
    assert crowded < 0.01  # its fifth-highest neighbour is as high
    # a large defect is one maximum (one blob), so it keeps its gap among quiet weave
    blob = _spots(2, 1, 0.6, size=40)
    assert peak_gap(blob, ALL, rank=5) == pytest.approx(0.5, abs=1e-3)
    # only fabric counts: a spot off fabric is not a peak
    valid = ALL.copy()
    valid[:, :512] = False
    off = np.full((128, 1024), 0.1, np.float32)
    off[60:64, 100:104] = 0.9
    assert peak_gap(off, valid, rank=5) == pytest.approx(0.0, abs=1e-6)
    assert peak_gap(off, np.zeros_like(ALL), rank=5) == 0.0


def test_a_reference_needs_three_strips_that_vary() -> None:
    assert learn_isolated_peak([0.5, 0.6], [0.1, 0.2], 5, 63, 20) is None
    assert learn_isolated_peak([0.5, 0.5, 0.5], [0.1, 0.2, 0.3], 5, 63, 20) is None
    reference = learn_isolated_peak([0.5, 0.6, 0.7], [0.1, 0.2, 0.3], 5, 63, 20)
    assert reference is not None and reference.images == 3
    assert reference.score_mean == pytest.approx(0.6) and reference.gap_sd == pytest.approx(0.1)
    # the larger standardised figure: one sd above in score, three above in gap
    assert reference.combine(0.7, 0.5) == pytest.approx(3.0)
    assert reference.combine(1.0, 0.2) == pytest.approx(4.0)


def _detector(reference: IsolatedPeak | None) -> Detector:
    area = ValidAreaSettings(end_margin=0, learn_field_of_view=False)
    pipeline = PipelineConfig(
        tile_size=64, stride=64, valid_area=area, image_level="none", isolated_peak=reference
    )
    manifest = Manifest(model_type="fake", config={}, pipeline=pipeline, calibration=UNCALIBRATED)
    return Detector(PixelsAsMap(pool=5), manifest)


def _strip(seed: int, count: int, grey: int, defect: int = 0) -> np.ndarray:
    """A 128 x 1024 strip at grey 40 (the fake network's map is the image) with ``count``
    5 x 5 spots of ``grey`` (less up to 10); with ``defect``, one more spot of that grey."""
    image = (_spots(seed, count, grey / 255, size=5, spread=10 / 255) * 255).round()
    image[image == round(0.1 * 255)] = 40
    if defect:
        image[60:65, 1000:1005] = defect
    return image.astype(np.uint8)


def test_a_lone_faint_defect_outranks_a_strip_crowded_with_higher_spots() -> None:
    """What the score is for (AITEX fabric 02's fuzzyballs): by its highest spot alone the
    defect-free strip with a dozen spots at 150 outranks the strip whose one defect reaches
    140; measured against defect-free strips of the same kind, the lone spot is the unusual
    one."""
    plain = _detector(None)
    training = [_strip(seed, 12, 140 + 2 * seed) for seed in range(6)]  # crowded, defect-free
    analyses = [plain.analyse(image) for image in training]
    settings = {"pool": 5, "radius": 63, "rank": 5}
    gaps = [peak_gap(a.anomaly_map, a.valid, **settings) for a in analyses]
    reference = learn_isolated_peak([a.score for a in analyses], gaps, **settings)
    assert reference is not None

    crowded, defective = _strip(11, 12, 150), _strip(12, 0, 40, defect=140)
    assert plain.analyse(crowded).score > plain.analyse(defective).score
    peaked = _detector(reference)
    crowded_now, defective_now = peaked.analyse(crowded), peaked.analyse(defective)
    assert defective_now.score > crowded_now.score
    assert defective_now.peak is not None
    assert defective_now.score == pytest.approx(
        reference.combine(plain.analyse(defective).score, defective_now.peak["gap"])
    )
    # what predict and the API report beside the score
    summary = peaked.finish(defective_now).summary()
    assert summary["isolated_peak"]["tile_score"] == pytest.approx(140 / 255, abs=1e-5)
    assert summary["isolated_peak"]["gap"] > 0.3
    assert plain.finish(plain.analyse(defective)).summary()["isolated_peak"] is None


def test_the_reference_travels_in_the_manifest() -> None:
    reference = IsolatedPeak(
        pool=5, radius=63, rank=20, score_mean=0.5, score_sd=0.02, gap_mean=0.1, gap_sd=0.03,
        images=6,
    )  # fmt: skip
    pipeline = PipelineConfig(isolated_peak=reference)
    raw = json.loads(pipeline.model_dump_json())
    assert PipelineConfig.model_validate(raw).isolated_peak == reference
    assert PipelineConfig().learn_isolated_peak is True and PipelineConfig().isolated_peak is None
