from __future__ import annotations

import numpy as np
import pytest

from models.tile_dataset import TileDataset
from models.tiling import Box, axis_starts, pad_to_tile, plan_tiles, stitch


def test_last_tile_is_aligned_to_the_edge() -> None:
    assert axis_starts(0, 1000, 256, 256, 1000) == [0, 256, 512, 744]
    assert axis_starts(0, 512, 256, 256, 512) == [0, 256]
    assert axis_starts(0, 600, 256, 128, 600) == [0, 128, 256, 344]


def test_short_span_gets_one_centred_tile_clamped_to_image() -> None:
    assert axis_starts(0, 100, 256, 256, 300) == [0]
    assert axis_starts(250, 300, 256, 256, 300) == [44]


def test_tiles_cover_only_the_valid_span() -> None:
    valid = np.ones((256, 4096), dtype=bool)
    valid[:, 3000:] = False  # padding at the right end
    boxes = plan_tiles(256, 4096, 256, 256, valid)
    assert boxes[0] == Box(0, 0, 256, 256)
    assert boxes[-1].x1 == 3000
    assert all(b.x1 <= 3000 for b in boxes)
    covered = np.zeros(4096, dtype=bool)
    for b in boxes:
        covered[b.x0 : b.x1] = True
    assert covered[:3000].all()


def test_any_width_is_covered_without_assuming_4096() -> None:
    boxes = plan_tiles(256, 3796, 256, 256)
    assert boxes[-1].x1 == 3796 and len(boxes) == 15


def test_stitch_averages_overlaps() -> None:
    boxes = [Box(0, 0, 4, 4), Box(0, 2, 4, 6)]
    maps = [np.full((4, 4), 1.0, np.float32), np.full((4, 4), 3.0, np.float32)]
    full = stitch(maps, boxes, 4, 7)
    assert full[0, 0] == 1.0 and full[0, 3] == 2.0 and full[0, 5] == 3.0
    assert full[0, 6] == 0.0  # not covered


def test_small_images_are_padded_and_padding_is_invalid() -> None:
    image = np.arange(50 * 40, dtype=np.uint8).reshape(50, 40)
    padded, valid = pad_to_tile(image, np.ones_like(image, bool), 64)
    assert padded.shape == (64, 64) and valid.shape == (64, 64)
    assert valid[:50, :40].all() and not valid[50:].any() and not valid[:, 40:].any()


def test_tile_dataset_skips_tiles_touching_padding() -> None:
    image = np.full((64, 256), 120, np.uint8)
    valid = np.ones_like(image, bool)
    valid[:, 200:] = False
    data = TileDataset([image], [valid], 64, 32, min_valid_fraction=1.0)
    assert len(data) > 0
    for index in range(len(data)):
        _, tile_valid = data[index]
        assert bool(tile_valid.all())
    with pytest.raises(ValueError):
        plan_tiles(10, 10, 64, 64)
