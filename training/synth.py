"""Synthetic woven fabric with realistic defects, written in the AITEX folder layout.

The generator is for the tests, the demo and anyone without real data. It draws grey woven
strips (plain and twill weaves with uneven yarns, slubs, weft bow, illumination drift and
sensor noise) that look like the AITEX line-scan strips, adds white padding at one end of about a
third of them, and paints one textile-shaped defect on each defective strip.

Layout written by :func:`generate_dataset` (as in AITEX)::

    out/NoDefect_images/<roll>/nnnn_000_ff.png
    out/Defect_images/nnnn_ddd_ff.png
    out/Mask_images/nnnn_ddd_ff_mask.png     8-bit grey, 255 = defect, 0 elsewhere
    out/synth.json                           the arguments, fabric parameters and files written

Mask rule: a pixel is a defect pixel when the defect changed its grey value by at least
:data:`MASK_DELTA` levels, or when it lies in the defect's own geometry (the yarn, blob, band or
hole, before soft edges) and its value changed at all. Soft tails that change a pixel by less
than ``MASK_DELTA`` are not defect. Defects never touch padding nor the margin next to it.

:func:`make_fabric`, :func:`sample_fabric_params` and :func:`add_defect` are the building blocks;
anomaly synthesis for training (DRAEM) can reuse them on tiles.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from models.preprocessing import valid_area

# AITEX defect codes for the kinds we draw. "090" is not an AITEX code: AITEX has no hole class,
# and 090 is far from its codes (002..036), so synthetic holes can never be mistaken for real ones.
DEFECT_KINDS: dict[str, str] = {
    "002": "broken end",
    "006": "broken yarn",
    "010": "broken pick",
    "019": "fuzzyball",
    "023": "crease",
    "027": "knots",
    "029": "contamination",
    "036": "weft crack",
    "090": "hole",
}
NORMAL_CODE = "000"
MASK_DELTA = 3
WEAVES = ("plain", "twill")
MANIFEST_NAME = "synth.json"
MANIFEST_FORMAT = 1

PADDING_PROBABILITY = 1 / 3
# Padding widths seen in AITEX strips 4096 px wide; scaled to the strip width.
PADDING_RANGE_4096 = (160, 1238)
# Columns kept free of defects next to the fabric edge (on top of the partly white columns and
# the bright edge line); the same margin the loaders exclude.
EDGE_MARGIN = 16
SUBTLE_PROBABILITY = 0.3

_BLOCK_ROWS = 32  # rows of texture computed at once: small enough to stay in cache
MIN_SIZE = 64
MAX_WIDTH = 16384
MAX_HEIGHT = 4096
MAX_FABRICS = 20
MAX_IDS = 9999


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


# --------------------------------------------------------------------------- fabric


def _smooth_noise_1d(rng: np.random.Generator, length: int, knots: int) -> np.ndarray:
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
    skew = np.arange(width, dtype=np.float32) * slope + params.bow * _smooth_noise_1d(rng, width, 3)
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
    along = 1.0 + params.drift * _smooth_noise_1d(rng, width, max(2, width // 700))
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


# --------------------------------------------------------------------------- padding


def _pad_left(rng: np.random.Generator, image: np.ndarray, pad: int) -> int:
    """White padding over columns [0, pad) of ``image`` (in place); returns the width of the
    edge zone beside it.

    As in AITEX, the fabric edge is ragged (so a few columns are only partly white) and a bright
    selvage line, on some strips followed by a darker one, runs along it.
    """
    height = image.shape[0]
    image[:, :pad] = 255
    ragged = float(rng.uniform(1.0, 4.0))
    line = float(rng.uniform(4.0, 14.0))
    dip = float(rng.uniform(2.0, 8.0)) if rng.random() < 0.7 else 0.0
    zone = image[:, pad : pad + math.ceil(ragged + 2 * line + 2 * dip + 4)].astype(np.float32)
    edge = 0.5 * ragged * (1.0 + _smooth_noise_1d(rng, height, max(2, height // 8)))
    distance = np.arange(zone.shape[1], dtype=np.float32)[None, :] - edge[:, None]
    bright = float(rng.uniform(30.0, 80.0)) * np.exp(
        -0.5 * ((distance - line / 2) / (line / 2)) ** 2
    )
    dark = float(rng.uniform(20.0, 45.0)) * np.exp(
        -0.5 * ((distance - line - dip) / (dip / 2 + 0.5)) ** 2
    )
    zone += bright - (dark if dip else 0.0)
    whiteness = np.clip(0.5 - distance / 1.5, 0.0, 0.97)
    zone += whiteness * (255.0 - zone)
    # Below 255, so the pure white columns are exactly the padding.
    image[:, pad : pad + zone.shape[1]] = np.clip(np.rint(zone), 0, 254)
    return zone.shape[1]


def _add_padding(rng: np.random.Generator, image: np.ndarray) -> tuple[int, int, int]:
    """Maybe pad one end of ``image`` in place. Returns (pad_left, pad_right, edge zone width)."""
    width = image.shape[1]
    if rng.random() >= PADDING_PROBABILITY:
        return 0, 0, 0
    low, high = PADDING_RANGE_4096
    pad = max(1, round(rng.uniform(low, high) * width / 4096))
    # Leave room for fabric (and defects) beside the padding on narrow strips.
    if width - pad - 2 * EDGE_MARGIN - 32 < 64:
        return 0, 0, 0
    if rng.random() < 0.5:
        return pad, 0, _pad_left(rng, image, pad)
    return 0, pad, _pad_left(rng, image[:, ::-1], pad)


def _defect_area(image: np.ndarray, pad_left: int, pad_right: int, zone: int) -> np.ndarray:
    """Where a defect may go: fabric only, away from padding, its edge zone and a margin."""
    valid = valid_area(image)
    width = image.shape[1]
    if pad_left:
        valid[:, : min(width, pad_left + zone + EDGE_MARGIN)] = False
    if pad_right:
        valid[:, max(0, width - pad_right - zone - EDGE_MARGIN) :] = False
    return valid


# --------------------------------------------------------------------------- defects


@dataclass(frozen=True)
class _Stroke:
    """What a defect does to a window of the image whose top-left corner is (top, left).

    New grey = old + ``shift`` + ``pull`` * (``target`` - old); ``target`` None is the window's
    mean grey. ``core`` is the defect's own geometry, before soft edges.
    """

    top: int
    left: int
    shift: np.ndarray
    core: np.ndarray
    pull: np.ndarray | None = None
    target: float | None = None


def _amplitude(rng: np.random.Generator, low: float, high: float, dark: float) -> float:
    """Signed grey change: dark with probability ``dark``; subtle ones are low contrast."""
    size = rng.uniform(low, high)
    if rng.random() < SUBTLE_PROBABILITY:
        size = rng.uniform(6.0, max(7.0, low))
    return float(-size if rng.random() < dark else size)


def _line_across(distance: np.ndarray, half_width: float, softness: float) -> np.ndarray:
    """Soft line profile: 1 within ``half_width`` of the axis, Gaussian fall-off outside."""
    outside = np.maximum(np.abs(distance) - half_width, 0.0) / softness
    return np.asarray(np.exp(-0.5 * outside * outside), dtype=np.float32)


def _wavy_path(rng: np.random.Generator, length: int, wander: float) -> np.ndarray:
    """Offsets (px) of a yarn that wanders sideways by about ``wander`` px over ``length``."""
    knots = max(2, length // 60)
    return wander * _smooth_noise_1d(rng, length, knots)


def _long_line(
    rng: np.random.Generator,
    start: int,
    across_pos: int,
    length: int,
    amplitude: float,
    vertical: bool,
) -> _Stroke:
    """Thin line along a yarn, ``length`` px from ``start``: a warp line (vertical, at column
    ``across_pos``) or a weft line (horizontal, at row ``across_pos``)."""
    half_width = float(rng.uniform(0.5, 2.0))
    wander = float(rng.uniform(0.5, 12.0) if vertical else rng.uniform(0.3, 3.0))
    path = _wavy_path(rng, length, wander)
    reach = math.ceil(wander + half_width + 4)
    across = np.arange(-reach, reach + 1, dtype=np.float32)[None, :]
    distance = across - path[:, None]
    profile = _line_across(distance, half_width, 0.8)
    # A broken yarn is not evenly dark over its length.
    profile *= 0.75 + 0.25 * np.abs(_smooth_noise_1d(rng, length, max(2, length // 40)))[:, None]
    shift = amplitude * profile
    core = np.abs(distance) <= half_width
    if vertical:
        return _Stroke(start, across_pos - reach, shift, core)
    return _Stroke(across_pos - reach, start, np.ascontiguousarray(shift.T), core.T)


def _broken_end(
    rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]
) -> _Stroke:
    """A warp yarn missing or broken: a thin vertical line, the full height or part of it."""
    height = shape[0]
    if rng.random() < 0.6:
        start, length = 0, height
    else:
        length = int(rng.integers(max(8, height // 5), height + 1))
        start = anchor[0] - int(rng.integers(0, length))
    amplitude = _amplitude(rng, 12.0, 40.0, 0.75)
    return _long_line(rng, start, anchor[1], length, amplitude, vertical=True)


def _broken_pick(
    rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]
) -> _Stroke:
    """A weft yarn missing or broken: a thin horizontal line, tens to hundreds of px long."""
    length = int(rng.integers(min(30, shape[1]), min(600, shape[1]) + 1))
    start = anchor[1] - int(rng.integers(0, length))
    amplitude = _amplitude(rng, 8.0, 30.0, 0.6)
    return _long_line(rng, start, anchor[0], length, amplitude, vertical=False)


def _blob(
    rng: np.random.Generator, radius_y: float, radius_x: float, raggedness: float
) -> np.ndarray:
    """Irregular soft blob in [0, 1] on a window just large enough for it."""
    ry, rx = math.ceil(radius_y * 1.6) + 2, math.ceil(radius_x * 1.6) + 2
    y = np.arange(-ry, ry + 1, dtype=np.float32)[:, None] / radius_y
    x = np.arange(-rx, rx + 1, dtype=np.float32)[None, :] / radius_x
    angle = np.arctan2(y, x)
    # Radius that varies with the angle gives a ragged outline.
    wobble = np.zeros_like(angle)
    for harmonic in (2, 3, 5):
        wobble += raggedness / harmonic * np.cos(harmonic * angle + rng.uniform(0, 2 * math.pi))
    radius = np.sqrt(y * y + x * x) / (1.0 + wobble)
    return np.asarray(np.clip(1.6 - 1.2 * radius, 0.0, 1.0) ** 1.5, dtype=np.float32)


def _centred(anchor: tuple[int, int], window: np.ndarray) -> tuple[int, int]:
    return anchor[0] - window.shape[0] // 2, anchor[1] - window.shape[1] // 2


def _fuzzyball(
    rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]
) -> _Stroke:
    radius = float(rng.uniform(2.5, 9.0))
    alpha = _blob(rng, radius * rng.uniform(0.8, 1.2), radius, 0.35)
    fuzz = 1.0 + 0.35 * rng.standard_normal(alpha.shape).astype(np.float32)
    alpha = np.clip(alpha * fuzz, 0.0, 1.0)
    top, left = _centred(anchor, alpha)
    return _Stroke(top, left, _amplitude(rng, 20.0, 60.0, 0.8) * alpha, alpha >= 0.5)


def _knot(rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]) -> _Stroke:
    long_r, short_r = float(rng.uniform(3.0, 8.0)), float(rng.uniform(1.5, 3.5))
    vertical = rng.random() < 0.5
    alpha = _blob(rng, long_r, short_r, 0.15) if vertical else _blob(rng, short_r, long_r, 0.15)
    # The thickened yarn runs on a little either side of the knot.
    tail = np.zeros_like(alpha)
    mid_y, mid_x = alpha.shape[0] // 2, alpha.shape[1] // 2
    if vertical:
        tail[:, mid_x - 1 : mid_x + 1] = 0.4
    else:
        tail[mid_y - 1 : mid_y + 1, :] = 0.4
    alpha = np.maximum(alpha, cv2.GaussianBlur(tail, (0, 0), 0.7))
    top, left = _centred(anchor, alpha)
    return _Stroke(top, left, _amplitude(rng, 15.0, 50.0, 0.4) * alpha, alpha >= 0.5)


def _contamination(
    rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]
) -> _Stroke:
    diameter = float(rng.uniform(20.0, 80.0))
    alpha = _blob(rng, diameter / 2 * rng.uniform(0.6, 1.0), diameter / 2, 0.3)
    alpha = cv2.GaussianBlur(alpha, (0, 0), diameter / 12)
    top, left = _centred(anchor, alpha)
    # A stain both shifts the grey and soaks the weave, flattening its texture.
    flatten = float(rng.uniform(0.1, 0.5)) * alpha
    shift = _amplitude(rng, 15.0, 45.0, 0.6) * alpha
    return _Stroke(top, left, shift, alpha >= 0.5, pull=flatten)


def _crease(rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]) -> _Stroke:
    """Long fold across the strip: a line lit on one side and shaded on the other."""
    height = shape[0]
    slope = math.tan(math.radians(rng.uniform(-35.0, 35.0)))
    bend = float(rng.uniform(0.0, 12.0))
    sigma = float(rng.uniform(1.5, 5.0))
    path = slope * (np.arange(height, dtype=np.float32) - anchor[0])
    path += bend * _smooth_noise_1d(rng, height, 2)
    reach = math.ceil(np.abs(path).max() + 4 * sigma + 2)
    across = np.arange(-reach, reach + 1, dtype=np.float32)[None, :]
    distance = (across - path[:, None]) / sigma
    bell = np.exp(-0.5 * distance * distance)
    amplitude = _amplitude(rng, 12.0, 35.0, 0.5)
    shift = amplitude * (float(rng.uniform(-0.5, 0.5)) * bell + distance * bell)
    core = np.abs(distance) <= 1.5
    return _Stroke(0, anchor[1] - reach, shift.astype(np.float32), core)


def _weft_crack(
    rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]
) -> _Stroke:
    """A band of the strip where the pick density changed: darker or lighter, soft edges."""
    height, width = shape
    band = float(rng.uniform(2.0, max(3.0, height * 0.3)))
    length = int(rng.integers(min(200, width), width + 1))
    soft = float(rng.uniform(1.0, 3.0))
    reach = math.ceil(band + 4 * soft)
    rows = np.arange(-reach, reach + 1, dtype=np.float32)[:, None]
    across = _line_across(rows, band, soft)
    along = np.clip(np.minimum(np.arange(length), np.arange(length)[::-1]) / 20.0, 0.0, 1.0)
    alpha = across * along[None, :].astype(np.float32)
    shift = _amplitude(rng, 8.0, 22.0, 0.7) * alpha
    # The crack itself: a thin darker line along one edge of the band.
    edge = -band if rng.random() < 0.5 else band
    shift += -float(rng.uniform(4.0, 12.0)) * _line_across(rows - edge, 0.5, 0.7) * along[None, :]
    start = anchor[1] - int(rng.integers(0, length))
    core = (np.abs(rows) <= band) & (along[None, :] > 0)
    return _Stroke(anchor[0] - reach, start, shift, core)


def _broken_yarn(
    rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]
) -> _Stroke:
    """A loose or displaced yarn: a curved line, with a light side where it stands proud."""
    steps = int(rng.integers(20, 160))
    heading = rng.uniform(0, 2 * math.pi)
    turns = np.cumsum(rng.normal(0.0, 0.12, steps))
    points = np.cumsum(
        np.stack([np.sin(heading + turns), np.cos(heading + turns)], axis=1) * 2.5, 0
    )
    points -= points.min(axis=0)
    margin = 6
    size = np.ceil(points.max(axis=0)).astype(int) + 2 * margin + 1
    canvas = np.zeros((int(size[0]), int(size[1])), dtype=np.uint8)
    pts = np.rint(points[:, ::-1] + margin).astype(np.int32).reshape(-1, 1, 2)
    thickness = int(rng.integers(1, 4))
    cv2.polylines(canvas, [pts], False, 255, thickness, cv2.LINE_AA)
    line = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 0.6)
    highlight = np.roll(line, (1, 1), axis=(0, 1))
    amplitude = _amplitude(rng, 12.0, 35.0, 0.6)
    shift = amplitude * line - 0.5 * amplitude * highlight
    top, left = _centred(anchor, canvas)
    return _Stroke(top, left, shift.astype(np.float32), canvas >= 128)


def _hole(rng: np.random.Generator, anchor: tuple[int, int], shape: tuple[int, int]) -> _Stroke:
    """Missing weave showing what is behind the fabric: dark, or bright where backlit."""
    radius = float(rng.uniform(3.0, 14.0))
    alpha = _blob(rng, radius * rng.uniform(0.6, 1.0), radius, 0.4)
    background = float(rng.uniform(5.0, 40.0) if rng.random() < 0.6 else rng.uniform(210.0, 250.0))
    shift = 2.0 * rng.standard_normal(alpha.shape).astype(np.float32) * alpha
    top, left = _centred(anchor, alpha)
    return _Stroke(top, left, shift, alpha >= 0.5, pull=alpha, target=background)


_Renderer = Callable[[np.random.Generator, tuple[int, int], tuple[int, int]], _Stroke]
_RENDERERS: dict[str, _Renderer] = {
    "002": _broken_end,
    "006": _broken_yarn,
    "010": _broken_pick,
    "019": _fuzzyball,
    "023": _crease,
    "027": _knot,
    "029": _contamination,
    "036": _weft_crack,
    "090": _hole,
}


def _apply(
    image: np.ndarray, valid: np.ndarray, stroke: _Stroke
) -> tuple[np.ndarray, np.ndarray] | None:
    """Paint ``stroke``; returns (image, mask), or None when it changed no pixel."""
    height, width = image.shape
    win_h, win_w = stroke.shift.shape
    top, left = max(stroke.top, 0), max(stroke.left, 0)
    bottom, right = min(stroke.top + win_h, height), min(stroke.left + win_w, width)
    if top >= bottom or left >= right:
        return None
    inner = (
        slice(top - stroke.top, bottom - stroke.top),
        slice(left - stroke.left, right - stroke.left),
    )
    region = (slice(top, bottom), slice(left, right))
    old = image[region].astype(np.float32)
    delta = stroke.shift[inner].astype(np.float32)
    if stroke.pull is not None:
        target = float(old.mean()) if stroke.target is None else stroke.target
        delta = delta + stroke.pull[inner] * (target - old)
    new = np.clip(np.rint(old + delta * valid[region]), 0, 255)
    change = np.abs(new - old)
    window_mask = (change >= MASK_DELTA) | (stroke.core[inner] & (change > 0))
    if not window_mask.any():
        return None
    out = image.copy()
    out[region] = new.astype(np.uint8)
    mask = np.zeros(image.shape, dtype=bool)
    mask[region] = window_mask
    return out, mask


def add_defect(
    rng: np.random.Generator, image: np.ndarray, kind: str, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` (a code of :data:`DEFECT_KINDS`) where ``valid`` is True.

    Returns a new uint8 image and the defect's boolean mask (see the module's mask rule). Pixels
    outside ``valid`` (default: everywhere) are never changed.
    """
    if kind not in _RENDERERS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W uint8, got {image.shape} {image.dtype}")
    if valid is not None and valid.shape != image.shape:
        raise ValueError(f"valid has shape {valid.shape}, image {image.shape}")
    valid = np.ones(image.shape, dtype=bool) if valid is None else valid.astype(bool)
    places = np.flatnonzero(valid)
    if places.size == 0:
        raise ValueError("no valid pixel to place a defect on")
    for _ in range(50):
        place = int(places[int(rng.integers(places.size))])
        anchor = divmod(place, image.shape[1])
        painted = _apply(image, valid, _RENDERERS[kind](rng, anchor, image.shape))
        if painted is not None:
            return painted
    raise ValueError(f"could not place a {DEFECT_KINDS[kind]} defect on this image")


