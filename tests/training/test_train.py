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
