"""Decoding of uploaded or stored images to 8-bit grey, and the valid (non-padding) area.

Everything Loomwatch looks at is one 8-bit grey plane (H x W, uint8). Decoding accepts the
formats a line camera or a person is likely to send (PNG, JPEG, BMP, TIFF; grey, grey+alpha,
RGB, RGBA, palette, CMYK, 16-bit) and refuses what would be ambiguous or dangerous (several
frames, more pixels than allowed, truncated data) with an :class:`ImageDecodeError`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image Loomwatch can use; the message says why in one line."""


def _to_grey_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image, dtype=np.uint16)
        return (wide.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)  # NaN: black
        high = 65535.0 if values.max(initial=0.0) > 255.0 else 255.0
        return np.clip(values * (255.0 / high), 0, 255).round().astype(np.uint8)
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    # LA / RGBA: the alpha channel carries no fabric; drop it (AITEX stores some grey images as LA).
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file or its bytes to an H x W uint8 grey array.

    EXIF orientation is honoured. Raises :class:`ImageDecodeError` for anything unusable.
    """
    name = "image"
    if isinstance(source, str | Path):
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {name}: {exc.strerror or exc}") from exc
    else:
        data = source
    if not data:
        raise ImageDecodeError(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"{name} has {width}x{height} pixels, more than the limit of {max_pixels}"
                    )
                frames = int(getattr(image, "n_frames", 1))
                if frames > 1:
                    raise ImageDecodeError(f"{name} has {frames} frames; send one still image")
                image.load()
                oriented = ImageOps.exif_transpose(image) or image
                grey = _to_grey_array(oriented)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{name} is too large to decode safely") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name} is not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{name} is truncated or corrupt ({exc})") from exc
    if grey.ndim != 2 or grey.size == 0:
        raise ImageDecodeError(f"{name} decoded to an empty image")
    return np.ascontiguousarray(grey)


class ValidAreaSettings(BaseModel):
    """How padding is recognised.

    A pixel is white at or above ``white_level``. A column is padding when at least
    ``line_fraction`` of its pixels are white; the partly white columns that touch it (each at
    least ``edge_fraction`` white: the ragged, bright border between padding and fabric) count
    as padding too. Rows are judged the same way, over the columns that are not padding.
    Padding and a ``margin`` of pixels next to it are excluded everywhere. Padding found within
    ``edge_reach`` pixels of an image end (at most a third of the length) also claims
    everything between it and that end: what lies beyond a white border is the selvage or the
    machine, not fabric (AITEX fabric 02 shows dark, smooth bands there). On the fabric side of
    such a border a further ``selvage_width`` pixels are excluded: the selvage's bright and dark
    yarn stripes run that far into the image (about 70-100 px after the border on AITEX fabric
    02, measured on its clean and defect strips) and would otherwise be the highest-scoring
    "defect" of every strip. The reach is wide because the border lies 480-1250 px from the
    strip's end on AITEX fabrics 00, 03, 04 and 06 (white padding on 00 and 03, a streaky
    machine band behind a thin white line on 04 and 06); with a reach of 512 px their selvage
    or machine band stayed in the valid area and outscored every defect (see docs/fleets.md).

    ``end_margin`` pixels at the left and right ends of every image are excluded too, padding or
    not (at most a sixteenth of the width): a line-scan strip's ends are the edges of the
    camera's field, where the light falls off (AITEX fabric 02 brightens by about 25 grey levels
    over its last few hundred columns) and where each model sees the image border. With none
    excluded, the highest score of every defect-free fabric-02 strip lay within 130 px of its
    right end (DRAEM, 20-minute CPU run: 8 of 8 strips), above several real defects.

    ``field_of_view`` (learned by ``loomwatch train`` when ``learn_field_of_view`` is on; see
    :func:`learn_field_of_view`) excludes, in images as wide as the training images, the
    columns outside the span where at least ``field_of_view_share`` of the training images
    showed fabric: a model has not learned what it (nearly) never saw, and on a line the
    camera's field of view is fixed. AITEX fabric 01's defect strips show a
    bright band of another material (columns 30-480) where every defect-free strip has white
    padding; scored as fabric, it and its edge gave nearly every kept region (docs/fleets.md).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    white_level: int = Field(default=250, ge=0, le=255)
    line_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    edge_fraction: float = Field(default=0.15, gt=0.0, le=1.0)
    margin: int = Field(default=16, ge=0)
    edge_reach: int = Field(default=1536, ge=0)
    selvage_width: int = Field(default=96, ge=0)
    end_margin: int = Field(default=32, ge=0)
    learn_field_of_view: bool = Field(
        default=True, description="training learns the columns its images show fabric in"
    )
    field_of_view_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="a column is in the field of view when this share of the training images"
        " show fabric in it",
    )
    field_of_view: FieldOfView | None = None


