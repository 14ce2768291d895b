"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014): the
reconstruction baseline. A tile that the model, trained on defect-free fabric only, cannot
reconstruct well is anomalous where the reconstruction fails.

Read top to bottom: input normalisation, the network, the loss, fitting, scoring, a figure.

Choices, and why:

- Spatial latent. The encoder is fully convolutional: ``depth`` stride-2 blocks map a tile to a
  grid of Gaussians with ``latent_channels`` dimensions each, at 1/2**depth of the resolution
  (16 x 16 x 16 numbers for a 256 x 256 tile with the defaults: 16 times fewer than pixels).
  Fabric is a stationary texture; local codes reconstruct the weave wherever it lies in the tile,
  where a single dense vector (say 128 numbers) must also encode the phase of the weave across
  the whole tile and gives blurred reconstructions with high error everywhere on fabric. A fully
  convolutional network also runs on any tile size (64 in the tests, 256 in use) without a tile
  size in its config; sizes that are not a multiple of 2**depth are padded and cropped back.
  The KL term, not only the narrow code, keeps the network from copying its input.
- Blocks: stride-2 4x4 convolutions down; nearest upsampling then a 3x3 convolution up (transposed
  convolutions leave checkerboard artifacts, which would show in every error map). GroupNorm, not
  BatchNorm: no batch statistics, so fitting and scoring compute the same function. Weights are
  kept channels_last, which roughly halves convolution time on a CPU.
  Defaults (base 32 channels doubling to 256, depth 4, 16 latent channels) cost about 1.7 GMAC per
  256 x 256 tile, affordable on a CPU.
- Input: ``input_norm: tile`` standardises each tile by the median and the median absolute
  deviation of its fabric pixels (robust: a large defect does not rescale the fabric around it).
  The fabric is low contrast and its brightness drifts between and along strips, so the model
  spends its capacity on structure and errors are in units of the tile's own contrast (the price:
  a tile that is uniformly darker or lighter than the rest looks normal; ``input_norm: none``
  keeps absolute grey levels). Pixels outside ``valid`` are set to the fabric median before
  encoding, so padding never reaches the network.
- Loss: the negative ELBO per pixel, reconstruction (L2 or L1, over fabric pixels) + beta * KL
  (nats per pixel). Beta rises linearly from 0 over ``kl_warmup_epochs`` (updated every batch)
  so that the decoder learns to use the code before the KL term can switch it off (posterior
  collapse). The best state is the one ``context.validate`` scores highest, else the one with the
  lowest training loss at the full beta (losses during the warm-up are not comparable).
- Map: |x - x_hat| (or squared) in the normalised space, plus ``ssim_weight`` * (1 - SSIM) with a
  Gaussian window (structural error finds texture defects that per-pixel error misses: Bergmann
  et al., VISAPP 2019). It uses the posterior mean, never a sample, so scoring is deterministic.
  It is smoothed by a Gaussian over fabric pixels only and is zero outside ``valid``.
- Score: the mean of the ``topk`` largest map values on fabric (or their maximum); 0 without
  fabric.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader

from models.base import AnomalyModel, FitContext, ModelConfig, ModelOutput, TileData
from models.epochs import EpochOutcome, EpochTotals, batches, run_epochs
from models.filters import gaussian_filter

log = logging.getLogger(__name__)


class VAEConfig(ModelConfig):
    # network
    base_channels: int = Field(default=32, ge=1)
    max_channels: int = Field(default=256, ge=1)
    depth: int = Field(default=4, ge=1, le=8, description="stride-2 blocks; latent at 1/2**depth")
    latent_channels: int = Field(default=16, ge=1)
    input_norm: Literal["tile", "none"] = "tile"
    # loss and fitting
    recon_loss: Literal["l2", "l1"] = "l2"
    beta: float = Field(default=1.0, ge=0.0)
    kl_warmup_epochs: float = Field(default=10.0, ge=0.0)
    lr: float = Field(default=1e-3, gt=0.0)
    max_epochs: int = Field(default=100, ge=1)
    # scoring
    map_error: Literal["abs", "squared"] = "abs"
    ssim_weight: float = Field(default=1.0, ge=0.0)
    ssim_sigma: float = Field(default=1.5, gt=0.0, le=8.0)
    smoothing_sigma: float = Field(default=4.0, ge=0.0)
    score: Literal["topk_mean", "max"] = "topk_mean"
    topk: int = Field(default=100, ge=1, description="fabric pixels averaged by topk_mean")


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
    """[B,N] with NaN off fabric -> [B,1,1,1] median of each row (0 for a row of NaN)."""
    return torch.nanmedian(values, dim=1).values.nan_to_num(0.0).view(-1, 1, 1, 1)


