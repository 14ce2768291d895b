"""DRAEM (Zavrtanik, Kristan & Skočaj, "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021): a reconstructive network learns to turn a
tile with a synthetic defect back into defect-free fabric, and a discriminative U-Net, shown the
input beside its reconstruction, learns to segment where the two differ for a reason.

Read top to bottom: the networks, the loss, fitting (with synthesis), scoring. The parts it
shares with the VAE (input normalisation, GroupNorm and the upsampling block, padding, SSIM,
smoothing over fabric, the reconstruction figure of reports) are in models/components.py; the
epoch loop in models/epochs.py.

Choices, and why:

- Networks as in the paper, sized by ``recon_channels`` and ``disc_channels`` (paper 128 / 64;
  default 16 / 16 for a CPU, chosen by measurement: README, "DRAEM on AITEX"). Reconstructive:
  an encoder of ``recon_depth`` max-pool levels (channels doubling up to 8x the base) and a
  decoder without skip connections, so it cannot copy a defect through. Discriminative: a
  U-Net with skips on concat(input, reconstruction), two output classes (fabric, anomaly).
  GroupNorm instead of the paper's BatchNorm: no batch statistics, so fitting and scoring
  compute the same function.
  Tiles whose size is not a multiple of the coarsest level are padded and cropped back.
- Input: ``input_norm: tile`` standardises each tile by its fabric median and MAD (see
  models/components.py: the fabric is low contrast and its brightness drifts); padding is set to
  the fabric median. The clean target is normalised with the augmented tile's statistics.
- Loss: L2 + ``ssim_weight`` * (1 - mean SSIM) on the reconstruction (against the clean tile),
  plus focal loss (``focal_gamma``, 2 in the paper) on the segmentation, over fabric pixels.
- Synthesis: models/synthesis.py (Perlin + texture, and textile-shaped defects), mixed by the
  ``synthesis`` config; half the samples stay clean by default, as in the paper.
- Fitting as the VAE: epochs under ``context.deadline``, Adam, learning rate multiplied by
  ``lr_gamma`` at each fraction in ``lr_steps`` of ``max_epochs`` or of the time budget, whichever
  comes first (the paper's steps at 80 % and 90 % of its epochs; on a CPU the budget ends the
  schedule long before ``max_epochs``, and without the late steps the state that validation picked
  swung between epochs); the best state is the one ``context.validate`` scores highest (every
  ``validate_every`` epochs, among the states from ``select_from`` of the schedule on: the maximum
  over every epoch had kept untrained states), else the lowest mean training loss. On a CPU the
  networks see random ``crop_size`` crops of the tiles (a step on 128 px crops costs about a quarter
  of one on 256 px tiles, and the networks are fully convolutional, so scoring still runs on whole
  tiles); ``crop_edge_share`` of the crops are pinned to the tile's edges along each axis, because
  scoring sees every tile's borders and corners (on a strip, its top and bottom rows are tile
  borders too) and uniform crops almost never hold them (docs/fleets.md, fabric 06's tile corners);
  ``augment_share`` of the tiles are first skewed and stretched (models/augment.py): fabric-02
  defect strips show the twill at another angle than the clean strips it trains on.
- Layout: plain (contiguous) tensors. channels_last made a training step twice as slow here
  (16/16 widths, batch 8: 9.6 s against 5.3 s on 256 px tiles, measured in one run); it is an
  option of the runtime (``--channels-last``) for GPUs, where it feeds the tensor cores.
- Devices (models/device.py): a step is a host-side data stage (``prepare_batch``: skew,
  crops and anomaly synthesis, numpy and OpenCV on the CPU, in the order the seed fixes) and
  the device stage (``learn``: forward under the runtime's autocast, backward, with a gradient
  scaler for float16). On an accelerator the data stage of the next batch runs in a thread
  while the device trains (models/epochs.py), so the same seed gives the same synthetic
  batches on every device; on the CPU nothing changes.
- Ensembles (``members``, 1 by default): that many networks, seeded ``seed``, ``seed + 1``, ...,
  are fitted one after the other, each on an even share of the time left and each keeping the
  state validation scores best for it alone; scoring averages their anomaly probabilities before
  smoothing and pooling. With a handful of defect-free strips per fabric one network's map, and
  the state validation picks for it, change from run to run by more than a fabric's defects
  separate by (docs/fleets.md); an average of independent networks should be steadier (measured
  once there: "An ensemble of networks per fabric"; not yet the default). Scoring costs
  ``members`` times as much; the first network keeps the weight names of a single one.
- Map: the softmax anomaly channel, optionally smoothed over fabric (``smoothing_sigma``), 0 off
  fabric. Score (the paper): the maximum over fabric of the map averaged over ``score_pool`` x
  ``score_pool`` windows (averaging over fabric pixels only); 0 without fabric.

Paper preset (training/configs/draem-paper.yaml; for a GPU): 256 px tiles, batch 8, Adam with
lr 1e-4, 700 epochs, lr x 0.2 at 80 % and 90 % of the epochs, widths 128 / 64.
CPU preset: training/configs/draem-cpu.yaml.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.augment import AugmentConfig, random_affine
from models.base import FitContext, ModelConfig, ModelOutput, StepTimer, TileData
from models.components import Reconstructor, group_norm, smooth_on_fabric, ssim_map, up_block
from models.device import Runtime
from models.epochs import fit_epochs, optimiser_step
from models.synthesis import SynthesisConfig, SynthesisMix

log = logging.getLogger(__name__)


class DraemConfig(ModelConfig):
    # networks
    recon_channels: int = Field(default=16, ge=1, description="paper: 128")
    disc_channels: int = Field(default=16, ge=1, description="paper: 64")
    recon_depth: int = Field(default=4, ge=1, le=6, description="max-pool levels (paper: 4)")
    disc_depth: int = Field(default=4, ge=1, le=6, description="max-pool levels (paper: 5)")
    input_norm: Literal["tile", "none"] = "tile"
    # loss and fitting
    ssim_weight: float = Field(default=1.0, ge=0.0)
    ssim_sigma: float = Field(default=1.5, gt=0.0, le=8.0)
    focal_gamma: float = Field(default=2.0, ge=0.0)
    lr: float = Field(default=1e-3, gt=0.0)
    max_epochs: int = Field(default=100, ge=1)
    lr_steps: list[float] = Field(default_factory=lambda: [0.8, 0.9])
    lr_gamma: float = Field(default=0.2, gt=0.0)
    texture_tiles: int = Field(default=64, ge=0, description="training tiles kept as textures")
    crop_size: int = Field(
        default=128, ge=0, description="train on random square crops of this size; 0: whole tiles"
    )
    crop_edge_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="share of crops pinned to a tile edge along each axis (first or last rows"
        " or columns), so that the tile borders and corners that scoring sees are trained on",
    )
    augment: AugmentConfig = Field(
        default_factory=lambda: AugmentConfig(shear=0.9, rotation=0.0, scale=0.03)
    )
    augment_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="share of training tiles skewed/stretched"
    )
    validate_every: int = Field(default=2, ge=1, description="epochs between validation scores")
    select_from: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="share of the schedule (epochs or time budget) before which no state can"
        " become the best one (the last always can); 0: every scored state; 0.8, the first"
        " learning-rate step (docs/fleets.md, 'Which state is kept')",
    )
    ema_decay: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="per-step decay of a moving average of the weights that is scored and kept"
        " instead of the raw weights; 0: off",
    )
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    members: int = Field(
        default=1,
        ge=1,
        le=8,
        description="independently seeded networks trained one after the other, each on an even"
        " share of the fit budget and keeping its own best state; scoring averages their maps"
        " (a deep ensemble)",
    )
    # scoring
    smoothing_sigma: float = Field(default=0.0, ge=0.0)
    score_pool: int = Field(
        default=5, ge=1, description="averaging window of the image score (paper: 21)"
    )


# ---- networks ---------------------------------------------------------------------------------
def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), group_norm(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, kernel_size=3, padding=1), group_norm(c_out), nn.ReLU(inplace=True),
    )  # fmt: skip


def level_channels(base: int, depth: int) -> list[int]:
    """Channels at each level, finest first: doubling, at most 8x the base."""
    return [base * min(2**level, 8) for level in range(depth + 1)]


class Encoder(nn.Module):
    """Conv blocks with max pooling between them; returns every level's features."""

    def __init__(self, c_in: int, base: int, depth: int) -> None:
        super().__init__()
        channels = level_channels(base, depth)
        self.blocks = nn.ModuleList(
            conv_block(a, b) for a, b in zip([c_in, *channels[:-1]], channels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level, block in enumerate(self.blocks):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features


class ReconstructiveNet(nn.Module):
    """Encoder-decoder without skips: a tile back as defect-free fabric."""

    def __init__(self, base: int, depth: int) -> None:
        super().__init__()
        channels = level_channels(base, depth)[::-1]
        self.encoder = Encoder(1, base, depth)
        self.ups = nn.ModuleList(
            up_block(a, b, nn.ReLU(inplace=True)) for a, b in itertools.pairwise(channels)
        )
        self.blocks = nn.ModuleList(conv_block(b, b) for b in channels[1:])
        self.head = nn.Conv2d(channels[-1], 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(x)[-1]
        for up, block in zip(self.ups, self.blocks, strict=True):
            y = block(up(y))
        result: torch.Tensor = self.head(y)
        return result


class DiscriminativeNet(nn.Module):
    """U-Net on concat(input, reconstruction) -> logits [B,2,H,W] (fabric, anomaly)."""

    def __init__(self, base: int, depth: int) -> None:
        super().__init__()
        channels = level_channels(base, depth)[::-1]
        self.encoder = Encoder(2, base, depth)
        self.ups = nn.ModuleList(
            up_block(a, b, nn.ReLU(inplace=True)) for a, b in itertools.pairwise(channels)
        )
        self.blocks = nn.ModuleList(conv_block(2 * b, b) for b in channels[1:])
        self.head = nn.Conv2d(channels[-1], 2, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = features[-1]
        for up, block, skip in zip(self.ups, self.blocks, features[-2::-1], strict=True):
            y = block(torch.cat([up(y), skip], dim=1))
        result: torch.Tensor = self.head(y)
        return result


# ---- loss -------------------------------------------------------------------------------------
def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) of 2-class logits [B,2,H,W] against a {0,1} [B,1,H,W] mask.

    Per pixel -(1 - p_t)**gamma * log(p_t), p_t the probability of the true class; the mean over
    pixels with weight 1 (all without a weight). gamma 0 is the cross-entropy.
    """
    log_p = F.log_softmax(logits, dim=1)
    log_pt = torch.where(target > 0.5, log_p[:, 1:2], log_p[:, 0:1])
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


LOSS_PARTS = ("loss", "l2", "ssim_loss", "focal")


# ---- the model --------------------------------------------------------------------------------
class Draem(Reconstructor):
    model_type = "draem"
    config_class = DraemConfig
    config: DraemConfig
    selects_best_state = True
    # its fitted-on strips score like held-back ones (docs/fleets.md, "Where the operating
    # point comes from"), so figures learned on them hold for new strips
    representative_training_maps = True
    map_name = "anomaly map"

    def __init__(self, config: DraemConfig, load_weights: bool = True) -> None:
        super().__init__(config, load_weights)  # no external weights to load
        self.reconstructive = ReconstructiveNet(config.recon_channels, config.recon_depth)
        self.discriminative = DiscriminativeNet(config.disc_channels, config.disc_depth)
        # members 2..n of an ensemble (none by default, so one network keeps its weight names)
        self.others = nn.ModuleList(
            Draem(config.model_copy(update={"members": 1}), load_weights)
            for _ in range(config.members - 1)
        )
        self._alone = False  # while member 1 fits, validation scores it alone

    # ---- passes -----------------------------------------------------------------------------
    @property
    def per_tile_input(self) -> bool:
        return self.config.input_norm == "tile"

    @property
    def size_multiple(self) -> int:
        return int(2 ** max(self.config.recon_depth, self.config.disc_depth))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised tiles [B,1,H,W] -> reconstruction [B,1,H,W] and logits [B,2,H,W]."""
        padded = self._pad(x)
        x_hat = self.reconstructive(padded)
        logits = self.discriminative(torch.cat([padded, x_hat], dim=1))
        height, width = x.shape[-2:]
        return x_hat[..., :height, :width], logits[..., :height, :width]

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstructive network alone (as in ``_forward``)."""
        x_hat: torch.Tensor = self.reconstructive(self._pad(x))
        return x_hat[..., : x.shape[-2], : x.shape[-1]]

    # ---- fitting ----------------------------------------------------------------------------
    def vary(
        self, tiles: torch.Tensor, valid: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch as the networks see it: ``augment_share`` of the tiles skewed and
        stretched (models/augment.py), then each cut to a random ``crop_size`` square."""
        if self.config.augment_share > 0:
            draws = torch.rand(len(tiles), generator=generator, device=generator.device)
            chosen = draws.to(tiles.device) < self.config.augment_share
            if chosen.any():
                warped, warped_valid = random_affine(
                    tiles[chosen], valid[chosen], self.config.augment, generator
                )
                tiles, valid = tiles.clone(), valid.clone()
                tiles[chosen], valid[chosen] = warped, warped_valid
        size = self.config.crop_size
        height, width = tiles.shape[-2:]
        if size <= 0 or (size >= height and size >= width):
            return tiles, valid
        size_y, size_x = min(size, height), min(size, width)
        ys = self._crop_origins(len(tiles), height - size_y, generator)
        xs = self._crop_origins(len(tiles), width - size_x, generator)
        crops = [(t[..., y : y + size_y, x : x + size_x], v[..., y : y + size_y, x : x + size_x])
                 for t, v, y, x in zip(tiles, valid, ys, xs, strict=True)]  # fmt: skip
        return torch.stack([c for c, _ in crops]), torch.stack([v for _, v in crops])

    def _crop_origins(self, count: int, last: int, generator: torch.Generator) -> list[int]:
        """``count`` crop origins along one axis, in 0..``last``: uniform, except that
        ``crop_edge_share`` of them are pinned to 0 or ``last`` (half each). With uniform origins
        alone a 128 px crop of a 256 px tile holds the tile's first row once in 129 crops and its
        corner once in 129**2, while scoring sees every tile's borders (and the strip's top and
        bottom rows are tile borders): fabric 06's false alarms peaked at tile corners. At 0.5
        the first row is in a quarter of the crops and no row in more than three quarters."""
        uniform = torch.randint(0, last + 1, (count,), generator=generator, device=generator.device)
        share = self.config.crop_edge_share
        if share <= 0:  # no draw: the random stream (and so a seeded run) as without the setting
            return uniform.tolist()
        draws = torch.rand(count, generator=generator, device=generator.device)
        pinned = torch.where(draws < share / 2, 0, last)
        return torch.where(draws < share, pinned, uniform).tolist()

    def synthesise(
        self, tiles: torch.Tensor, valid: torch.Tensor, mix: SynthesisMix, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch [B,1,H,W] -> augmented tiles and float anomaly masks, same shape."""
        pairs = [
            mix(tile[0].numpy(), mask[0].numpy(), rng)
            for tile, mask in zip(tiles, valid, strict=True)
        ]
        augmented = torch.from_numpy(np.stack([a for a, _ in pairs]))[:, None]
        masks = torch.from_numpy(np.stack([m for _, m in pairs]).astype(np.float32))[:, None]
        return augmented.to(tiles.dtype), masks

    def loss(
        self, clean: torch.Tensor, augmented: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total training loss on one synthesised batch, and its parts."""
        total, figures = self._loss(clean, augmented, mask, valid, Runtime.cpu())
        return total, dict(zip(LOSS_PARTS, figures.tolist(), strict=True))

    def _loss(
        self,
        clean: torch.Tensor,
        augmented: torch.Tensor,
        mask: torch.Tensor,
        valid: torch.Tensor,
        runtime: Runtime,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`loss` with the networks under ``runtime``'s autocast; the losses in fp32. The
        parts (:data:`LOSS_PARTS`) come as one detached tensor on the device: one transfer to
        the host for the four figures, not four."""
        normalised = self._normalise(augmented, valid)
        target = torch.where(valid, clean, normalised.centre)
        target = (target - normalised.centre) / normalised.spread
        with runtime.autocast():
            x_hat, logits = self._forward(normalised.x)
        x_hat, logits = x_hat.float(), logits.float()  # no-ops in fp32
        weight = normalised.weight
        l2 = masked_mean((x_hat - target) ** 2, weight)
        ssim = 1.0 - masked_mean(ssim_map(target, x_hat, self.config.ssim_sigma), weight)
        focal = focal_loss(logits, mask, self.config.focal_gamma, weight)
        total = l2 + self.config.ssim_weight * ssim + focal
        return total, torch.stack([total, l2, ssim, focal]).detach()

    def prepare_batch(
        self,
        tiles: torch.Tensor,
        valid: torch.Tensor,
        mix: SynthesisMix,
        rng: np.random.Generator,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, ...]:
        """The host-side data stage of a step: skew and crop (``vary``), then synthesise
        anomalies. -> (tiles, valid, augmented, masks), all on the host."""
        tiles, valid = self.vary(tiles, valid, generator)
        augmented, masks = self.synthesise(tiles, valid, mix, rng)
        return tiles, valid, augmented, masks

    def learn(
        self,
        batch: tuple[torch.Tensor, ...],
        lr: float,
        optimiser: torch.optim.Optimizer,
        runtime: Runtime,
        scaler: torch.amp.GradScaler | None = None,
        timer: StepTimer | None = None,
    ) -> dict[str, float]:
        """The device stage of a step at learning rate ``lr`` on a prepared batch; no step when
        the loss is not finite."""
        timer = timer or StepTimer()
        for group in optimiser.param_groups:
            group["lr"] = lr
        with timer.stage("forward"):
            tiles, valid, augmented, masks = (runtime.put(part) for part in batch)
            loss, figures = self._loss(tiles, augmented, masks, valid, runtime)
            parts = dict(zip(LOSS_PARTS, figures.tolist(), strict=True))
        if math.isfinite(parts["loss"]):
            with timer.stage("backward"):
                optimiser_step(loss, optimiser, scaler)
        return parts

    def _texture_tiles(self, tiles: TileData, rng: np.random.Generator) -> list[np.ndarray]:
        count = len(tiles)
        chosen = rng.permutation(count)[: self.config.texture_tiles]
        return [tiles[int(i)][0][0].numpy() for i in chosen]

    def fit(self, tiles: TileData, context: FitContext) -> dict[str, Any]:
        if len(tiles) == 0:
            raise ValueError("no defect-free tiles to fit DRAEM on")
        if not self.others:
            return self._fit_one(tiles, context)
        members: list[Draem] = [self, *self.others]
        summaries: list[dict[str, Any]] = []
        for index, member in enumerate(members):
            left = context.seconds_left()
            share = None if math.isinf(left) else max(left, 0.0) / (len(members) - index)
            part = replace(
                context,
                deadline=None if share is None else time.monotonic() + share,
                budget_seconds=share,
                seed=context.seed + index,
            )
            log.info("DRAEM member %d of %d: %s", index + 1, len(members),
                     "no time limit" if share is None else f"{share:.0f} s")  # fmt: skip
            self._alone = member is self
            try:
                summaries.append(member._fit_one(tiles, part))
            finally:
                self._alone = False
        return ensemble_summary(summaries)

    def _fit_one(self, tiles: TileData, context: FitContext) -> dict[str, Any]:
        runtime = context.runtime
        runtime.prepare(self)
        generator = torch.Generator(device="cpu").manual_seed(context.seed)  # shuffling, data
        rng = np.random.default_rng(context.seed)
        mix = SynthesisMix(self.config.synthesis, self._texture_tiles(tiles, rng))
        optimiser = torch.optim.Adam(self.parameters(), lr=self.config.lr)
        scaler = runtime.grad_scaler()

        def prepare(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            return self.prepare_batch(batch[0], batch[1], mix, rng, generator)

        def train_batch(
            progress: float, batch: tuple[torch.Tensor, ...]
        ) -> tuple[dict[str, float], dict[str, float]]:
            share = context.schedule_share(progress, self.config.max_epochs)
            lr = scheduled_lr(self.config, share)
            parts = self.learn(batch, lr, optimiser, runtime, scaler, context.timer)
            return parts, {"lr": lr}

        return fit_epochs(
            self,
            tiles,
            context,
            train_batch,
            generator=generator,
            max_epochs=self.config.max_epochs,
            loss_key="loss",
            name="draem",
            validate_every=self.config.validate_every,
            prepare=prepare,
            ema_decay=self.config.ema_decay,
            select_from=self.config.select_from,
        )

    # ---- scoring ----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, tiles: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        normalised = self._normalise(tiles, valid)
        anomaly = self._anomaly(normalised.x)
        if not self._alone:
            for member in self.others:
                anomaly = anomaly + member._anomaly(normalised.x)  # type: ignore[operator]
            anomaly = anomaly / (1 + len(self.others))
        maps = smooth_on_fabric(anomaly, normalised.weight, self.config.smoothing_sigma)
        scores = pooled_max_scores(maps, normalised.weight, self.config.score_pool)
        return ModelOutput(anomaly_map=maps[:, 0], score=scores)

    def _anomaly(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tiles -> this network's anomaly probability [B,1,H,W], fp32 under any
        autocast."""
        _, logits = self._forward(x)
        return logits.float().softmax(dim=1)[:, 1:2]


def ensemble_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One fit summary for an ensemble: the first member's figures, with the epochs summed and
    each member's epochs, best epoch and criterion under ``member{N}_*``."""
    summary = dict(summaries[0])
    summary["members"] = float(len(summaries))
    summary["epochs"] = float(sum(s.get("epochs", 0.0) for s in summaries))
    summary["fit_seconds"] = float(sum(s.get("fit_seconds", 0.0) for s in summaries))
    for number, member in enumerate(summaries, start=1):
        for key in ("epochs", "best_epoch", "best_criterion", "fit_seconds"):
            if key in member:
                summary[f"member{number}_{key}"] = float(member[key])
    return summary


def scheduled_lr(config: DraemConfig, progress: float) -> float:
    """The learning rate at ``progress`` (0..1) of the schedule: ``lr`` times ``lr_gamma`` for
    each fraction in ``lr_steps`` already passed."""
    return config.lr * config.lr_gamma ** sum(progress >= step for step in config.lr_steps)


def pooled_max_scores(maps: torch.Tensor, weight: torch.Tensor, pool: int) -> torch.Tensor:
    """[B,1,H,W] maps -> [B]: the maximum over fabric of the map averaged over the fabric pixels
    of each pool x pool window (the paper's score); 0 for a tile without fabric.
    """
    height, width = maps.shape[-2:]
    stacked = torch.cat([maps * weight, weight], dim=1)
    pooled = F.avg_pool2d(stacked, pool, stride=1, padding=pool // 2, count_include_pad=True)
    summed, coverage = pooled[..., :height, :width].split(1, dim=1)
    averaged = (summed / coverage.clamp_min(1e-6)).masked_fill(weight == 0, -math.inf)
    scores = averaged.flatten(1).max(dim=1).values
    return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
