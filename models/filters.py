"""Shared image filters on torch tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, device: torch.device | str | None = None) -> torch.Tensor:
    """A normalised 1-D Gaussian, made on ``device`` (the input's: no copy from the host)."""
    radius = max(1, math.ceil(3.0 * sigma))  # sigma 1.5 -> the usual 11-tap SSIM window
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of each channel of [B,C,H,W], reflecting at the borders."""
    kernel = gaussian_kernel(sigma, x.device)
    channels, radius = x.shape[1], kernel.numel() // 2
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    row = kernel.to(x.dtype).view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    x = F.conv2d(x, row, groups=channels)
    return F.conv2d(x, row.transpose(2, 3), groups=channels)
