"""int8 calibration tiles: defect-free fabric, a share of it with synthetic defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loomwatch.cli import main
from models.calibration import Calibration
from models.manifest import Manifest, PipelineConfig
from training.export import calibration_tiles

CAL = Calibration(image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5,
                  pixel_min=0.0, pixel_max=1.0, method="test")  # fmt: skip


def manifest() -> Manifest:
    return Manifest(model_type="draem", config={}, calibration=CAL,
                    pipeline=PipelineConfig(tile_size=64, stride=64))  # fmt: skip


def test_a_share_of_the_tiles_gets_a_synthetic_defect_on_fabric(synth_data: Path) -> None:
    clean = calibration_tiles(synth_data, manifest(), limit=20, anomaly_share=0.0, progress=False)
    mixed = calibration_tiles(synth_data, manifest(), limit=20, anomaly_share=0.5, progress=False)
    assert len(clean.tiles) == len(mixed.tiles) == 20 and clean.synthetic == 0
    assert clean.images == mixed.images > 0
    changed = np.any(clean.tiles != mixed.tiles, axis=(1, 2))
    # the first half is drawn for a defect, the second half is kept as it was
    assert 0 < mixed.synthetic == int(changed.sum()) <= 10 and not changed[10:].any()
    assert np.array_equal(clean.valid, mixed.valid)
    # nothing changes off the fabric (padding, selvage): the valid area is the pipeline's
    off_fabric = ~mixed.valid
    assert np.array_equal(clean.tiles[off_fabric], mixed.tiles[off_fabric])
    every = calibration_tiles(synth_data, manifest(), limit=20, anomaly_share=1.0, progress=False)
    assert every.synthetic > 10


def test_a_share_outside_zero_to_one_is_refused(synth_data: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_tiles(synth_data, manifest(), anomaly_share=1.5, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model-uri", "x", "--format", "onnx", "--out", "y",
              "--calibration-anomalies", "1.5"])  # fmt: skip
    assert exit_info.value.code == 2
