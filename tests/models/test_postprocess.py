from __future__ import annotations

from dataclasses import replace

import numpy as np

from models.calibration import Calibration
from models.postprocess import SuppressionSettings, decide, postprocess, settle


def _map_with_blobs() -> tuple[np.ndarray, np.ndarray]:
    values = np.zeros((100, 200), np.float32)
    values[10:30, 10:30] = 0.9  # big, strong: kept
    values[50:52, 50:52] = 0.9  # 4 px: below min area
    values[70:85, 100:115] = 0.52  # big but weak peak
    values[40:60, 185:200] = 0.9  # on padding
    valid = np.ones_like(values, bool)
    valid[:, 180:] = False
    return values, valid


def test_regions_are_kept_or_suppressed_with_reasons() -> None:
    values, valid = _map_with_blobs()
    settings = SuppressionSettings(min_region_area=10, min_region_peak=0.6, smoothing_sigma=0)
    result = postprocess(values, valid, settings)
    assert len(result.kept) == 1
    kept = result.kept[0]
    assert (kept.x, kept.y, kept.width, kept.height, kept.area) == (10, 10, 20, 20, 400)
    reasons = sorted(r.reason for r in result.suppressed if r.reason)
    assert reasons == ["area_below_min", "outside_valid_area", "peak_below_min"]
    assert result.mask[20, 20] == 255 and result.mask[51, 51] == 0 and result.mask[50, 190] == 0
    assert result.settings.min_region_peak == 0.6


def test_decision_rule() -> None:
    values, valid = _map_with_blobs()
    lenient = postprocess(values, valid, SuppressionSettings(smoothing_sigma=0))
    assert decide(0.7, 0.5, lenient).anomalous is True
    assert decide(0.4, 0.5, lenient).anomalous is False  # below threshold: never anomalous
    strict = postprocess(
        values, valid, SuppressionSettings(min_region_area=10_000, smoothing_sigma=0)
    )
    assert strict.all_suppressed
    marginal = decide(0.52, 0.5, strict)  # within the veto margin (0.05): suppression vetoes
    assert marginal.anomalous is False and marginal.vetoed and "vetoed" in marginal.reason
    strong = decide(0.9, 0.5, strict)  # far above the threshold: the score is the evidence
    assert strong.anomalous is True and not strong.vetoed and "suppressed" in strong.reason
    no_margin = strict.settings.model_copy(update={"veto_margin": 0.0})
    assert decide(0.5, 0.5, replace(strict, settings=no_margin)).anomalous is True
    wide_margin = strict.settings.model_copy(update={"veto_margin": 0.5})
    assert decide(0.9, 0.5, replace(strict, settings=wide_margin)).vetoed is True
    empty = postprocess(
        np.zeros((20, 20), np.float32), np.ones((20, 20), bool), SuppressionSettings()
    )
    assert not empty.all_suppressed and decide(0.51, 0.5, empty).anomalous is True


def test_the_region_the_score_came_from_is_not_suppressed_for_size_or_peak() -> None:
    values, valid = _map_with_blobs()
    settings = SuppressionSettings(min_region_area=10, min_region_peak=0.6, smoothing_sigma=0)
    # the 4 px blob at (50, 50) is below the minimum area, unless the score came from its window
    plain = postprocess(values, valid, settings)
    assert all((r.x, r.y) != (50, 50) for r in plain.kept)
    shown = postprocess(values, valid, settings, evidence=(40, 40, 60, 60))
    assert any((r.x, r.y, r.area) == (50, 50, 4) for r in shown.kept)
    assert shown.mask[51, 51] == 255 and len(shown.kept) == len(plain.kept) + 1
    # the weak, large blob is the evidence of its window: kept despite its peak
    weak = postprocess(values, valid, settings, evidence=(70, 100, 85, 115))
    assert any((r.x, r.y) == (100, 70) for r in weak.kept)
    # but never a region off the fabric
    off = postprocess(values, valid, settings, evidence=(40, 185, 60, 200))
    assert [r.reason for r in off.suppressed if r.x == 185] == ["outside_valid_area"]


def test_an_image_decided_normal_reports_no_region() -> None:
    values, valid = _map_with_blobs()
    found = postprocess(values, valid, SuppressionSettings(smoothing_sigma=0))
    assert found.kept and found.mask.any()
    normal = settle(found, decide(0.3, 0.5, found))
    assert normal.kept == [] and not normal.mask.any()
    moved = [r for r in normal.suppressed if r.reason == "image_not_anomalous"]
    assert len(moved) == len(found.kept) and len(normal.suppressed) == len(found.suppressed) + len(
        found.kept
    )
    assert settle(found, decide(0.9, 0.5, found)) is found  # an alarm keeps its regions


def test_normalisation_maps_threshold_to_half() -> None:
    cal = Calibration(
        image_threshold=4.0, image_min=2.0, image_max=10.0, pixel_threshold=1.0, pixel_min=0.0,
        pixel_max=3.0,
    )  # fmt: skip
    assert cal.normalize_image(4.0) == 0.5
    assert cal.normalize_image(6.0) == 0.75
    assert cal.normalize_image(100.0) == 1.0 and cal.normalize_image(-100.0) == 0.0
    assert np.allclose(cal.normalize_pixels(np.array([1.0, 2.5])), [0.5, 1.0])
    assert cal.image_threshold_from_normalized(0.75) == 6.0


def test_a_strong_score_with_nothing_at_the_pixel_threshold_shows_its_spot() -> None:
    """A 4 x 4 px defect, faint after smoothing (0.3 where the pixel threshold is 0.5), on a
    strip whose score is strong: the spot the score came from is kept at half its height above
    the tile's median, marked below the threshold; off, the image has no region at all."""
    rng = np.random.default_rng(0)
    values = (0.05 + 0.02 * rng.random((100, 200))).astype(np.float32)
    values[40:44, 120:124] = 0.3
    values[41:43, 121:123] = 0.32
    valid = np.ones_like(values, bool)
    settings = SuppressionSettings(smoothing_sigma=0)
    shown = postprocess(values, valid, settings, evidence=(0, 100, 100, 200))
    assert len(shown.kept) == 1 and shown.kept[0].below_threshold
    spot = shown.kept[0]
    assert (spot.x, spot.y, spot.width, spot.height, spot.area) == (120, 40, 4, 4, 16)
    assert spot.peak == np.float32(0.32) and shown.mask[40:44, 120:124].all()
    assert shown.mask.sum() == 16 * 255 and spot.to_json()["below_threshold"] is True
    verdict = decide(0.9, 0.5, shown)
    assert verdict.anomalous and "1 below the pixel threshold" in verdict.reason
    off = postprocess(values, valid, settings.model_copy(update={"evidence_region": False}),
                      evidence=(0, 100, 100, 200))  # fmt: skip
    assert off.kept == [] and not off.mask.any()
    assert "no region at the pixel threshold" in decide(0.9, 0.5, off).reason
    # only for a score strong enough to stand alone: without the evidence window, nothing
    assert postprocess(values, valid, settings).kept == []
    # a spot that reaches the threshold is a region as before, not a below-threshold one
    values[40:44, 120:124] = 0.8
    found = postprocess(values, valid, settings, evidence=(0, 100, 100, 200))
    assert len(found.kept) == 1 and not found.kept[0].below_threshold
