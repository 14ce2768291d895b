"""Tiles for int8 calibration of an exported network, cut as the pipeline cuts them.

Defect-free tiles alone calibrate the activation ranges of defect-free fabric, and a static int8
network clips whatever lies outside them: the strong responses a defect causes, the very signal
the maps are for. On AITEX fabric 02 a PatchCore export calibrated on clean tiles alone lost its
masks (pixel AP 0.204 -> 0.003, the same with 16-bit activations and weights: clipping, not
rounding); with half the tiles given a synthetic defect (the same synthesis DRAEM trains on) it
kept them (0.191). See docs/export.md "int8".
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from models.manifest import Manifest
from models.preprocessing import valid_area
from models.synthesis import SynthesisConfig, SynthesisMix
from models.tiling import pad_to_tile, plan_tiles, valid_fraction
from training.data import DatasetError, load_dataset, load_image


class CalibrationTiles(NamedTuple):
    tiles: np.ndarray  # [N, T, T] uint8
    valid: np.ndarray  # [N, T, T] bool
    images: int  # defect-free images the tiles come from
    synthetic: int  # tiles given a synthetic defect


def calibration_tiles(
    data: Path,
    manifest: Manifest,
    *,
    fabric: str | None = None,
    limit: int = 256,
    anomaly_share: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationTiles:
    """Up to ``limit`` tiles of the defect-free images of ``data`` (the model's fabric unless
    ``fabric`` is given), ``anomaly_share`` of them with a synthetic defect on their fabric.
    Tiles are those the pipeline would score (on fabric), drawn evenly at random over the
    images."""
    if not 0.0 <= anomaly_share <= 1.0:
        raise ValueError(f"anomaly_share must lie in [0, 1], got {anomaly_share}")
    chosen = fabric if fabric is not None else manifest.training.get("fabric")
    dataset = load_dataset(data, fabric=chosen)
    normal = list(dataset.normal)
    if not normal:
        raise DatasetError(f"{data}: no defect-free images to calibrate int8 on")
    pipeline = manifest.pipeline
    size = pipeline.tile_size
    tiles: list[np.ndarray] = []
    valids: list[np.ndarray] = []
    for sample in tqdm(normal, desc="calibration tiles", unit="image", disable=not progress):
        image = load_image(sample)
        valid = valid_area(image, pipeline.valid_area)
        padded, padded_valid = pad_to_tile(image, valid, size)
        height, width = padded.shape
        for box in plan_tiles(height, width, size, pipeline.stride, padded_valid):
            if valid_fraction(padded_valid, box) > 0:
                tiles.append(padded[box.y0 : box.y1, box.x0 : box.x1])
                valids.append(padded_valid[box.y0 : box.y1, box.x0 : box.x1])
    if not tiles:
        raise DatasetError(f"{data}: its defect-free images have no tile on fabric")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tiles))[:limit]
    chosen_tiles = np.stack([tiles[i] for i in order])
    chosen_valid = np.stack([valids[i] for i in order])
    synthetic = with_synthetic_defects(chosen_tiles, chosen_valid, anomaly_share, rng)
    return CalibrationTiles(chosen_tiles, chosen_valid, len(normal), synthetic)


def with_synthetic_defects(
    tiles: np.ndarray, valid: np.ndarray, share: float, rng: np.random.Generator
) -> int:
    """Give the first ``share`` of ``tiles`` a synthetic defect on fabric, in place; -> how many
    were changed (a tile too small on fabric can come out unchanged)."""
    count = round(share * len(tiles))
    if count == 0:
        return 0
    floats = tiles.astype(np.float32) / 255.0
    textures = floats[count:] if count < len(floats) else floats
    mix = SynthesisMix(SynthesisConfig(anomaly_free_share=0.0), list(textures))
    changed = 0
    for index in range(count):
        augmented, mask = mix(floats[index], valid[index], rng)
        if mask.any():
            tiles[index] = np.clip(np.rint(augmented * 255.0), 0, 255).astype(np.uint8)
            changed += 1
    return changed
