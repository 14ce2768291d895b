"""A strip as the line-scan camera sees it: fabric, white padding at one end of about a third
of the strips (with the ragged edge and selvage line of AITEX), and at most one defect, kept
clear of the padding and the margin next to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.preprocessing import valid_area
from training.synth.defects import add_defect
from training.synth.fabric import FabricParams, make_fabric, smooth_noise_1d

PADDING_PROBABILITY = 1 / 3
# Padding widths seen in AITEX strips 4096 px wide; scaled to the strip width.
PADDING_RANGE_4096 = (160, 1238)
# Columns kept free of defects next to the fabric edge (on top of the partly white columns and
# the bright edge line); the same margin the loaders exclude.
EDGE_MARGIN = 16


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
    edge = 0.5 * ragged * (1.0 + smooth_noise_1d(rng, height, max(2, height // 8)))
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
