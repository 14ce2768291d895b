"""Tiling of wide images into model-size tiles and stitching anomaly maps back.

Tiles are laid over the span of the image that holds fabric (the valid area), so that a strip
with white padding at one end is covered by tiles that touch the padding as little as possible.
The last tile in each direction is aligned to the edge of that span; where tiles overlap,
stitched maps are averaged. Images smaller than a tile are reflected up to tile size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Box:
    """A tile in image pixels: rows y0..y1, columns x0..x1 (end exclusive)."""

    y0: int
    x0: int
    y1: int
    x1: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.y0, self.x0, self.y1, self.x1)


def axis_starts(start: int, stop: int, tile: int, stride: int, length: int) -> list[int]:
    """Tile starts covering [start, stop) with the last tile aligned to `stop`.

    When the span is shorter than a tile, one tile centred on it (clamped to the image).
    """
    if tile <= 0 or stride <= 0:
        raise ValueError("tile size and stride must be positive")
    span = stop - start
    if span <= tile:
        centred = start + span // 2 - tile // 2
        return [int(min(max(centred, 0), max(length - tile, 0)))]
    starts = list(range(start, stop - tile + 1, stride))
    if starts[-1] != stop - tile:
        starts.append(stop - tile)
    return starts


def _valid_span(flags: Any) -> tuple[int, int]:
    indices = np.flatnonzero(flags)
    if indices.size == 0:
        return 0, flags.size
    return int(indices[0]), int(indices[-1]) + 1


def plan_tiles(
    height: int, width: int, tile: int, stride: int, valid: np.ndarray | None = None
) -> list[Box]:
    """Boxes of size tile x tile covering the valid part of an image (the whole image if None).

    The image must be at least tile x tile (see :func:`pad_to_tile`).
    """
    if height < tile or width < tile:
        raise ValueError(f"image {height}x{width} is smaller than the tile {tile}; pad it first")
    if valid is None:
        rows, cols = (0, height), (0, width)
    else:
        rows, cols = _valid_span(valid.any(axis=1)), _valid_span(valid.any(axis=0))
    ys = axis_starts(rows[0], rows[1], tile, stride, height)
    xs = axis_starts(cols[0], cols[1], tile, stride, width)
    return [Box(y, x, y + tile, x + tile) for y in ys for x in xs]


def pad_to_tile(image: np.ndarray, valid: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflect-pad an image smaller than a tile; padded pixels are marked invalid."""
    pad_y = max(tile - image.shape[0], 0)
    pad_x = max(tile - image.shape[1], 0)
    if pad_y == 0 and pad_x == 0:
        return image, valid
    mode = "reflect" if min(image.shape) > 1 else "edge"
    padded = np.pad(image, ((0, pad_y), (0, pad_x)), mode=mode)  # type: ignore[call-overload]
    padded_valid = np.pad(valid, ((0, pad_y), (0, pad_x)), constant_values=False)
    return padded, padded_valid


def stitch(maps: Sequence[np.ndarray], boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """Average tile maps into one H x W map; pixels no tile covered are 0."""
    total = np.zeros((height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.float32)
    for tile_map, box in zip(maps, boxes, strict=True):
        total[box.y0 : box.y1, box.x0 : box.x1] += tile_map
        count[box.y0 : box.y1, box.x0 : box.x1] += 1.0
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def valid_fraction(valid: np.ndarray, box: Box) -> float:
    return float(valid[box.y0 : box.y1, box.x0 : box.x1].mean())