class FieldOfView(BaseModel):
    """The columns ``[start, stop)`` that showed fabric in most of ``images`` training images
    ``width`` pixels wide; columns outside are not fabric in an image of that width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(ge=1)
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    images: int = Field(ge=1)

    def applies(self, width: int) -> bool:
        """Whether it holds for an image ``width`` pixels wide (as wide as its training images)."""
        return width == self.width


def learn_field_of_view(valids: list[np.ndarray], share: float = 0.5) -> FieldOfView | None:
    """The span of columns that show fabric in at least ``share`` of the training images'
    valid areas; None when there are no images, their widths differ (no one field of view), or
    no column qualifies."""
    widths = {valid.shape[1] for valid in valids}
    if len(widths) != 1:
        return None
    seen = np.zeros(widths.pop(), int)
    for valid in valids:
        seen += valid.any(axis=0)
    columns = np.flatnonzero(seen >= max(share * len(valids), 1))
    if columns.size == 0:
        return None
    return FieldOfView(
        width=seen.size, start=int(columns[0]), stop=int(columns[-1]) + 1, images=len(valids)
    )


def _claim_ends(lines: np.ndarray, reach: int, selvage: int = 0) -> np.ndarray:
    """Extend padding runs that lie wholly near either end of the axis to that end, and
    ``selvage`` lines further inward."""
    reach = min(reach, lines.size // 3)
    edges = np.diff(np.concatenate([[0], lines.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    claimed = lines.copy()
    for start, stop in zip(starts, stops, strict=True):
        # A run that touches an end is a border however wide it is (AITEX fabric 00 pads
        # 1250 px); one that lies wholly within reach of an end has non-fabric beyond it.
        if stop <= reach or start == 0:
            claimed[: stop + selvage] = True
        if start >= lines.size - reach or stop == lines.size:
            claimed[max(start - selvage, 0) :] = True
    return claimed


def _padding_lines(white_fraction: np.ndarray, settings: ValidAreaSettings) -> np.ndarray:
    """Mostly white lines, extended through the contiguous partly white lines next to them."""
    strong = white_fraction >= settings.line_fraction
    weak = strong | (white_fraction >= settings.edge_fraction)
    # Lines of one contiguous weak run share a run id; keep the runs that hold a strong line.
    run_id = np.cumsum(~weak)
    return np.asarray(weak & np.isin(run_id, run_id[strong]))


def _grow(lines: np.ndarray, margin: int) -> np.ndarray:
    """Mark every line within ``margin`` of a marked line (same length as ``lines``)."""
    if margin <= 0 or not lines.any():
        return lines
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(lines, margin), 2 * margin + 1)
    return np.asarray(windows.any(axis=1))


def valid_area(image: np.ndarray, settings: ValidAreaSettings | None = None) -> np.ndarray:
    """Boolean H x W mask, True where the image shows fabric (not padding nor its margin)."""
    settings = settings or ValidAreaSettings()
    white = image >= settings.white_level
    pad_cols = _padding_lines(white.mean(axis=0), settings)
    if pad_cols.all():
        return np.zeros(image.shape[:2], dtype=bool)
    # Rows are judged over fabric columns only, so that wide padding at the side of a narrow
    # image does not make every row look white.
    pad_rows = _padding_lines(white[:, ~pad_cols].mean(axis=1), settings)
    reach, selvage = settings.edge_reach, settings.selvage_width
    bad_cols = _grow(_claim_ends(pad_cols, reach, selvage), settings.margin)
    bad_rows = _grow(_claim_ends(pad_rows, reach, selvage), settings.margin)
    ends = min(settings.end_margin, bad_cols.size // 16)
    if ends:
        bad_cols[:ends] = bad_cols[-ends:] = True
    view = settings.field_of_view
    if view is not None and view.applies(bad_cols.size):
        bad_cols[: view.start] = bad_cols[view.stop :] = True
    return np.asarray(~bad_rows[:, None] & ~bad_cols[None, :])


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 grey -> float32 in [0, 1]."""
    return image.astype(np.float32) / 255.0


def resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map (used when the model input differs from the tile size)."""
    if values.shape == (height, width):
        return values
    resized = cv2.resize(values.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(resized, dtype=np.float32)
