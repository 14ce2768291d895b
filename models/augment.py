"""Geometric variation of defect-free tiles: the skew, bow and stretch a roll of fabric shows.

Woven fabric on a line is rarely square to the camera: weft skew and bow tilt the weave, tension
stretches it. A detector that has only seen one geometry flags every other one as a defect.
These random affine copies (shear, small rotation, scale; reflected at the borders) let a model
see that variation while fitting. The valid-area mask is warped with the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    copies: int = Field(default=0, ge=0, description="extra varied copies of each training tile")
    shear: float = Field(default=0.3, ge=0.0, le=1.0, description="max |column shift per row|")
    rotation: float = Field(default=3.0, ge=0.0, le=45.0, description="max |degrees|")
    scale: float = Field(default=0.05, ge=0.0, le=0.5, description="max relative stretch")


def random_affine(
    tiles: torch.Tensor, valid: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random shear/rotation/scale per tile, about the tile centre."""
    batch = tiles.shape[0]
    device = generator.device  # the draws where the generator is; the warp where the tiles are

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator, device=device) * 2.0 - 1.0) * limit

    shear, scale = uniform(config.shear), 1.0 + uniform(config.scale)
    angle = uniform(math.radians(config.rotation))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output -> input coordinates (normalised): rotation @ shear (x += shear * y), scaled.
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (cos * shear - sin) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, (sin * shear + cos) / scale
    grid = F.affine_grid(
        theta.to(tiles.device, tiles.dtype), list(tiles.shape), align_corners=False
    )
    warped = F.grid_sample(tiles, grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)  # fmt: skip
    warped_valid = F.grid_sample(valid.float(), grid, mode="nearest", padding_mode="reflection",
                                 align_corners=False)  # fmt: skip
    return warped, warped_valid > 0.5