# ---- network ----------------------------------------------------------------------------------
def level_channels(config: VAEConfig) -> list[int]:
    """Channels after each encoder block, finest first."""
    return [
        min(config.base_channels * 2**level, config.max_channels) for level in range(config.depth)
    ]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), _norm(c_out), nn.LeakyReLU(0.2)
    )


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        _norm(c_out),
        nn.LeakyReLU(0.2),
    )


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = level_channels(config)
        self.body = nn.Sequential(
            *[
                down_block(c_in, c_out)
                for c_in, c_out in zip([1, *channels[:-1]], channels, strict=True)
            ]
        )
        self.head = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> posterior mean and log-variance, each [B, latent_channels, H/2**d, W/2**d]."""
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)  # keeps exp(logvar) finite early in fitting


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = level_channels(config)[::-1]
        self.stem = nn.Sequential(
            nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1),
            nn.LeakyReLU(0.2),
        )
        # The last block works at full resolution, the costliest level: half the channels.
        outs = [*channels[1:], max(channels[-1] // 2, 1)]
        self.body = nn.Sequential(
            *[up_block(c_in, c_out) for c_in, c_out in zip(channels, outs, strict=True)]
        )
        self.head = nn.Conv2d(outs[-1], 1, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(self.body(self.stem(z)))
        return result


# ---- loss -------------------------------------------------------------------------------------
def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor, kind: str
) -> torch.Tensor:
    """Mean per-pixel L2 or L1 error over the pixels with weight 1."""
    error = (x_hat - x).abs() if kind == "l1" else (x_hat - x) ** 2
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def kl_per_pixel(mu: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent grid, in nats per input pixel."""
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum() / pixels


def kl_weight(config: VAEConfig, progress_epochs: float) -> float:
    """Beta after `progress_epochs` epochs of fitting: linear warm-up from 0."""
    if config.kl_warmup_epochs <= 0:
        return config.beta
    return config.beta * min(1.0, progress_epochs / config.kl_warmup_epochs)


