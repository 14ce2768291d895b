"""Anomaly synthesis for DRAEM: defect-free tiles in; tiles with a simulated defect and a mask out.

DRAEM (Zavrtanik et al., ICCV 2021) learns a decision boundary from synthetic anomalies, so how
they look is a modelling choice. Each way of making them is a strategy: a small subclass of
:class:`AnomalySynthesis` with a registry ``name`` and a ``__call__(tile, rng) -> (augmented,
mask)`` on float32 H x W tiles in [0, 1]. :class:`SynthesisMix` draws one strategy per sample with
the weights of the config, leaves a share of the samples anomaly-free and keeps every change
inside the mask and the fabric.

Strategies here:

- ``perlin``: the paper's. A Perlin-noise field at a random scale (2**k cells per side, k
  uniform in [perlin_min_scale, perlin_max_scale]), rotated by a random angle and thresholded,
  gives the mask; it is filled with a texture blended in with a random opacity. Textures come
  from ``texture_dir`` (a folder of images, e.g. DTD, if the user has one) when given; otherwise
  from the training tiles themselves (another tile, flipped, rotated, shifted and colour-shifted)
  or procedural noise, half each. Nothing is ever downloaded.
- ``textile``: defects shaped like those of woven fabric: a thin line along the warp or weft
  (broken or missing yarn), a small dense blob (knot, fuzzy ball), or a band where the weave is
  stretched and shaded (stretch, crease).
- ``spot``: a fuzzy ball at the size and contrast of AITEX fabric 02's (10-60 px, 0.12-0.20 of
  the grey range, soft-edged); not in the default mix.
- ``weave``: faults of the weave's structure rather than its grey, which is what most defects of
  the harder AITEX fabrics are (``python -m bench.fabric_stats``: on fabrics 00, 01 and 03 most
  defect regions differ from their surroundings by less than one standard deviation of the
  fabric's grey): a missing or doubled pick or end (a band of a few rows or columns replaced by
  the weave a few pixels further on, so its pattern breaks), a faint line (a yarn only
  slightly lighter or darker, 2-12 % of the grey range), and a local distortion (the yarns of a
  small patch pushed aside, as by a warp ball or a knot under the surface).

Adding a strategy: subclass :class:`AnomalySynthesis`, set ``name``, implement ``__call__``
(the class registers itself), and give it a weight in the config::

    synthesis:
      strategies: {perlin: 0.4, textile: 0.4, mine: 0.2}
      anomaly_free_share: 0.5
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class SynthesisConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategies: dict[str, float] = Field(
        default_factory=lambda: {"perlin": 0.5, "textile": 0.5},
        description="strategy name -> relative weight",
    )
    anomaly_free_share: float = Field(default=0.5, ge=0.0, le=1.0)
    texture_dir: str | None = Field(default=None, description="folder of texture images")
    perlin_min_scale: int = Field(default=0, ge=0, le=8)
    perlin_max_scale: int = Field(default=6, ge=0, le=8)
    perlin_threshold: float = Field(default=0.5, gt=-1.0, lt=1.0)
    min_opacity: float = Field(default=0.15, ge=0.0, le=1.0)
    max_opacity: float = Field(default=1.0, ge=0.0, le=1.0)

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(STRATEGIES))
        if unknown:
            raise ValueError(f"unknown synthesis strategies {unknown}; known: {sorted(STRATEGIES)}")
        if any(weight < 0 for weight in value.values()) or sum(value.values()) <= 0:
            raise ValueError("strategy weights must be >= 0 with a positive sum")
        return value


# ---- textures ---------------------------------------------------------------------------------
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D Perlin gradient noise, about [-1, 1], with ``cells`` (rows, columns) lattice cells."""
    height, width = shape
    ys = np.arange(height, dtype=np.float64) * cells[0] / height
    xs = np.arange(width, dtype=np.float64) * cells[1] / width
    yi, xi = ys.astype(int), xs.astype(int)
    yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]
    angles = rng.uniform(0.0, 2.0 * math.pi, (cells[0] + 1, cells[1] + 1))
    gy, gx = np.sin(angles), np.cos(angles)

    def corner(dy: int, dx: int) -> np.ndarray:
        rows, cols = (yi + dy)[:, None], (xi + dx)[None, :]
        return np.asarray(gy[rows, cols] * (yf - dy) + gx[rows, cols] * (xf - dx))

    u, v = _fade(xf), _fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return np.asarray(math.sqrt(2.0) * (top * (1 - v) + bottom * v), dtype=np.float32)


def _rotate(field: np.ndarray, degrees: float) -> np.ndarray:
    height, width = field.shape
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), degrees, 1.0)
    rotated = cv2.warpAffine(field, matrix, (width, height), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)  # fmt: skip
    return np.asarray(rotated, dtype=np.float32)


