"""``pipeline.image_level``: a strip's map and score are measured above the strip's own median
map level, so a level that drifts from strip to strip (light, gain, a network's mood on one
strip) does not move the decision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.calibration import Calibration
from models.manifest import ImageLevel, Manifest, PipelineConfig, read_manifest
from models.pipeline import Detector
from models.preprocessing import ValidAreaSettings
from tests.helpers import PixelsAsMap

UNCALIBRATED = Calibration(
    image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5, pixel_min=0.0,
    pixel_max=1.0,
)  # fmt: skip


def _detector(level: ImageLevel) -> Detector:
    area = ValidAreaSettings(end_margin=0, learn_field_of_view=False)
    pipeline = PipelineConfig(tile_size=64, stride=64, valid_area=area, image_level=level)
    manifest = Manifest(model_type="fake", config={}, pipeline=pipeline, calibration=UNCALIBRATED)
    return Detector(PixelsAsMap(pool=5), manifest)


def _strip(seed: int, grey: float, defect: bool) -> np.ndarray:
    """A 64 x 256 strip of weave-like noise around ``grey``; with ``defect`` a 6 x 6 px spot
    60 grey brighter (the map of this fake network is the image itself)."""
    rng = np.random.default_rng(seed)
    image = grey + rng.normal(0, 6, (64, 256))
    if defect:
        image[20:26, 100:106] += 60
    return np.clip(image, 0, 255).astype(np.uint8)


def test_a_strip_brighter_all_over_scores_as_it_would_at_its_own_level() -> None:
    dark, bright = _strip(0, 80, defect=True), _strip(0, 80, defect=True) + np.uint8(40)
    median = _detector("median")
    a, b = median.analyse(dark), median.analyse(bright)
    assert b.level - a.level == pytest.approx(40 / 255, abs=1e-6)
    assert b.score == pytest.approx(a.score, abs=1e-6)
    assert b.tile_scores == pytest.approx(a.tile_scores, abs=1e-6)
    assert np.median(a.anomaly_map[a.valid]) == pytest.approx(0.0, abs=1e-6)
    # what the API and predict report
    assert median.finish(a).summary()["map_level"] == pytest.approx(a.level, abs=1e-6)
    # the map keeps its shape: the defect is its highest spot, 60 grey above the weave
    y, x = np.unravel_index(np.argmax(a.anomaly_map), a.anomaly_map.shape)
    assert 20 <= y < 26 and 100 <= x < 106
    none = _detector("none")
    raw_dark, raw_bright = none.analyse(dark), none.analyse(bright)
    assert raw_dark.level == 0.0
    assert raw_bright.score - raw_dark.score == pytest.approx(40 / 255, abs=1e-6)
    assert raw_dark.score - a.score == pytest.approx(a.level, abs=1e-6)


def test_a_defect_outranks_a_brighter_defect_free_strip_only_above_the_level() -> None:
    """What the setting is for: without it, a defect-free strip whose whole map runs higher
    outscores a faint defect on a strip at the usual level; with it, the defect ranks first."""
    defective, drifted = _strip(1, 80, defect=True), _strip(2, 150, defect=False)
    median, none = _detector("median"), _detector("none")
    assert median.analyse(defective).score > median.analyse(drifted).score
    assert none.analyse(defective).score < none.analyse(drifted).score


def test_bundles_written_before_the_setting_keep_their_scale(tmp_path: Path) -> None:
    """New manifests say median; one without the field (written before it existed, calibrated
    on maps without the level subtracted) reads as none."""
    manifest = Manifest(
        model_type="fake", config={}, pipeline=PipelineConfig(), calibration=UNCALIBRATED
    )
    assert manifest.pipeline.image_level == "median"
    raw = json.loads(manifest.model_dump_json())
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(folder).pipeline.image_level == "median"
    del raw["pipeline"]["image_level"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(old).pipeline.image_level == "none"
