"""Uploads before and after inference: what an upload is (without decoding it), masks out.

:func:`probe_image` reads only the header: PIL opens lazily, so the declared size is checked
before a single pixel is decoded, and formats other than PNG, JPEG, BMP and TIFF are refused.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import ApiError

ACCEPTED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
# Declared content types that may carry an accepted image; the bytes decide which one it is.
ACCEPTED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/tif",
        "image/x-tiff",
        "application/octet-stream",
    }
)
ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mode: str
    width: int
    height: int


def _unsupported(what: str) -> ApiError:
    formats = ", ".join(ACCEPTED_FORMATS)
    return ApiError(415, "unsupported_media_type", f"{what} is not accepted; send {formats}")


def probe_image(
    data: bytes, content_type: str | None, max_pixels: int, tile_size: int = 1
) -> ImageInfo:
    """Format, mode and size from the header, or the ApiError (413/415/422) to answer.

    An image narrower or lower than a tile is padded to it before scoring, so the pixel limit
    applies to the padded size too: a 1 x 16,000,000 line would otherwise cost as much memory
    and time as a 256 x 16,000,000 image.
    """
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared and declared not in ACCEPTED_CONTENT_TYPES:
        raise _unsupported(f"content type '{declared}'")
    if not data:
        raise ApiError(422, "undecodable_image", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                info = ImageInfo(image.format or "?", image.mode, *image.size)
    except Image.DecompressionBombError:
        raise ApiError(
            413, "too_many_pixels", f"the image declares more pixels than the limit of {max_pixels}"
        ) from None
    except UnidentifiedImageError:
        raise ApiError(
            422, "undecodable_image", "the file is not a readable PNG, JPEG, BMP or TIFF image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(422, "undecodable_image", "the image header is corrupt") from None
    if info.format not in ACCEPTED_FORMATS:
        raise _unsupported(f"{info.format} image")
    if info.width * info.height > max_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"the image declares {info.width}x{info.height} pixels, "
            f"more than the limit of {max_pixels}",
        )
    scored_width, scored_height = max(info.width, tile_size), max(info.height, tile_size)
    if scored_width * scored_height > max_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"the image is {info.width}x{info.height} pixels; padded to the model's {tile_size} px "
            f"tile it would be scored as {scored_width}x{scored_height}, more than the limit of "
            f"{max_pixels}",
        )
    return info


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO-style uncompressed run lengths of a binary mask: column-major order, and the first
    run counts background pixels (0 when the first pixel is foreground)."""
    flat = (mask > 0).ravel(order="F").astype(np.int8)
    if flat.size == 0:
        return []
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def rle_decode(counts: list[int], height: int, width: int) -> np.ndarray:
    """Inverse of :func:`rle_counts` (uint8, 255 = foreground)."""
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 255
    return np.repeat(values, counts).reshape((height, width), order="F")
