"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014): the
reconstruction baseline. A tile that the model, trained on defect-free fabric only, cannot
reconstruct well is anomalous where the reconstruction fails.

Read top to bottom: the network, the loss, fitting, scoring. The parts it shares with DRAEM
(input normalisation, GroupNorm and the upsampling block, padding, SSIM, smoothing over fabric,
the reconstruction figure of reports) are in models/components.py; the epoch loop in
models/epochs.py.

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
  BatchNorm: no batch statistics, so fitting and scoring compute the same function. LeakyReLU.
  Weights are kept channels_last, which roughly halves convolution time on a CPU.
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

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from models.base import FitContext, ModelConfig, ModelOutput, StepTimer, TileData
from models.components import (
    Normalised,
    Reconstructor,
    group_norm,
    smooth_on_fabric,
    ssim_map,
    up_block,
)
from models.device import Runtime
from models.epochs import fit_epochs, optimiser_step


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


# ---- network ----------------------------------------------------------------------------------
def level_channels(config: VAEConfig) -> list[int]:
    """Channels after each encoder block, finest first."""
    return [
        min(config.base_channels * 2**level, config.max_channels) for level in range(config.depth)
    ]


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
        group_norm(c_out),
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
            *[
                up_block(c_in, c_out, nn.LeakyReLU(0.2))
                for c_in, c_out in zip(channels, outs, strict=True)
            ]
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
class VAE(Reconstructor):
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
    @property
    def per_tile_input(self) -> bool:
        return self.config.input_norm == "tile"

    @property
    def size_multiple(self) -> int:
        return int(2**self.config.depth)

    def _forward(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction from a posterior sample (or its mean without a generator), mu, logvar."""
        mu, logvar = self.encoder(self._pad(x).contiguous(memory_format=torch.channels_last))
        z = mu
        if generator is not None:  # the generator lives where the network does
            noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            z = mu + (0.5 * logvar).exp() * noise
        x_hat = self.decoder(z)[..., : x.shape[-2], : x.shape[-1]]
        return x_hat, mu, logvar

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior-mean reconstruction of normalised tiles."""
        x_hat, _, _ = self._forward(x, None)
        return x_hat

    # ---- fitting ----------------------------------------------------------------------------
    def _train_step(
        self,
        tiles: torch.Tensor,
        valid: torch.Tensor,
        beta: float,
        optimiser: torch.optim.Optimizer,
        generator: torch.Generator,
        runtime: Runtime | None = None,
        scaler: torch.amp.GradScaler | None = None,
        timer: StepTimer | None = None,
    ) -> tuple[float, float, float]:
        """One step on a host batch: moved to the runtime's device, forward under its autocast
        (the losses in fp32), backward (scaled for float16)."""
        runtime = runtime or Runtime.cpu()
        timer = timer or StepTimer()
        with timer.stage("forward"):
            tiles, valid = runtime.put(tiles), runtime.put(valid)
            normalised = self._normalise(tiles, valid)
            with runtime.autocast():
                x_hat, mu, logvar = self._forward(normalised.x, generator)
            x_hat, mu, logvar = x_hat.float(), mu.float(), logvar.float()  # no-ops in fp32
            recon = reconstruction_loss(
                normalised.x, x_hat, normalised.weight, self.config.recon_loss
            )
            kl = kl_per_pixel(mu, logvar, normalised.x.numel())
            loss = recon + beta * kl
        with timer.stage("backward"):
            optimiser_step(loss, optimiser, scaler)
        total, recon_value, kl_value = torch.stack([loss, recon, kl]).detach().tolist()
        return total, recon_value, kl_value

    def fit(self, tiles: TileData, context: FitContext) -> dict[str, Any]:
        if len(tiles) == 0:
            raise ValueError("no defect-free tiles to fit the VAE on")
        runtime = context.runtime
        runtime.prepare(self)
        generator = torch.Generator(device="cpu").manual_seed(context.seed)  # shuffling
        noise = runtime.generator(context.seed, host=generator)  # the posterior samples
        optimiser = torch.optim.Adam(self.parameters(), lr=self.config.lr)
        scaler = runtime.grad_scaler()

        def train_batch(
            progress: float, batch: tuple[torch.Tensor, torch.Tensor]
        ) -> tuple[dict[str, float], dict[str, float]]:
            beta = kl_weight(self.config, progress)
            tiles, valid = batch
            loss, recon, kl = self._train_step(
                tiles, valid, beta, optimiser, noise, runtime, scaler, context.timer
            )
            # neg_elbo at the full beta: comparable across epochs of the warm-up
            neg_elbo = recon + self.config.beta * kl
            return {"loss": loss, "recon": recon, "kl": kl, "neg_elbo": neg_elbo}, {"beta": beta}

        return fit_epochs(
            self,
            tiles,
            context,
            train_batch,
            generator=generator,
            max_epochs=self.config.max_epochs,
            loss_key="neg_elbo",
            name="vae",
        )

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
        maps = self.error_map(normalised, self.reconstruction(normalised.x))[:, 0]
        scores = image_scores(maps, valid[:, 0], self.config.score, self.config.topk)
        return ModelOutput(anomaly_map=maps, score=scores)


def image_scores(maps: torch.Tensor, valid: torch.Tensor, mode: str, topk: int) -> torch.Tensor:
    """[B,H,W] maps -> [B] scores from fabric pixels only; 0 for a tile without fabric.

    Written without a loop over tiles or a data-dependent size, so that it exports to ONNX:
    pixels off fabric are -inf, and a tile with fewer than ``topk`` fabric pixels averages only
    those it has.
    """
    on_fabric = valid.flatten(1)
    count = on_fabric.sum(dim=1)
    values = maps.flatten(1).masked_fill(~on_fabric, -math.inf)
    if mode == "max":
        scores = values.max(dim=1).values
    else:
        k = min(topk, values.shape[1])
        largest = values.topk(k, dim=1).values
        taken = torch.arange(k, device=maps.device) < count[:, None]
        total = largest.masked_fill(~taken, 0.0).sum(dim=1)
        scores = total / count.clamp(1, k).to(maps.dtype)
    return torch.where(count > 0, scores, torch.zeros_like(scores))