# --------------------------------------------------------------------------- strips and dataset


@dataclass(frozen=True)
class Strip:
    """One generated strip: the image, the same strip before its defect, and where things are."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray | None  # bool, None for a defect-free strip
    pad_left: int  # white padding columns at the left end
    pad_right: int  # white padding columns at the right end
    valid: np.ndarray  # bool, where a defect may lie


def make_strip(
    rng: np.random.Generator,
    params: FabricParams,
    height: int,
    width: int,
    kind: str | None = None,
) -> Strip:
    """A fabric strip, padded at one end about a third of the time, with a defect of ``kind``."""
    clean = make_fabric(rng, params, height, width)
    pad_left, pad_right, zone = _add_padding(rng, clean)
    valid = _defect_area(clean, pad_left, pad_right, zone)
    if kind is None:
        return Strip(clean, clean, None, pad_left, pad_right, valid)
    image, mask = add_defect(rng, clean, kind, valid)
    return Strip(image, clean, mask, pad_left, pad_right, valid)


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_dataset` wrote."""

    out: Path
    fabrics: int
    normal: int  # defect-free strips, all fabrics
    defective: int  # strips with a defect, all fabrics
    by_code: tuple[tuple[str, int], ...]  # (defect code, strips) in code order
    files: tuple[Path, ...] = field(repr=False)

    def __str__(self) -> str:
        codes = ", ".join(f"{code} x{count}" for code, count in self.by_code) or "none"
        return (
            f"wrote {self.normal} defect-free and {self.defective} defective strips "
            f"of {self.fabrics} fabric(s) to {self.out} (defects: {codes})"
        )