def _colour_shift(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast, brightness and (sometimes) inversion of a [0, 1] texture."""
    mean = float(texture.mean())
    shifted = (texture - mean) * rng.uniform(0.5, 2.0) + mean + rng.uniform(-0.25, 0.25)
    if rng.random() < 0.2:
        shifted = 1.0 - shifted
    return np.asarray(np.clip(shifted, 0.0, 1.0), dtype=np.float32)


class TextureBank:
    """Fill textures for the ``perlin`` strategy: a folder's images, else tiles and noise."""

    def __init__(self, tiles: Sequence[np.ndarray] = (), folder: str | None = None) -> None:
        self.tiles = list(tiles)
        self.files: list[Path] = []
        self._cache: dict[Path, np.ndarray] = {}
        if folder is not None:
            root = Path(folder)
            if not root.is_dir():
                raise FileNotFoundError(f"texture folder {root} does not exist")
            self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise FileNotFoundError(f"no images in texture folder {root}")

    def sample(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        if self.files:
            texture = self._from_file(shape, rng)
        elif self.tiles and rng.random() < 0.5:
            texture = self._from_tile(shape, rng)
        else:
            texture = self._procedural(shape, rng)
        return _colour_shift(texture, rng)

    def _from_file(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        path = self.files[int(rng.integers(len(self.files)))]
        if path not in self._cache:
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError(f"cannot read texture image {path}")
            self._cache[path] = image.astype(np.float32) / 255.0
        return self._fit(self._cache[path], shape, rng)

    def _from_tile(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        tile = self.tiles[int(rng.integers(len(self.tiles)))]
        if tile.shape[0] == tile.shape[1]:
            tile = np.rot90(tile, int(rng.integers(4)))
        if rng.random() < 0.5:
            tile = tile[:, ::-1]
        tile = np.roll(tile, (int(rng.integers(tile.shape[0])), int(rng.integers(tile.shape[1]))),
                       axis=(0, 1))  # fmt: skip
        return self._fit(np.ascontiguousarray(tile, dtype=np.float32), shape, rng)

    @staticmethod
    def _procedural(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        noise = np.zeros(shape, np.float32)
        for octave in range(int(rng.integers(1, 5)), 7):  # a few octaves, coarse to fine
            noise += perlin_noise(shape, (2**octave, 2**octave), rng) / 2 ** (octave / 2)
        return np.asarray((noise - noise.min()) / max(float(np.ptp(noise)), 1e-6), np.float32)

    @staticmethod
    def _fit(image: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A random crop of ``shape`` (resized up first where the image is smaller)."""
        height, width = shape
        if image.shape[0] < height or image.shape[1] < width:
            factor = max(height / image.shape[0], width / image.shape[1])
            size = (math.ceil(image.shape[1] * factor), math.ceil(image.shape[0] * factor))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        top = int(rng.integers(image.shape[0] - height + 1))
        left = int(rng.integers(image.shape[1] - width + 1))
        return np.asarray(image[top : top + height, left : left + width], dtype=np.float32)


# ---- strategies -------------------------------------------------------------------------------
STRATEGIES: dict[str, type[AnomalySynthesis]] = {}


class AnomalySynthesis(ABC):
    """One way of making a synthetic defect; subclasses register themselves by ``name``."""

    name: ClassVar[str]

    def __init__(self, config: SynthesisConfig, textures: TextureBank) -> None:
        self.config = config
        self.textures = textures

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            STRATEGIES[cls.name] = cls

    @abstractmethod
    def __call__(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """float32 H x W tile in [0, 1] -> (augmented tile in [0, 1], bool mask of the defect)."""


class PerlinSynthesis(AnomalySynthesis):
    """Thresholded, rotated Perlin noise filled with a texture at a random opacity (the paper)."""

    name = "perlin"

    def __call__(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        config = self.config
        low, high = config.perlin_min_scale, max(config.perlin_min_scale, config.perlin_max_scale)
        cells = (2 ** int(rng.integers(low, high + 1)), 2 ** int(rng.integers(low, high + 1)))
        field = _rotate(perlin_noise(tile.shape, cells, rng), float(rng.uniform(-90.0, 90.0)))
        mask = field > config.perlin_threshold
        texture = self.textures.sample(tile.shape, rng)
        opacity = float(
            rng.uniform(config.min_opacity, max(config.min_opacity, config.max_opacity))
        )
        blended = (1.0 - opacity) * tile + opacity * texture
        return np.where(mask, blended, tile).astype(np.float32), mask


class TextileSynthesis(AnomalySynthesis):
    """Broken yarn (thin warp/weft line), knot or fuzzy ball (dense blob), stretch or crease."""

    name = "textile"

    def __call__(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        kind = ("line", "blob", "band")[int(rng.integers(3))]
        if kind == "line":
            return self._line(tile, rng)
        if kind == "blob":
            return self._blob(tile, rng)
        return self._band(tile, rng)

    @staticmethod
    def _target(tile: np.ndarray, rng: np.random.Generator, contrast: float) -> float:
        """A grey level clearly darker or lighter than the fabric, inside [0.02, 0.98]."""
        mean = float(tile.mean())
        darker = rng.random() < 0.6 if mean - contrast > 0.02 else False
        if darker or mean + contrast > 0.98:
            return max(mean - contrast, 0.02)
        return mean + contrast

    def _line(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = tile.shape
        along_rows = rng.random() < 0.5  # a weft line runs along a row, a warp line along a column
        length_axis, across_axis = (width, height) if along_rows else (height, width)
        thickness = int(rng.integers(1, 4))
        length = int(rng.integers(max(length_axis // 3, 1), length_axis + 1))
        start = int(rng.integers(length_axis - length + 1))
        offset = int(rng.integers(across_axis - thickness + 1))
        mask = np.zeros(tile.shape, bool)
        if along_rows:
            mask[offset : offset + thickness, start : start + length] = True
        else:
            mask[start : start + length, offset : offset + thickness] = True
        target = self._target(tile, rng, float(rng.uniform(0.15, 0.4)))
        strength = float(rng.uniform(0.6, 1.0))
        changed = (1.0 - strength) * tile + strength * target
        return np.where(mask, changed, tile).astype(np.float32), mask

    def _blob(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = tile.shape
        axes = (int(rng.integers(2, 9)), int(rng.integers(2, 9)))
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        canvas = np.zeros(tile.shape, np.uint8)
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        mask = canvas.astype(bool)
        target = self._target(tile, rng, float(rng.uniform(0.15, 0.4)))
        speckle = rng.normal(0.0, 0.03, tile.shape).astype(np.float32)  # a dense, fuzzy lump
        changed = np.clip(0.1 * tile + 0.9 * target + speckle, 0.0, 1.0)
        return np.where(mask, changed, tile).astype(np.float32), mask

    def _band(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The weave stretched along a band across the tile, shaded like a fold."""
        along_rows = rng.random() < 0.5
        work = tile if along_rows else tile.T
        height, width = work.shape
        band = int(rng.integers(4, max(5, min(17, height // 2))))
        top = int(rng.integers(height - band + 1))
        stretch = float(rng.uniform(1.2, 2.0))
        xs = np.arange(width, dtype=np.float32)
        columns = np.tile(width / 2.0 + (xs - width / 2.0) / stretch, (band, 1))
        rows = np.repeat(np.arange(top, top + band, dtype=np.float32)[:, None], width, axis=1)
        warped = cv2.remap(work, columns, rows, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        across = (np.arange(band, dtype=np.float32) + 0.5) / band  # never 0: every row changes
        shade = float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.1, 0.25))
        profile = shade * np.sin(2.0 * math.pi * across)  # a ridge beside a valley
        profile[np.abs(profile) < 0.02] = 0.02 * np.sign(shade)
        out = work.copy()
        out[top : top + band] = np.clip(warped + profile[:, None], 0.0, 1.0)
        mask = np.zeros(work.shape, bool)
        mask[top : top + band] = True
        if not along_rows:
            out, mask = out.T, mask.T
        return np.ascontiguousarray(out, dtype=np.float32), np.ascontiguousarray(mask)


class WeaveSynthesis(AnomalySynthesis):
    """Structural faults: a seam where picks or ends are missing or doubled, a faint yarn, a
    distorted patch."""

    name = "weave"

    def __call__(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        kind = ("seam", "faint", "distortion")[int(rng.integers(3))]
        along_rows = rng.random() < 0.5  # a pick runs along a row, an end along a column
        work = tile if along_rows else tile.T
        if kind == "seam":
            out, mask = self._seam(work, rng)
        elif kind == "faint":
            out, mask = self._faint(work, rng)
        else:
            out, mask = self._distortion(work, rng)
        if not along_rows:
            out, mask = out.T, mask.T
        return np.ascontiguousarray(out, dtype=np.float32), np.ascontiguousarray(mask)

    @staticmethod
    def _run(width: int, rng: np.random.Generator) -> tuple[int, int]:
        length = int(rng.integers(max(width // 3, 1), width + 1))
        start = int(rng.integers(width - length + 1))
        return start, start + length

    def _seam(self, work: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A band taken from a few rows further on or back: the weave's pattern breaks at both
        edges of the band, as where picks are missing or doubled; with a faint shade."""
        shift = int(rng.integers(2, 9)) * int(rng.choice([-1, 1]))
        return self._band(work, rng, shift, (0.0, 0.08))

    def _faint(self, work: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A yarn only slightly lighter or darker than the fabric."""
        return self._band(work, rng, 0, (0.02, 0.12))

    def _band(
        self,
        work: np.ndarray,
        rng: np.random.Generator,
        shift: int,
        shade: tuple[float, float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """A band of 1-4 rows over a run of columns replaced by the rows ``shift`` further on
        (reflected at the tile's edge), lightened or darkened by a ``shade`` drawn in range."""
        height, width = work.shape
        band = int(rng.integers(1, 5))
        row = int(rng.integers(0, height - band + 1))
        c0, c1 = self._run(width, rng)
        reach = abs(shift)
        padded = np.pad(work, ((reach, reach), (0, 0)), mode="reflect")
        source = row + reach + shift
        offset = float(rng.choice([-1.0, 1.0])) * float(rng.uniform(*shade))
        out = work.copy()
        out[row : row + band, c0:c1] = np.clip(
            padded[source : source + band, c0:c1] + offset, 0.0, 1.0
        )
        mask = np.zeros(work.shape, bool)
        mask[row : row + band, c0:c1] = True
        return out, mask

    @staticmethod
    def _distortion(work: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A patch whose yarns are pushed aside by up to a few pixels (a smooth bump)."""
        height, width = work.shape
        radius = float(rng.uniform(5.0, 24.0))
        cy, cx = float(rng.uniform(0, height)), float(rng.uniform(0, width))
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        bump = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2.0 * (radius / 2.0) ** 2))
        amplitude = float(rng.uniform(1.5, 4.0))
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        map_x = (xs + amplitude * math.cos(angle) * bump).astype(np.float32)
        map_y = (ys + amplitude * math.sin(angle) * bump).astype(np.float32)
        out = cv2.remap(work, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        mask = amplitude * bump >= 0.75
        return np.where(mask, out, work), mask


class SpotSynthesis(AnomalySynthesis):
    """A fuzzy ball at the size and contrast AITEX fabric 02's are: one dark (or, one time in
    five, light) spot of about 10-60 px, 0.12-0.20 of the grey range off its surroundings
    (measured on the dev data's type-019 masks: -0.12 to -0.19, about two standard deviations
    of the weave around them), with soft edges. ``textile``'s blobs are 12-200 px at 0.15-0.4
    and its smallest rare; a network trained long on them reconstructs the smallest real ones
    (docs/fleets.md, "The isolated peak")."""

    name = "spot"

    def __call__(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = tile.shape
        radius = float(rng.uniform(1.0, 3.5))
        centre_y = rng.uniform(radius, height - radius)
        centre_x = rng.uniform(radius, width - radius)
        rows, columns = np.ogrid[:height, :width]
        distance = np.hypot(rows - centre_y, columns - centre_x)
        # full strength inside the radius, fading to nothing one pixel beyond it
        weight = np.clip(radius + 1.0 - distance, 0.0, 1.0).astype(np.float32)
        mask = weight > 0
        contrast = float(rng.uniform(0.12, 0.20)) * (1.0 if rng.random() < 0.2 else -1.0)
        changed = np.clip(tile + weight * contrast, 0.0, 1.0)
        # a pixel already at the limit cannot change: keep the mask to what changed
        mask &= changed != tile
        return np.where(mask, changed, tile).astype(np.float32), mask


# ---- the mix ----------------------------------------------------------------------------------
class SynthesisMix:
    """Draws a strategy per sample by the config's weights; a share of samples stays clean."""

    def __init__(self, config: SynthesisConfig, tiles: Sequence[np.ndarray] = ()) -> None:
        self.config = config
        textures = TextureBank(tiles, config.texture_dir)
        chosen = {name: w for name, w in config.strategies.items() if w > 0}
        self.strategies = [STRATEGIES[name](config, textures) for name in chosen]
        weights = np.array(list(chosen.values()), dtype=np.float64)
        self.weights = weights / weights.sum()

    def __call__(
        self, tile: np.ndarray, valid: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (augmented, mask); changes only where mask, and mask only on fabric (``valid``)."""
        clean = (tile, np.zeros(tile.shape, bool))
        if rng.random() < self.config.anomaly_free_share or not valid.any():
            return clean
        strategy = self.strategies[int(rng.choice(len(self.strategies), p=self.weights))]
        for _ in range(10):  # a mask can miss the fabric or come out empty: draw again
            augmented, mask = strategy(tile, rng)
            mask = mask & valid & (augmented != tile)
            if mask.any():
                return np.where(mask, augmented, tile).astype(np.float32), mask
        return clean
