from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.base import ModelOutput
from training.config import load_config
from training.data import Split, load_dataset, split_dataset
from training.train import validation_scorer


@pytest.mark.slow
def test_validation_scorer_ranks_tiles_of_the_validation_split(synth_data: Path) -> None:
    from tests.helpers import fitted_patchcore

    config, _ = load_config("patchcore", None, ["pipeline.tile_size=64", "pipeline.stride=64"])
    split = split_dataset(load_dataset(synth_data), 0.3, seed=0)
    validate = validation_scorer(split, config, seed=0, max_tiles=40)
    assert validate is not None
    score = validate(fitted_patchcore())
    assert 0.0 <= score <= 1.0
    # a fixed sample: the criterion is comparable across epochs
    assert validate(fitted_patchcore()) == score


def test_no_defect_masks_means_no_validation_criterion(synth_data: Path) -> None:
    config, _ = load_config("patchcore", None, ["pipeline.tile_size=64"])
    split = split_dataset(load_dataset(synth_data), 0.3, seed=0)
    only_clean = Split(split.train, tuple(s for s in split.validation if s.label == 0))
    assert validation_scorer(only_clean, config, seed=0) is None


@pytest.mark.slow
def test_pixel_ap_joins_the_selection_criterion_by_default(synth_data: Path) -> None:
    """``data.selection`` tile_auroc+pixel_ap: the mean of the tile AUROC and the pixel AP over
    the same tiles, so a map that ranks the tiles alike but draws a worse mask scores lower."""
    from tests.helpers import fitted_patchcore

    split = split_dataset(load_dataset(synth_data), 0.3, seed=0)
    tiles = ["pipeline.tile_size=64", "pipeline.stride=64"]
    plain, _ = load_config("patchcore", None, [*tiles, "data.selection=tile_auroc"])
    joint, _ = load_config("patchcore", None, tiles)  # the default
    assert joint.data.selection == "tile_auroc+pixel_ap"
    by_tiles = validation_scorer(split, plain, seed=0, max_tiles=40)
    by_both = validation_scorer(split, joint, seed=0, max_tiles=40)
    assert by_tiles is not None and by_both is not None
    model = fitted_patchcore()
    tile_auroc, both = by_tiles(model), by_both(model)
    pixel_ap = 2 * both - tile_auroc
    assert 0.0 < pixel_ap <= 1.0 and both != tile_auroc
    assert by_both(model) == both  # a fixed sample: comparable across epochs
    # the same tile scores with a flat map over each tile: same AUROC, worse mask, lower criterion
    scored = model.predict

    def flat(tiles: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        output = scored(tiles, valid)
        spread = output.score[:, None, None].expand_as(output.anomaly_map).clone()
        return ModelOutput(anomaly_map=spread, score=output.score)

    model.predict = flat  # type: ignore[method-assign]
    assert by_tiles(model) == tile_auroc and by_both(model) < both


def test_training_learns_the_field_of_view_every_later_valid_area_applies() -> None:
    import numpy as np

    from models.manifest import PipelineConfig
    from models.preprocessing import valid_area
    from training.train import with_field_of_view

    config, _ = load_config("patchcore", None, ["pipeline.valid_area.end_margin=0"])
    valids = [np.zeros((16, 300), bool) for _ in range(3)]
    for valid, start in zip(valids, (60, 64, 20), strict=True):
        valid[:, start:] = True
    learned = with_field_of_view(config, valids)
    view = learned.pipeline.valid_area.field_of_view
    assert view is not None and (view.start, view.stop, view.width) == (60, 300, 300)
    assert config.pipeline.valid_area.field_of_view is None  # the given config is left alone
    image = np.full((16, 300), 120, np.uint8)  # fabric everywhere, by the padding rules
    assert valid_area(image, learned.pipeline.valid_area)[:, :60].sum() == 0
    # the bundle keeps it: the manifest's pipeline reads back with the same view
    raw = PipelineConfig.model_validate(learned.pipeline.model_dump(mode="json"))
    assert raw.valid_area.field_of_view == view
    off, _ = load_config("patchcore", None, ["pipeline.valid_area.learn_field_of_view=false"])
    assert with_field_of_view(off, valids).pipeline.valid_area.field_of_view is None


def test_draem_training_learns_the_column_baseline_its_detector_applies(
    synth_data: Path, tmp_path: Path
) -> None:
    import numpy as np

    from models.pipeline import Detector
    from training.data import load_image
    from training.train import train

    tiny = [
        "model.recon_channels=8", "model.disc_channels=8", "model.recon_depth=3",
        "model.disc_depth=3", "model.crop_size=0", "model.augment_share=0.0",
        "model.max_epochs=1", "pipeline.tile_size=64", "pipeline.stride=64",
    ]  # fmt: skip
    config, _ = load_config("draem", None, [*tiny, "pipeline.learn_column_baseline=true"])
    result = train("draem", synth_data, config, out=tmp_path / "m", max_minutes=2, progress=False)
    baseline = result.manifest.pipeline.column_baseline
    assert baseline is not None and baseline.width == 512
    assert baseline.images == len(result.split.train)
    # the bundle scores with it: its map is the network's less each column's level
    detector = Detector.from_bundle(result.bundle)
    assert detector.pipeline.column_baseline == baseline
    image = load_image(result.split.validation[0])
    plain = Detector(detector.network, result.manifest.model_copy(deep=True))
    plain.pipeline = plain.pipeline.model_copy(update={"column_baseline": None})
    raw = plain.analyse(image).anomaly_map
    expected = np.maximum(raw - baseline.profile()[None, :], 0)
    assert np.allclose(detector.analyse(image).anomaly_map, expected, atol=1e-6)
    # off by default
    off, _ = load_config("draem", None, tiny)
    without = train("draem", synth_data, off, out=tmp_path / "n", max_minutes=2, progress=False)
    assert without.manifest.pipeline.column_baseline is None
    # the isolated peak is learned by default, from the strips it was fitted on, and scores
    # every later analysis: the larger of the standardised tile score and peak gap
    peak = without.manifest.pipeline.isolated_peak
    assert peak is not None and peak.images == len(without.split.train)
    peaked = Detector.from_bundle(without.bundle)
    assert peaked.pipeline.isolated_peak == peak
    analysis = peaked.analyse(image)
    assert analysis.peak is not None
    assert analysis.peak["gap"] == pytest.approx(peak.gap(analysis.anomaly_map, analysis.valid))
    assert analysis.score == pytest.approx(
        peak.combine(analysis.peak["tile_score"], analysis.peak["gap"])
    )
    assert analysis.peak["tile_score"] == pytest.approx(
        max(s for s, f in zip(analysis.tile_scores, analysis.tile_valid, strict=True) if f > 0)
    )
