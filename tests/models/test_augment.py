from __future__ import annotations

import numpy as np
import torch

from models.augment import AugmentConfig, random_affine


def twill(size: int = 64) -> torch.Tensor:
    y, x = np.mgrid[0:size, 0:size]
    pattern = 0.5 + 0.3 * np.sin(2 * np.pi * (x / 8.0 + y / 16.0))
    return torch.from_numpy(pattern.astype(np.float32))[None, None]


def test_zero_ranges_leave_the_tile_unchanged() -> None:
    tile = twill()
    valid = torch.ones_like(tile, dtype=torch.bool)
    config = AugmentConfig(copies=1, shear=0.0, rotation=0.0, scale=0.0)
    warped, warped_valid = random_affine(tile, valid, config, torch.Generator().manual_seed(0))
    assert torch.allclose(warped, tile, atol=1e-5) and bool(warped_valid.all())


def test_shear_tilts_the_weave_and_warps_the_valid_mask() -> None:
    size = 64
    tile = twill(size)
    valid = torch.ones_like(tile, dtype=torch.bool)
    valid[..., :, 48:] = False
    config = AugmentConfig(copies=1, shear=0.5, rotation=0.0, scale=0.0)
    warped, warped_valid = random_affine(tile, valid, config, torch.Generator().manual_seed(1))
    shear = float(torch.rand(1, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.5
    assert abs(shear) > 0.05
    # Expected: each row shifted sideways in proportion to its distance from the centre.
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = (size - 1) / 2
    source_x = x + shear * (y - centre)
    expected = 0.5 + 0.3 * np.sin(2 * np.pi * (source_x / 8.0 + y / 16.0))
    inside = (source_x > 1) & (source_x < size - 2)
    assert np.abs(warped[0, 0].numpy() - expected)[inside].max() < 0.05
    assert not np.allclose(warped[0, 0].numpy(), tile[0, 0].numpy(), atol=0.05)
    assert warped_valid.shape == valid.shape and not bool(warped_valid.all())
