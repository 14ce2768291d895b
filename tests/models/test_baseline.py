"""The column baseline: learned from defect-free maps, subtracted by every analysis."""

from __future__ import annotations

import numpy as np

from models.baseline import (
    ColumnBaseline,
    column_levels,
    learn_column_baseline,
    subtract_baseline,
)
from models.calibration import Calibration
from models.manifest import Manifest, PipelineConfig
from models.pipeline import Detector
from models.preprocessing import ValidAreaSettings
from tests.helpers import PixelsAsMap

CAL = Calibration(
    image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5, pixel_min=0.0,
    pixel_max=1.0,
)  # fmt: skip
WIDTH = 256


def _detector(baseline: ColumnBaseline | None = None) -> Detector:
    area = ValidAreaSettings(end_margin=0, learn_field_of_view=False)
    pipeline = PipelineConfig(tile_size=64, stride=64, valid_area=area, column_baseline=baseline)
    manifest = Manifest(model_type="fake", config={}, pipeline=pipeline, calibration=CAL)
    return Detector(PixelsAsMap(), manifest)


def _strip(seed: int, spot: bool = False) -> np.ndarray:
    """A 64 x WIDTH strip whose light rises across the width (grey 60 -> 140), with noise; with
    ``spot`` a faint 3 x 3 px bright spot in a dark column, fainter than the bright end."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 140, WIDTH)[None, :] + rng.normal(0, 2, (64, WIDTH))
    if spot:
        ramp[30:33, 40:43] += 40  # about 100 grey: a defect in its column, not in the image
    return np.clip(ramp, 0, 255).astype(np.uint8)


def test_levels_are_each_columns_highest_value_on_fabric() -> None:
    anomaly = np.array([[1.0, 5.0, 2.0], [3.0, 9.0, 0.5]], np.float32)
    valid = np.array([[True, True, False], [True, False, False]])
    levels = column_levels(anomaly, valid)
    assert levels[:2].tolist() == [3.0, 5.0] and np.isnan(levels[2])


def test_learned_baseline_is_the_median_level_widened_and_smoothed() -> None:
    levels = [np.full(100, 0.2) for _ in range(5)]
    for item in levels:
        item[70:] = 0.4  # a bright end in every image
    levels[0][20] = 5.0  # one image's outlier column does not move the median
    levels[1][:10] = np.nan  # a column without fabric in one image
    baseline = learn_column_baseline(levels, window=5, step=1)
    assert baseline is not None and baseline.width == 100 and baseline.images == 5
    profile = baseline.profile()
    assert np.allclose(profile[:60], 0.2) and np.allclose(profile[75:], 0.4)
    assert 0.2 < profile[68] < 0.4  # the step is widened, then smoothed
    # columns with no fabric in any image take their neighbours' level
    gap = [np.concatenate([np.full(50, np.nan), np.full(50, 0.3)])]
    assert np.allclose(learn_column_baseline(gap, window=1, step=1).profile(), 0.3)  # type: ignore[union-attr]
    # stored every `step` columns, interpolated back to every column
    coarse = learn_column_baseline(levels, window=5, step=8)
    assert coarse is not None and len(coarse.values) == 13
    assert np.abs(coarse.profile() - profile).max() < 0.1
    # nothing to learn from
    assert learn_column_baseline([]) is None
    assert learn_column_baseline([np.zeros(10), np.zeros(12)]) is None
    assert learn_column_baseline([np.full(10, np.nan)]) is None


def test_subtracting_clips_at_zero_and_the_manifest_keeps_it() -> None:
    baseline = ColumnBaseline(width=4, step=1, values=[0.1, 0.2, 0.3, 0.4], images=3)
    anomaly = np.full((2, 4), 0.25, np.float32)
    assert np.allclose(subtract_baseline(anomaly, baseline), [[0.15, 0.05, 0.0, 0.0]] * 2)
    pipeline = PipelineConfig(column_baseline=baseline)
    assert PipelineConfig.model_validate(pipeline.model_dump(mode="json")) == pipeline
    assert baseline.applies(4) and not baseline.applies(5)


def test_a_faint_defect_in_a_dark_column_outscores_a_bright_end_once_the_baseline_is_learned() -> (
    None
):
    plain = _detector()
    clean = [plain.analyse(_strip(seed)) for seed in range(4)]
    defect = plain.analyse(_strip(10, spot=True))
    other_clean = plain.analyse(_strip(11))
    # without the baseline the image score is the bright end: the defect strip scores no higher
    assert defect.score <= other_clean.score + 0.02
    baseline = learn_column_baseline([column_levels(a.anomaly_map, a.valid) for a in clean], 9)
    assert baseline is not None and baseline.width == WIDTH
    rebased = _detector(baseline)
    defect_after = rebased.analyse(_strip(10, spot=True))
    clean_after = rebased.analyse(_strip(11))
    assert defect_after.score > clean_after.score + 0.08
    # the score is the highest pixel above the column's level, and it lies on the spot
    peak = np.unravel_index(np.argmax(defect_after.anomaly_map), defect_after.anomaly_map.shape)
    assert 30 <= peak[0] < 33 and 40 <= peak[1] < 43
    assert defect_after.score == max(defect_after.tile_scores)
    assert defect_after.tile_scores[0] == defect_after.score  # the spot's tile (x 0-63)
    assert (defect_after.anomaly_map >= 0).all()
    # an image of another width is scored without it
    narrow = rebased.analyse(_strip(12)[:, :192])
    assert narrow.score == plain.analyse(_strip(12)[:, :192]).score
