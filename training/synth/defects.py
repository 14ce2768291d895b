"""Textile-shaped defects and their masks: broken ends and picks, fuzzyballs, knots,
contamination, creases, weft cracks, broken yarns and holes, each painted as a change of grey
over a window of the strip.

Mask rule: a pixel is a defect pixel when the defect changed its grey value by at least
:data:`MASK_DELTA` levels, or when it lies in the defect's own geometry (the yarn, blob, band or
hole, before soft edges) and its value changed at all. Soft tails that change a pixel by less
than ``MASK_DELTA`` are not defect.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from training.synth.fabric import smooth_noise_1d

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
MASK_DELTA = 3
SUBTLE_PROBABILITY = 0.3


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
    return wander * smooth_noise_1d(rng, length, knots)


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
    profile *= 0.75 + 0.25 * np.abs(smooth_noise_1d(rng, length, max(2, length // 40)))[:, None]
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
    path += bend * smooth_noise_1d(rng, height, 2)
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
