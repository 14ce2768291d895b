"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Read top to bottom: the backbone, the patch features, the memory bank and its coreset, scoring.

- Backbone: wide_resnet50_2 (or resnet18), truncated after the deepest layer used; features of
  layers 2 and 3. Pretrained ImageNet weights come through torchvision (its cache, or a download)
  or from a local file named in the config; ``pretrained: false`` uses a random backbone and logs
  a warning. With a random backbone, batch-norm statistics are re-estimated on the training tiles
  (``adapt_batchnorm``), which keeps random features well conditioned.
- Patch features: each layer is averaged over a 3x3 neighbourhood, the deeper layer is upsampled
  to the resolution of the first, each is pooled over channels to ``layer_dim``, and the
  concatenation is pooled to ``embed_dim``.
- Memory bank: patch features of defect-free tiles (only patches on fabric), reduced by greedy
  k-center coreset selection on a random projection. Selection keeps one N-vector of distances:
  no N x N matrix is ever built. Patches beyond ``max_train_patches`` are subsampled first.
- Scoring: distance of each patch to its nearest bank entry, computed in chunks; the image score
  is the largest patch distance reweighted as in the paper (eq. 7) by how isolated its nearest
  bank entry is; the map is the patch distances upsampled and smoothed (Gaussian, sigma 4).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.augment import AugmentConfig, random_affine
from models.base import AnomalyModel, EpochLog, FitContext, ModelConfig, ModelOutput, TileData
from models.filters import gaussian_filter

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_ORDER = ("layer1", "layer2", "layer3", "layer4")
AUTOCAST = ("cpu", "cuda", "mps", "xpu")  # device types torch.autocast knows


class PatchCoreConfig(ModelConfig):
    backbone: Literal["wide_resnet50_2", "resnet18"] = "wide_resnet50_2"
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrained: bool = True
    # "imagenet": the fixed ImageNet statistics; "tile": each tile standardised by its own mean
    # and spread over fabric pixels (robust to illumination drift between and along strips).
    input_norm: Literal["imagenet", "tile"] = "imagenet"
    weights_file: str | None = None  # a local torchvision state dict (tensors only)
    adapt_batchnorm: bool | None = None  # None: only when the backbone is random
    batchnorm_tiles: int = 256  # tiles used to re-estimate batch-norm statistics
    layer_dim: int = 1024
    embed_dim: int = 384
    coreset_ratio: float = 0.01
    coreset_projection_dim: int = 128
    max_train_patches: int = 1_000_000
    num_neighbors: int = 9
    smoothing_sigma: float = 4.0
    chunk_size: int = 8192
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class WeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


def backbones() -> ModuleType:
    """torchvision's model zoo, imported only when a PatchCore is built: DRAEM and the VAE
    (and everything else in models/) run with torch alone."""
    import torchvision.models

    return torchvision.models


def build_backbone(config: PatchCoreConfig) -> nn.Module:
    constructor = getattr(backbones(), config.backbone)
    network: nn.Module = constructor(weights=None)
    if config.weights_file:
        path = Path(config.weights_file)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # the message names the file and the reason
            raise WeightsError(f"cannot load backbone weights from {path}: {exc}") from exc
        network.load_state_dict(state)
    elif config.pretrained:
        enum = backbones().get_model_weights(config.backbone)
        try:
            network = constructor(weights=enum.DEFAULT)
        except Exception as exc:
            raise WeightsError(
                f"pretrained {config.backbone} weights are not in the torchvision cache and "
                f"could not be downloaded ({type(exc).__name__}); set model.weights_file=FILE or "
                "model.pretrained=false"
            ) from exc
    else:
        log.warning(
            "PatchCore uses a RANDOM %s backbone (pretrained: false); expect lower accuracy "
            "than with ImageNet weights",
            config.backbone,
        )
    return network