# ---- the model --------------------------------------------------------------------------------
class VAE(AnomalyModel):
    model_type = "vae"
    config_class = VAEConfig
    config: VAEConfig
    selects_best_state = True

    def __init__(self, config: VAEConfig, load_weights: bool = True) -> None:
        super().__init__(config, load_weights)  # no external weights to load
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Loading a state copies into these tensors, so the channels_last layout stays.
        self.to(memory_format=torch.channels_last)

    # ---- passes -----------------------------------------------------------------------------
    def _normalise(self, tiles: torch.Tensor, valid: torch.Tensor | None) -> Normalised:
        return normalise(tiles, valid, self.config.input_norm == "tile")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.config.depth
        pad_y, pad_x = -x.shape[-2] % multiple, -x.shape[-1] % multiple
        return F.pad(x, (0, pad_x, 0, pad_y), mode="replicate") if pad_y or pad_x else x

    def _forward(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction from a posterior sample (or its mean without a generator), mu, logvar."""
        mu, logvar = self.encoder(self._pad(x).contiguous(memory_format=torch.channels_last))
        z = mu
        if generator is not None:
            noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
            z = mu + (0.5 * logvar).exp() * noise
        x_hat = self.decoder(z)[..., : x.shape[-2], : x.shape[-1]]
        return x_hat, mu, logvar

    @torch.inference_mode()
    def reconstruct(self, tiles: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior-mean reconstruction of tiles [B,1,H,W] in [0,1], same shape and range."""
        normalised = self._normalise(tiles, valid)
        x_hat, _, _ = self._forward(normalised.x, None)
        return normalised.to_input_space(x_hat).clamp(0.0, 1.0)

    # ---- fitting ----------------------------------------------------------------------------
    def _train_step(
        self,
        tiles: torch.Tensor,
        valid: torch.Tensor,
        beta: float,
        optimiser: torch.optim.Optimizer,
        generator: torch.Generator,
    ) -> tuple[float, float, float]:
        normalised = self._normalise(tiles, valid)
        x_hat, mu, logvar = self._forward(normalised.x, generator)
        recon = reconstruction_loss(normalised.x, x_hat, normalised.weight, self.config.recon_loss)
        kl = kl_per_pixel(mu, logvar, normalised.x.numel())
        loss = recon + beta * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.item(), recon.item(), kl.item()

    def _train_epoch(
        self,
        loader: DataLoader[Any],
        epoch: int,
        optimiser: torch.optim.Optimizer,
        context: FitContext,
        generator: torch.Generator,
        stop_at: float,
    ) -> EpochTotals:
        """One pass over the tiles; stops early (finished=False) at ``stop_at`` or a NaN loss."""
        totals = EpochTotals()
        steps = len(loader)
        for step, (tiles, valid) in enumerate(batches(loader, context, epoch)):
            if time.monotonic() >= stop_at:
                return totals
            beta = kl_weight(self.config, epoch + step / steps)
            loss, recon, kl = self._train_step(tiles, valid, beta, optimiser, generator)
            if not math.isfinite(loss):
                log.warning("VAE loss is not finite at epoch %d; fitting stops", epoch)
                totals.non_finite = True
                return totals
            # neg_elbo at the full beta: comparable across epochs of the warm-up
            neg_elbo = recon + self.config.beta * kl
            totals.add({"loss": loss, "recon": recon, "kl": kl, "neg_elbo": neg_elbo},
                       last={"beta": beta})  # fmt: skip
        totals.finished = True
        return totals

    def fit(self, tiles: TileData, context: FitContext) -> dict[str, Any]:
        if len(tiles) == 0:  # type: ignore[arg-type]
            raise ValueError("no defect-free tiles to fit the VAE on")
        generator = torch.Generator().manual_seed(context.seed)
        loader: DataLoader[Any] = DataLoader(
            tiles, batch_size=context.batch_size, shuffle=True, generator=generator
        )
        optimiser = torch.optim.Adam(self.parameters(), lr=self.config.lr)

        def step(epoch: int, stop_at: float) -> EpochOutcome | None:
            totals = self._train_epoch(loader, epoch, optimiser, context, generator, stop_at)
            return totals.outcome()

        summary = run_epochs(
            self,
            context,
            step,
            max_epochs=self.config.max_epochs,
            loss_key="neg_elbo",
            name="vae",
            steps_per_epoch=len(loader),
        )
        summary["train_tiles"] = float(len(tiles))  # type: ignore[arg-type]
        return summary

    # ---- scoring ----------------------------------------------------------------------------
    def error_map(self, normalised: Normalised, x_hat: torch.Tensor) -> torch.Tensor:
        """[B,1,H,W] per-pixel error (+ structural error), smoothed over fabric, 0 elsewhere."""
        difference = x_hat - normalised.x
        error = difference.abs() if self.config.map_error == "abs" else difference**2
        if self.config.ssim_weight > 0:
            structural = 1.0 - ssim_map(normalised.x, x_hat, self.config.ssim_sigma)
            error = error + self.config.ssim_weight * structural
        return smooth_on_fabric(error, normalised.weight, self.config.smoothing_sigma)

    @torch.inference_mode()
    def predict(self, tiles: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        normalised = self._normalise(tiles, valid)
        x_hat, _, _ = self._forward(normalised.x, None)
        maps = self.error_map(normalised, x_hat)[:, 0]
        scores = image_scores(maps, valid[:, 0], self.config.score, self.config.topk)
        return ModelOutput(anomaly_map=maps, score=scores)


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


def image_scores(maps: torch.Tensor, valid: torch.Tensor, mode: str, topk: int) -> torch.Tensor:
    """[B,H,W] maps -> [B] scores from fabric pixels only; 0 for a tile without fabric."""
    scores = torch.zeros(maps.shape[0], dtype=maps.dtype)
    for item in range(maps.shape[0]):
        values = maps[item][valid[item]]
        if values.numel() == 0:
            continue
        if mode == "max":
            scores[item] = values.max()
        else:
            scores[item] = values.topk(min(topk, values.numel())).values.mean()
    return scores


# ---- a figure for reports ---------------------------------------------------------------------
def _stretch(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (pixels - low) / max(high - low, 1e-6) * 255.0
    return np.asarray(np.clip(scaled, 0, 255), dtype=np.uint8)


def reconstruction_figure(
    model: VAE, tiles: torch.Tensor, valid: torch.Tensor, gap: int = 4
) -> np.ndarray:
    """BGR uint8 picture, one row per tile: input | reconstruction | error map.

    Input and reconstruction share a contrast stretch, since the fabric is too low in contrast
    to see otherwise: the reconstruction's 1st-99th percentile on fabric (it shows defect-free
    fabric, so a large defect cannot flatten the stretch; defects clip to black or white).
    Error maps share one colour scale over all rows (JET, 0 to the largest value), so rows
    compare; padding is grey.
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
