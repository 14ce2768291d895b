"""Parts shared by the detectors that score a tile by reconstructing it (the VAE and DRAEM).

- Input normalisation: each tile standardised by the median and the median absolute deviation
  of its fabric pixels (robust: a large defect does not rescale the fabric around it), pixels
  outside ``valid`` set to the fabric median, so padding never reaches a network. The fabric is
  low contrast and its brightness drifts between and along strips; standardising per tile lets
  a network spend its capacity on structure, and puts errors in units of the tile's contrast.
- Building blocks: GroupNorm (no batch statistics, so fitting and scoring compute the same
  function) and the upsampling block (nearest upsampling then a 3x3 convolution: transposed
  convolutions leave checkerboard artifacts, which would show in every error map).
- Local SSIM with a Gaussian window, and Gaussian smoothing over fabric pixels only.
- :class:`Reconstructor`: the base class that pads tiles to a multiple of the coarsest level,
  maps a reconstruction back to [0, 1], and shows input | reconstruction | anomaly map in reports.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import AnomalyModel, ReportPanel
from models.filters import gaussian_filter


# ---- input normalisation ----------------------------------------------------------------------
@dataclass
class Normalised:
    """Tiles in the model's working space, and how to map them back to [0, 1]."""

    x: torch.Tensor  # [B,1,H,W]
    weight: torch.Tensor  # [B,1,H,W] float, 1 on fabric
    centre: torch.Tensor  # [B,1,1,1]
    spread: torch.Tensor  # [B,1,1,1]

    def to_input_space(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.spread + self.centre


def normalise(tiles: torch.Tensor, valid: torch.Tensor | None, per_tile: bool) -> Normalised:
    """Tiles [B,1,H,W] in [0, 1] -> standardised per tile (``per_tile``) or only with padding
    filled by the fabric median; ``valid`` (default: all) marks fabric pixels."""
    weight = torch.ones_like(tiles) if valid is None else valid.to(tiles.dtype)
    on_fabric = tiles.flatten(1).masked_fill(weight.flatten(1) == 0, math.nan)
    centre = _nan_median(on_fabric)
    filled = torch.where(weight > 0, tiles, centre)
    if not per_tile:
        return Normalised(filled, weight, torch.zeros_like(centre), torch.ones_like(centre))
    # Median absolute deviation (scaled to match the standard deviation of a normal law), with
    # a floor of about 2.5 grey levels: the noise of a flat tile must not be blown up.
    spread = (1.4826 * _nan_median((on_fabric - centre.flatten(1)).abs())).clamp_min(0.01)
    return Normalised((filled - centre) / spread, weight, centre, spread)


def _nan_median(values: torch.Tensor) -> torch.Tensor:
    """[B,N] with NaN off fabric -> [B,1,1,1] median of each row (0 for a row of NaN).

    The lower median, as ``torch.nanmedian`` gives it, written with a sort so that the graph
    exports to ONNX (which has no NaN median)."""
    present = ~torch.isnan(values)
    count = present.sum(dim=1, keepdim=True)
    ordered = values.masked_fill(~present, math.inf).sort(dim=1).values
    middle = ordered.gather(1, ((count - 1) // 2).clamp_min(0))
    return torch.where(count > 0, middle, torch.zeros_like(middle)).view(-1, 1, 1, 1)


# ---- building blocks --------------------------------------------------------------------------
def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def up_block(c_in: int, c_out: int, activation: nn.Module) -> nn.Sequential:
    """Double the resolution: nearest upsampling, 3x3 convolution, GroupNorm, ``activation``."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        group_norm(c_out),
        activation,
    )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad [...,H,W] at the bottom and right to multiples of ``multiple``."""
    pad_y, pad_x = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_x, 0, pad_y), mode="replicate") if pad_y or pad_x else x


# ---- structural error and smoothing -----------------------------------------------------------
def ssim_map(
    a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Local SSIM (Wang et al., 2004) of [B,1,H,W] images with a Gaussian window; same shape.

    In the tile-standardised space ``data_range`` 1 is one tile spread, which keeps the
    stabilising constants small next to the local variance of the weave.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    moments = gaussian_filter(torch.cat([a, b, a * a, b * b, a * b], dim=1), sigma)
    mu_a, mu_b, aa, bb, ab = moments.split(1, dim=1)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    luminance = (2.0 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    structure = (2.0 * cov + c2) / (var_a + var_b + c2)
    return luminance * structure


def smooth_on_fabric(error: torch.Tensor, weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing that averages over fabric pixels only, then zero outside fabric.

    Dividing by the smoothed mask keeps values next to padding at their level instead of
    pulling them towards the zeros outside (normalised convolution).
    """
    if sigma <= 0:
        return error * weight
    stacked = torch.cat([error * weight, weight], dim=1)
    smoothed, coverage = gaussian_filter(stacked, sigma).split(1, dim=1)
    return smoothed / coverage.clamp_min(1e-6) * weight


# ---- the base of reconstruction models --------------------------------------------------------
class Reconstructor(AnomalyModel):
    """A detector that works on normalised tiles and reconstructs them (VAE, DRAEM).

    A subclass says whether it standardises each tile, the multiple its networks need tile
    sizes to be, and how it reconstructs a normalised tile (deterministically).
    """

    map_name: ClassVar[str] = "error map"  # what its anomaly map shows, for report captions

    @property
    @abstractmethod
    def per_tile_input(self) -> bool:
        """Standardise each tile (``input_norm: tile``), else keep absolute grey levels."""

    @property
    @abstractmethod
    def size_multiple(self) -> int:
        """Tiles are padded to multiples of this size before the networks, then cropped back."""

    @abstractmethod
    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tiles [B,1,H,W] -> their reconstruction, same shape and space."""

    def _normalise(self, tiles: torch.Tensor, valid: torch.Tensor | None) -> Normalised:
        return normalise(tiles, valid, self.per_tile_input)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple(x, self.size_multiple)

    @torch.inference_mode()
    def reconstruct(self, tiles: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction of tiles [B,1,H,W] in [0,1], same shape and range."""
        normalised = self._normalise(tiles, valid)
        return normalised.to_input_space(self.reconstruction(normalised.x)).clamp(0.0, 1.0)

    def report_panels(self, tiles: torch.Tensor, valid: torch.Tensor) -> list[ReportPanel]:
        figure = reconstruction_figure(self, tiles, valid)
        return [ReportPanel(f"Input | reconstruction | {self.map_name}", figure)]


# ---- a figure for reports ---------------------------------------------------------------------
def _stretch(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (pixels - low) / max(high - low, 1e-6) * 255.0
    return np.asarray(np.clip(scaled, 0, 255), dtype=np.uint8)


def reconstruction_figure(
    model: Reconstructor, tiles: torch.Tensor, valid: torch.Tensor, gap: int = 4
) -> np.ndarray:
    """BGR uint8 picture, one row per tile: input | reconstruction | anomaly map.

    Input and reconstruction share a contrast stretch, since the fabric is too low in contrast
    to see otherwise: the reconstruction's 1st-99th percentile on fabric (it shows defect-free
    fabric, so a large defect cannot flatten the stretch; defects clip to black or white).
    Maps share one colour scale over all rows (JET, 0 to the largest value), so rows compare;
    padding is grey.
    """
    reconstruction = model.reconstruct(tiles, valid)[:, 0].numpy()
    maps = model.predict(tiles, valid).anomaly_map.numpy()
    images, masks = tiles[:, 0].numpy(), valid[:, 0].numpy()
    top = max(float(maps.max()), 1e-6)
    height, width = images.shape[-2:]
    rows = []
    for image, recon, error, mask in zip(images, reconstruction, maps, masks, strict=True):
        fabric = recon[mask] if mask.any() else recon.ravel()
        low, high = np.percentile(fabric, [1.0, 99.0])
        grey = [cv2.cvtColor(_stretch(p, low, high), cv2.COLOR_GRAY2BGR) for p in (image, recon)]
        heat = cv2.applyColorMap(_stretch(error, 0.0, top), cv2.COLORMAP_JET)
        heat[~mask] = 128
        spacer = np.full((height, gap, 3), 255, np.uint8)
        rows.append(np.hstack([grey[0], spacer, grey[1], spacer, heat]))
        rows.append(np.full((gap, 3 * width + 2 * gap, 3), 255, np.uint8))
    return np.vstack(rows[:-1])