def _check_arguments(
    out: Path, fabrics: int, normal: int, defective: int, seed: int, width: int, height: int
) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not 1 <= fabrics <= MAX_FABRICS:
        raise ValueError(f"fabrics must be 1..{MAX_FABRICS}, got {fabrics}")
    if normal < 0 or defective < 0 or normal + defective == 0:
        raise ValueError(
            f"normal and defective must be >= 0 and not both 0, got {normal}, {defective}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if fabrics * (normal + defective) > MAX_IDS:
        raise ValueError(
            f"at most {MAX_IDS} strips in all, asked for {fabrics * (normal + defective)}"
        )
    if not MIN_SIZE <= width <= MAX_WIDTH or not MIN_SIZE <= height <= MAX_HEIGHT:
        raise ValueError(
            f"width must be {MIN_SIZE}..{MAX_WIDTH} and height {MIN_SIZE}..{MAX_HEIGHT}, "
            f"got {width}x{height}"
        )


def _previous_files(out: Path) -> list[Path]:
    """Files an earlier run wrote into ``out``; refuses a non-empty folder of other files."""
    if not out.exists() or not any(out.iterdir()):
        return []
    manifest = out / MANIFEST_NAME
    try:
        written = [str(name) for name in json.loads(manifest.read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"--out {out} is not empty and holds no synthetic data ({MANIFEST_NAME})"
        ) from exc
    root = out.resolve()
    paths = [(out / name).resolve() for name in written]
    # Only ever delete what lies inside ``out``, whatever the manifest says.
    return [path for path in paths if path.is_relative_to(root) and path != root]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    _write_atomic(path, encoded.tobytes())


@dataclass(frozen=True)
class _Job:
    """One strip to write: its random stream, fabric, defect code and file names."""

    key: tuple[int, ...]
    fabric: int
    code: str
    image: Path
    mask: Path | None


def _defect_plan(seed: int, count: int) -> list[str]:
    """Defect code of each defective strip: every kind in turn, in an order drawn from ``seed``."""
    codes = list(DEFECT_KINDS)
    order = [codes[k] for k in np.random.default_rng([seed, 3]).permutation(len(codes))]
    return [order[k % len(order)] for k in range(count)]


def _fabric_plan(seed: int, fabrics: int) -> list[FabricParams]:
    """Fabric looks; the first two are one of each weave, so that a small dataset shows both."""
    plans: list[FabricParams] = []
    for f in range(fabrics):
        weave = WEAVES[(seed + f) % len(WEAVES)] if f < len(WEAVES) else None
        plans.append(sample_fabric_params(np.random.default_rng([seed, f, 0]), weave))
    return plans


def _jobs(
    out: Path, plans: list[FabricParams], normal: int, defective: int, seed: int
) -> list[_Job]:
    """Every strip in writing order, with a running id. Each strip has its own random stream,
    so asking for more strips leaves the first ones as they were."""
    kinds = iter(_defect_plan(seed, len(plans) * defective))
    jobs: list[_Job] = []
    for f, params in enumerate(plans):
        ff = f"{f:02d}"
        roll = out / "NoDefect_images" / f"synth{ff}-{params.weave}"
        for k in range(normal):
            name = f"{len(jobs) + 1:04d}_{NORMAL_CODE}_{ff}"
            jobs.append(_Job((seed, f, 1, k), f, NORMAL_CODE, roll / f"{name}.png", None))
        for k in range(defective):
            code = next(kinds)
            name = f"{len(jobs) + 1:04d}_{code}_{ff}"
            image = out / "Defect_images" / f"{name}.png"
            mask = out / "Mask_images" / f"{name}_mask.png"
            jobs.append(_Job((seed, f, 2, k), f, code, image, mask))
    return jobs


def _write_strip(job: _Job, params: FabricParams, height: int, width: int) -> None:
    kind = None if job.mask is None else job.code
    strip = make_strip(np.random.default_rng(job.key), params, height, width, kind)
    _write_png(job.image, strip.image)
    if job.mask is not None and strip.mask is not None:
        _write_png(job.mask, strip.mask.astype(np.uint8) * 255)


def generate_dataset(
    out: Path,
    *,
    fabrics: int = 2,
    normal: int = 8,
    defective: int = 6,
    seed: int = 0,
    width: int = 4096,
    height: int = 256,
    progress: bool = True,
) -> SynthSummary:
    """Write a synthetic AITEX-layout dataset into ``out``: ``normal`` defect-free and
    ``defective`` strips per fabric. The same arguments always give byte-identical files.

    ``out`` may be missing, empty, or an earlier output of this function (whose files are
    replaced); anything else raises ValueError, as do arguments out of range.
    """
    out = Path(out)
    _check_arguments(out, fabrics, normal, defective, seed, width, height)
    stale = _previous_files(out)
    plans = _fabric_plan(seed, fabrics)
    jobs = _jobs(out, plans, normal, defective, seed)
    for job in tqdm(jobs, desc="synth", unit="strip", disable=not progress):
        _write_strip(job, plans[job.fabric], height, width)
    files = [path for job in jobs for path in (job.image, job.mask) if path is not None]
    for path in set(stale) - {path.resolve() for path in files}:
        path.unlink(missing_ok=True)
    _write_manifest(out, files, plans, seed=seed, width=width, height=height)
    counts = Counter(job.code for job in jobs if job.mask is not None)
    return SynthSummary(
        out=out,
        fabrics=fabrics,
        normal=fabrics * normal,
        defective=fabrics * defective,
        by_code=tuple(sorted(counts.items())),
        files=tuple(files),
    )


def _write_manifest(
    out: Path, files: list[Path], plans: list[FabricParams], *, seed: int, width: int, height: int
) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "generator": "loomwatch training.synth",
        "seed": seed,
        "width": width,
        "height": height,
        "mask_rule": f"|change| >= {MASK_DELTA} grey levels, or changed and in the defect geometry",
        "defect_kinds": DEFECT_KINDS,
        "fabrics": [asdict(params) for params in plans],
        "files": [path.relative_to(out).as_posix() for path in files],
    }
    _write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
