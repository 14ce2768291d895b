from __future__ import annotations

from pathlib import Path

import pytest

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