class FeatureExtractor(nn.Module):
    """Runs the backbone up to the deepest requested layer and returns those layers' maps."""

    def __init__(self, network: nn.Module, layers: tuple[str, ...], input_norm: str) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in LAYER_ORDER]
        if unknown or not layers:
            raise ValueError(f"layers must be among {LAYER_ORDER}, got {layers}")
        deepest = max(LAYER_ORDER.index(name) for name in layers)
        self.layers = layers
        self.input_norm = input_norm
        parts = [getattr(network, name) for name in ("conv1", "bn1", "relu", "maxpool")]
        self.stem = nn.Sequential(*parts)
        self.body = nn.ModuleDict({n: getattr(network, n) for n in LAYER_ORDER[: deepest + 1]})
        # The width of each returned map: the last batch norm of a ResNet layer has it.
        self.channels = tuple(
            [m for m in self.body[n].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
            for n in self.body
            if n in layers
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.mean: torch.Tensor
        self.std: torch.Tensor

    def forward(self, grey: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        if self.input_norm == "tile":
            x = standardise_tiles(grey, valid).expand(-1, 3, -1, -1)
        else:
            x = (grey.expand(-1, 3, -1, -1) - self.mean) / self.std
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        outputs = []
        for name, block in self.body.items():
            x = block(x)
            if name in self.layers:
                outputs.append(x)
        return outputs


def standardise_tiles(grey: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero mean, unit spread per tile, statistics over fabric pixels only."""
    weight = torch.ones_like(grey) if valid is None else valid.float()
    count = weight.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    mean = (grey * weight).sum(dim=(1, 2, 3), keepdim=True) / count
    spread = (((grey - mean) ** 2) * weight).sum(dim=(1, 2, 3), keepdim=True) / count
    return (grey - mean) / (spread.sqrt() + 1e-3)


def pooling_matrix(in_dim: int, out_dim: int) -> torch.Tensor:
    """[in_dim, out_dim] matrix equal to adaptive average pooling over the last dimension."""
    matrix = torch.zeros(in_dim, out_dim)
    for j in range(out_dim):
        start, stop = (j * in_dim) // out_dim, -((-(j + 1) * in_dim) // out_dim)
        matrix[start:stop, j] = 1.0 / (stop - start)
    return matrix


def projection_matrices(
    channels: tuple[int, ...], layer_dim: int, embed_dim: int
) -> tuple[torch.Tensor, ...]:
    """Per layer, the linear map of "pool channels to layer_dim, concatenate, pool to embed_dim".

    Both poolings are linear, so they fold into one [channels, embed_dim] matrix per layer and
    the embedding costs one matrix product per layer instead of two poolings over every patch.
    """
    final = pooling_matrix(layer_dim * len(channels), embed_dim)
    blocks = final.split(layer_dim)
    pairs = zip(channels, blocks, strict=True)
    return tuple(pooling_matrix(c, layer_dim) @ block for c, block in pairs)


def patch_embedding(maps: list[torch.Tensor], matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Layer maps -> [B, embed_dim, h, w] locally aware patch features, with the layers'
    ``projection_matrices``."""
    height, width = maps[0].shape[-2:]
    embedded: torch.Tensor | None = None
    for feature, matrix in zip(maps, matrices, strict=True):
        feature = F.avg_pool2d(feature, kernel_size=3, stride=1, padding=1)
        if feature.shape[-2:] != (height, width):
            feature = F.interpolate(
                feature, size=(height, width), mode="bilinear", align_corners=False
            )
        part = torch.einsum("bchw,ce->behw", feature, matrix.to(feature.dtype))
        embedded = part if embedded is None else embedded + part
    assert embedded is not None
    return embedded.contiguous()


class PatchEmbedding(nn.Module):
    """:func:`patch_embedding` with its matrices built once, as buffers outside the state dict
    (they follow from the config). Built on first use instead, under the tracing of an export,
    they would be made of the tracer's fake tensors, and a cache would keep those."""

    def __init__(self, channels: tuple[int, ...], layer_dim: int, embed_dim: int) -> None:
        super().__init__()
        for index, matrix in enumerate(projection_matrices(channels, layer_dim, embed_dim)):
            self.register_buffer(f"layer{index}", matrix, persistent=False)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return patch_embedding(maps, list(self.buffers()))


def greedy_coreset(
    features: torch.Tensor,
    size: int,
    projection_dim: int,
    seed: int,
    deadline: float | None,
    progress: bool = False,
) -> torch.Tensor:
    """Indices of a k-center coreset (greedy), chosen on a random projection of the features.

    Keeps only the N-vector of distances to the chosen set. Stops early at `deadline`, returning
    the (smaller) coreset chosen so far.
    """
    total = features.shape[0]
    device = features.device
    if size >= total:
        return torch.arange(total, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    if projection_dim and projection_dim < features.shape[1]:
        projection = torch.randn(
            features.shape[1], projection_dim, generator=generator, device=device
        )
        projection /= math.sqrt(projection_dim)
        reduced = torch.cat([chunk.float() @ projection for chunk in features.split(65536)])
    else:
        reduced = features.float()
    norms = reduced.pow(2).sum(1)
    chosen = [int(torch.randint(total, (1,), generator=generator, device=device))]

    def squared_distances(index: int) -> torch.Tensor:
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product, no N x d temporary.
        return norms - 2.0 * torch.mv(reduced, reduced[index]) + norms[index]

    nearest = squared_distances(chosen[0])
    for _ in tqdm(range(size - 1), desc="coreset", disable=not progress, mininterval=1.0):
        if deadline is not None and time.monotonic() > deadline:
            log.warning("coreset selection stopped at the deadline with %d entries", len(chosen))
            break
        index = int(torch.argmax(nearest))
        chosen.append(index)
        torch.minimum(nearest, squared_distances(index), out=nearest)
    return torch.tensor(chosen, device=device)


def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query row to its nearest bank row, and that row's index."""
    query_norms = queries.pow(2).sum(1, keepdim=True)
    best = torch.full((queries.shape[0],), float("inf"), device=queries.device)
    best_index = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start : start + chunk_size]
        squared = query_norms - 2.0 * queries @ chunk.T + chunk.pow(2).sum(1)[None]
        values, indices = squared.min(dim=1)
        better = values < best
        best = torch.where(better, values, best)
        best_index = torch.where(better, indices + start, best_index)
    return best.clamp_min(0).sqrt(), best_index


class PatchCore(AnomalyModel):
    model_type = "patchcore"
    config_class = PatchCoreConfig
    config: PatchCoreConfig

    def __init__(self, config: PatchCoreConfig, load_weights: bool = True) -> None:
        super().__init__(config, load_weights)
        if load_weights:
            network = build_backbone(config)
        else:  # weights come from a bundle right after
            network = getattr(backbones(), config.backbone)(weights=None)
        self.extractor = FeatureExtractor(network, config.layers, config.input_norm).eval()
        self.extractor.to(memory_format=torch.channels_last)
        self.embedding = PatchEmbedding(self.extractor.channels, config.layer_dim, config.embed_dim)
        self.register_buffer("memory_bank", torch.zeros(0, config.embed_dim))
        self.memory_bank: torch.Tensor

    # ---- features -------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, tiles: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        embedded: torch.Tensor = self.embedding(self.extractor(tiles, valid))
        return embedded

    @staticmethod
    def patch_validity(valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B,1,H,W] bool -> [B,h,w] bool: a patch counts when its whole cell is fabric."""
        share = F.adaptive_avg_pool2d(valid.float(), size)
        return (share >= 0.999).squeeze(1)

    # ---- fitting --------------------------------------------------------------------------
    @torch.no_grad()
    def _adapt_batchnorm(self, loader: DataLoader[Any], context: FitContext) -> None:
        for module in self.extractor.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over all batches
        self.extractor.train()
        seen = 0
        runtime = context.runtime
        for tiles, valid in tqdm(loader, desc="batch-norm", disable=not context.progress):
            self.extractor(runtime.put(tiles), runtime.put(valid))
            seen += tiles.shape[0]
            if seen >= self.config.batchnorm_tiles or context.budget_left() < 0.8:
                break
        self.extractor.eval()

    def fit(self, tiles: TileData, context: FitContext) -> dict[str, Any]:
        started = time.monotonic()
        if len(tiles) == 0:
            raise ValueError("no defect-free tiles to fit PatchCore on")
        count = len(tiles)
        runtime = context.runtime
        runtime.prepare(self)
        loader: DataLoader[Any] = DataLoader(tiles, batch_size=context.batch_size, shuffle=False)
        adapt = self.config.adapt_batchnorm
        if adapt or (adapt is None and not self.config.pretrained and not self.config.weights_file):
            self._adapt_batchnorm(loader, context)
        generator = runtime.generator(context.seed)  # on the device: augmentation, subsampling
        collected: list[torch.Tensor] = []
        seen_tiles = 0
        copies = self.config.augment.copies
        per_tile_cap = max(1, self.config.max_train_patches // (count * (1 + copies)))
        for batch, valid in tqdm(loader, desc="features", disable=not context.progress):
            batch, valid = runtime.put(batch), runtime.put(valid)
            variants = [(batch, valid)]
            for _ in range(copies):
                variants.append(random_affine(batch, valid, self.config.augment, generator))
            for tiles_in, valid_in in variants:
                with runtime.autocast():
                    features = self.embed(tiles_in, valid_in).float()
                keep = self.patch_validity(valid_in, (features.shape[-2], features.shape[-1]))
                for feature, mask in zip(features, keep, strict=True):
                    rows = feature.permute(1, 2, 0)[mask]
                    if rows.shape[0] > per_tile_cap:
                        pick = torch.randperm(
                            rows.shape[0], generator=generator, device=generator.device
                        )[:per_tile_cap]
                        rows = rows[pick]
                    collected.append(rows.clone())
            seen_tiles += batch.shape[0]
            if context.budget_left() < 0.3:
                log.warning("feature extraction stopped at the time budget (%d tiles)", seen_tiles)
                break
        features_all = torch.cat(collected)
        if features_all.shape[0] == 0:
            raise ValueError("no training patch lies fully on fabric; check the valid area")
        extracted = time.monotonic()
        size = max(1, round(features_all.shape[0] * self.config.coreset_ratio))
        indices = greedy_coreset(
            features_all,
            size,
            self.config.coreset_projection_dim,
            context.seed,
            context.deadline,
            context.progress,
        )
        self.memory_bank = features_all[indices].contiguous()
        summary = {
            "train_tiles": float(seen_tiles),
            "train_patches": float(features_all.shape[0]),
            "memory_bank_size": float(self.memory_bank.shape[0]),
            "feature_seconds": extracted - started,
            "coreset_seconds": time.monotonic() - extracted,
        }
        context.report(EpochLog(epoch=0, metrics=summary, seconds=time.monotonic() - started))
        return summary

    # ---- scoring --------------------------------------------------------------------------
    def _reweight(
        self, top: torch.Tensor, top_score: torch.Tensor, nearest: torch.Tensor
    ) -> torch.Tensor:
        """Paper eq. 7, per tile: scale the top patch score [B] by how isolated its nearest bank
        entry is. ``top`` [B, dim] is the top patch's feature, ``nearest`` [B] its bank entry."""
        neighbours = min(self.config.num_neighbors, self.memory_bank.shape[0])
        if neighbours <= 1:
            return top_score
        anchor = self.memory_bank[nearest]
        # cdist's matrix-product form is the one that exports to ONNX (its direct form has no
        # ONNX function); it is also what cdist picks by itself for any bank of over 25 rows.
        to_anchor = torch.cdist(anchor, self.memory_bank, compute_mode="use_mm_for_euclid_dist")
        support = self.memory_bank[to_anchor.topk(neighbours, dim=1, largest=False).indices]
        to_support = torch.linalg.vector_norm(support - top[:, None], dim=-1)
        # 1 - exp(d*) / sum exp(d_i), written relative to d* (the smallest) to avoid overflow.
        weight = 1.0 - 1.0 / torch.exp(to_support - top_score[:, None]).sum(dim=1)
        return weight * top_score

    @torch.inference_mode()
    def predict(self, tiles: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit it or load a bundle")
        features = self.embed(tiles, valid).float()  # the bank search in fp32 under autocast
        dim = features.shape[1]
        flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
        kind = flat.device.type  # distances in fp32 whatever autocast is on outside
        plain = torch.autocast(kind, enabled=False) if kind in AUTOCAST else nullcontext()
        with plain:
            return self._score(tiles, valid, features, flat)

    def _score(
        self, tiles: torch.Tensor, valid: torch.Tensor, features: torch.Tensor, flat: torch.Tensor
    ) -> ModelOutput:
        """Nearest bank entries of the patch features -> maps and reweighted tile scores."""
        batch, dim, height, width = features.shape
        distances, nearest = nearest_distances(flat, self.memory_bank, self.config.chunk_size)
        patch_scores = distances.reshape(batch, height, width)
        # The image score comes from each tile's highest patch on fabric (-1 marks none).
        patch_valid = self.patch_validity(valid, (height, width)).reshape(batch, -1)
        candidates = patch_scores.reshape(batch, -1).masked_fill(~patch_valid, -1.0)
        position = candidates.argmax(dim=1, keepdim=True)
        top_score = candidates.gather(1, position)[:, 0]
        top = features.reshape(batch, dim, -1).gather(2, position[:, None].expand(-1, dim, 1))
        top_nearest = nearest.reshape(batch, -1).gather(1, position)[:, 0]
        scores = self._reweight(top[..., 0], top_score, top_nearest)
        scores = torch.where(top_score >= 0, scores, torch.zeros_like(scores))
        maps = F.interpolate(
            patch_scores[:, None], size=tiles.shape[-2:], mode="bilinear", align_corners=False
        )
        if self.config.smoothing_sigma > 0:
            maps = gaussian_filter(maps, self.config.smoothing_sigma)
        maps = maps[:, 0]
        return ModelOutput(anomaly_map=maps, score=scores)

    def prepare_state(self, state: dict[str, torch.Tensor]) -> None:
        bank = state.get("memory_bank")
        if bank is not None:
            self.memory_bank = torch.zeros_like(bank)
