"""Synthetic woven fabric: the look of a fabric (weave, yarn spacing, grey level, irregularity),
the weave texture, illumination drift and sensor noise of a line-scan strip.

Warp yarns run down the columns, as under a line-scan camera that follows the warp; the weft
carries the fabric's skew and bow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

WEAVES = ("plain", "twill")
_BLOCK_ROWS = 32  # rows of texture computed at once: small enough to stay in cache


@dataclass(frozen=True)
class FabricParams:
    """How one fabric looks. Strips of the same fabric share these and differ in yarn jitter."""

    weave: str  # "plain" or "twill"
    warp_period: float  # px between warp yarns (columns)
    weft_period: float  # px between weft yarns (rows)
    twill_repeat: int  # yarns in one weave repeat (2 for plain)
    twill_float: int  # cells a warp floats over in a twill repeat
    twill_direction: int  # +1 or -1: which way the twill diagonal runs
    skew: float  # degrees the weft yarns lean from the horizontal
    level: float  # mean grey
    contrast: float  # grey standard deviation of the weave texture
    weft_balance: float  # brightness of weft yarns relative to warp yarns
    yarn_width: float  # fraction of a cell a yarn fills
    thickness_jitter: float  # relative yarn-width spread from yarn to yarn
    brightness_jitter: float  # relative yarn-brightness spread from yarn to yarn
    slub: float  # relative brightness variation along a yarn
    slub_length: float  # px over which slub variation changes
    gap: float  # brightness of what shows between yarns, relative to a yarn
    bow: float  # px the weft yarns bow over the strip width
    drift: float  # relative illumination change along the strip
    noise: float  # sensor noise, grey levels
    blur: float  # optical blur, px


def sample_fabric_params(rng: np.random.Generator, weave: str | None = None) -> FabricParams:
    """Draw the look of one fabric: weave (unless given), yarn spacing and orientation, grey
    level, contrast, yarn irregularity, drift and noise."""
    if weave not in (None, *WEAVES):
        raise ValueError(f"unknown weave {weave!r}; known: {', '.join(WEAVES)}")
    weave = str(rng.choice(WEAVES)) if weave is None else weave
    repeat, float_ = (2, 1)
    if weave == "twill":
        repeat, float_ = [(3, 2), (4, 2), (4, 3), (3, 1)][int(rng.integers(4))]
    # The weave repeat, not the yarn, is what shows at AITEX resolution: twill lines or plain
    # checks 5..12 px apart. Twill yarns are then only 2.5..4 px apart, as in the real strips.
    warp_period, weft_period = (float(rng.uniform(5.0, 12.0)) / repeat for _ in range(2))
    # Finer yarns than 2.5 px alias into moire at this sampling.
    warp_period, weft_period = max(warp_period, 2.5), max(weft_period, 2.5)
    return FabricParams(
        weave=weave,
        warp_period=warp_period,
        weft_period=weft_period,
        twill_repeat=repeat,
        twill_float=float_,
        twill_direction=int(rng.choice([-1, 1])),
        skew=float(rng.uniform(-3.0, 3.0)),
        level=float(rng.uniform(75.0, 135.0)),
        contrast=float(rng.uniform(9.0, 22.0)),
        # Warp and weft differ in shine; that difference is what draws the twill lines.
        weft_balance=float(rng.choice([-1, 1]) * rng.uniform(0.15, 0.35) + 1.0),
        yarn_width=float(rng.uniform(0.75, 0.95)),
        thickness_jitter=float(rng.uniform(0.01, 0.04)),
        brightness_jitter=float(rng.uniform(0.005, 0.02)),
        slub=float(rng.uniform(0.005, 0.02)),
        slub_length=float(rng.uniform(15.0, 60.0)),
        gap=float(rng.uniform(0.5, 0.8)),
        bow=float(rng.uniform(0.0, 4.0)),
        drift=float(rng.uniform(0.02, 0.07)),
        noise=float(rng.uniform(1.5, 4.0)),
        blur=max(0.8, float(rng.uniform(0.3, 0.4)) * min(warp_period, weft_period)),
    )


def smooth_noise_1d(rng: np.random.Generator, length: int, knots: int) -> np.ndarray:
    """Smooth random curve of ``length`` samples in about [-1, 1]."""
    coarse = rng.uniform(-1.0, 1.0, size=(1, knots + 1)).astype(np.float32)
    curve = cv2.resize(coarse, (length, 1), interpolation=cv2.INTER_CUBIC)
    return np.asarray(curve[0], dtype=np.float32)


def _smooth_noise_rows(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """rows x cols noise, smooth along rows over ``scale`` px, independent from column to column."""
    coarse_rows = max(2, math.ceil(rows / scale) + 1)
    coarse = rng.standard_normal((coarse_rows, cols), dtype=np.float32)
    return np.asarray(cv2.resize(coarse, (cols, rows), interpolation=cv2.INTER_LINEAR))


def _weave_tables(params: FabricParams) -> dict[str, np.ndarray]:
    """Per weave cell (code ``(j % R) * R + i % R``): whether the warp is on top, and whether
    the float on top continues into the cell before / after it along its own yarn."""
    repeat = params.twill_repeat
    jm, im = np.divmod(np.arange(repeat * repeat), repeat)

    def up(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.asarray((i + params.twill_direction * j) % repeat < params.twill_float)

    return {
        "up": up(im, jm),
        "warp_before": up(im, jm - 1).astype(np.float32),
        "warp_after": up(im, jm + 1).astype(np.float32),
        "weft_before": (~up(im - 1, jm)).astype(np.float32),
        "weft_after": (~up(im + 1, jm)).astype(np.float32),
    }


def _yarn_profile(frac: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Brightness across a round yarn: 1 on its axis, 0 at its edge and in the gap beside it."""
    across = np.minimum(np.abs(2.0 * frac - 1.0) / width, 1.0)
    return np.asarray(np.cos((0.5 * math.pi) * across))


