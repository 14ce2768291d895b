"""Training tiles cut on access from whole images (a PyTorch dataset)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.base import TileData
from models.tiling import Box, pad_to_tile, plan_tiles, valid_fraction


class TileDataset(TileData):
    """Tiles of several grey images as (image [1,T,T] float in [0,1], valid [1,T,T] bool).

    Holds the uint8 images once and cuts tiles on access, so memory stays that of the images.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        valids: Sequence[np.ndarray],
        tile: int,
        stride: int,
        min_valid_fraction: float = 1.0,
    ) -> None:
        self.tile = tile
        self.images: list[np.ndarray] = []
        self.valids: list[np.ndarray] = []
        self.index: list[tuple[int, Box]] = []
        for image, valid in zip(images, valids, strict=True):
            image, valid = pad_to_tile(image, valid, tile)
            number = len(self.images)
            self.images.append(image)
            self.valids.append(valid)
            for box in plan_tiles(image.shape[0], image.shape[1], tile, stride, valid):
                if valid_fraction(valid, box) >= min_valid_fraction:
                    self.index.append((number, box))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        number, box = self.index[item]
        pixels = self.images[number][box.y0 : box.y1, box.x0 : box.x1]
        valid = self.valids[number][box.y0 : box.y1, box.x0 : box.x1]
        image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
        return image, torch.from_numpy(np.ascontiguousarray(valid))[None]
