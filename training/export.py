"""Defect-free tiles for int8 calibration of an exported network, cut as the pipeline cuts them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.manifest import Manifest
from models.preprocessing import valid_area
from models.tiling import pad_to_tile, plan_tiles, valid_fraction
from training.data import DatasetError, load_dataset, load_image


def calibration_tiles(
    data: Path,
    manifest: Manifest,
    *,
    fabric: str | None = None,
    limit: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Up to ``limit`` tiles of the defect-free images of ``data`` (the model's fabric unless
    ``fabric`` is given): (tiles [N,T,T] uint8, valid [N,T,T] bool, images used). Tiles are
    those the pipeline would score (on fabric), drawn evenly at random over the images."""
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
    order = np.random.default_rng(seed).permutation(len(tiles))[:limit]
    return np.stack([tiles[i] for i in order]), np.stack([valids[i] for i in order]), len(normal)