def _float_ends(frac: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Shading along a float (``frac`` 0..1 along the cell): darker where the yarn dives under
    a crossing yarn, that is where it does not continue (``before``/``after`` 0)."""
    into = np.maximum(before, np.minimum(frac * (1 / 0.3), 1.0))
    out_of = np.maximum(after, np.minimum((1.0 - frac) * (1 / 0.3), 1.0))
    return np.asarray(0.8 + 0.2 * into * out_of)


def _per_yarn(rng: np.random.Generator, count: int, spread: float, mean: float = 1.0) -> np.ndarray:
    return (mean * (1.0 + spread * rng.standard_normal(count))).astype(np.float32)


def _weave_texture(
    rng: np.random.Generator, params: FabricParams, height: int, width: int
) -> np.ndarray:
    """Float texture of the yarns (brightness about 0..1.3), before blur, gain and noise.

    Warp yarns run down the columns (a line-scan camera follows the warp), so their position
    depends on x only; the weft carries the fabric's skew and bow. That keeps much of the work
    on 1-D arrays; the rest runs over blocks of rows, which stay in cache.
    """
    repeat = params.twill_repeat
    u = np.arange(width, dtype=np.float32) / params.warp_period + rng.uniform(0.0, 64.0)
    u_floor = np.floor(u)
    fu = u - u_floor
    i = u_floor.astype(np.int32)
    i_mod = i % repeat
    i -= i[0]
    slope = math.tan(math.radians(params.skew))
    skew = np.arange(width, dtype=np.float32) * slope + params.bow * smooth_noise_1d(rng, width, 3)
    skew -= skew.min()
    v_phase = float(rng.uniform(0.0, 64.0))
    j_first = math.floor(v_phase)
    n_warp = int(i[-1]) + 1
    n_weft = math.floor((height + float(skew.max())) / params.weft_period + v_phase) - j_first + 1
    tables = _weave_tables(params)

    warp_width = np.clip(_per_yarn(rng, n_warp, params.thickness_jitter, params.yarn_width), 0.4, 1)
    weft_width = np.clip(_per_yarn(rng, n_weft, params.thickness_jitter, params.yarn_width), 0.4, 1)
    warp_shape = _yarn_profile(fu, warp_width[i])[None, :]
    warp_gap = (1.0 - warp_shape) * params.gap
    warp_slub = 1.0 + params.slub * _smooth_noise_rows(rng, height, n_warp, params.slub_length)
    warp_gain = _per_yarn(rng, n_warp, params.brightness_jitter)[i] * np.take(warp_slub, i, axis=1)
    weft_slub = 1.0 + params.slub * _smooth_noise_rows(rng, width, n_weft, params.slub_length).T
    weft_slub *= _per_yarn(rng, n_weft, params.brightness_jitter, params.weft_balance)[:, None]
    fu_row = fu[None, :]

    texture = np.empty((height, width), dtype=np.float32)
    for top in range(0, height, _BLOCK_ROWS):
        rows = slice(top, min(top + _BLOCK_ROWS, height))
        v = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + skew[None, :]
        v *= 1.0 / params.weft_period
        v += v_phase
        v_floor = np.floor(v)
        fv = v - v_floor  # float32; int32 - float32 would give float64
        j = v_floor.astype(np.int32)
        cell = (j % repeat) * repeat + i_mod[None, :]
        j -= j_first
        weft_shape = _yarn_profile(fv, weft_width[j])
        warp_top = warp_gain[rows] * warp_shape
        warp_top *= _float_ends(fv, tables["warp_before"][cell], tables["warp_after"][cell])
        warp_top += warp_gap
        weft_top = np.take_along_axis(weft_slub, j, axis=0) * weft_shape
        weft_top *= _float_ends(fu_row, tables["weft_before"][cell], tables["weft_after"][cell])
        weft_top += (1.0 - weft_shape) * params.gap
        texture[rows] = np.where(tables["up"][cell], warp_top, weft_top)
    return texture


def _illumination(
    rng: np.random.Generator, params: FabricParams, height: int, width: int
) -> np.ndarray:
    """Multiplicative gain: slow drift along the strip, a little shading across it."""
    along = 1.0 + params.drift * smooth_noise_1d(rng, width, max(2, width // 700))
    # Line-scan sensors leave a faint fixed pattern from column to column.
    along *= 1.0 + 0.004 * rng.standard_normal(width).astype(np.float32)
    across_pos = np.linspace(-1.0, 1.0, height, dtype=np.float32)
    across = 1.0 - float(rng.uniform(0.0, 0.04)) * across_pos**2
    return np.asarray(across[:, None] * along[None, :], dtype=np.float32)


def make_fabric(
    rng: np.random.Generator, params: FabricParams, height: int, width: int
) -> np.ndarray:
    """One defect-free strip of the fabric ``params`` describes, H x W uint8 grey."""
    if height < 1 or width < 1:
        raise ValueError(f"fabric size must be positive, got {width}x{height}")
    texture = _weave_texture(rng, params, height, width)
    grey = np.asarray(cv2.GaussianBlur(texture, (0, 0), params.blur), dtype=np.float32)
    mean, std = cv2.meanStdDev(grey)
    # In place: these strips are large and this runs once per strip.
    grey -= float(mean[0, 0])
    grey *= params.contrast / max(float(std[0, 0]), 1e-6)
    grey += params.level
    grey *= _illumination(rng, params, height, width)
    grey += params.noise * rng.standard_normal((height, width), dtype=np.float32)
    np.rint(grey, out=grey)
    np.clip(grey, 0, 255, out=grey)
    return grey.astype(np.uint8)
