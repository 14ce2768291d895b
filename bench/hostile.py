"""A corpus of hostile and awkward uploads, each with the answer the service documents for it.

Used by the quick tests (``tests/reliability/test_hostile.py``, in-process) and by the full run
(``bench/reliability.py``, against a live ``loomwatch serve``). Every file is generated here from
one grey strip; nothing is read from disk.

What is accepted and what is refused (README "Serving", errors):

- 16-bit, palette and CMYK images are scored (8-bit grey); EXIF orientation is honoured.
- GIF (animated or not), WebP, SVG are not accepted formats: 415. Several frames in an accepted
  format (multi-page TIFF, animated PNG) are refused with 422 ``undecodable_image``: which frame
  is "the" image would be a guess.
- Empty, random, truncated files and markup sent as an image: 422 ``undecodable_image``; markup
  declared as ``image/svg+xml`` is refused by its type: 415.
- A header declaring more pixels than ``MAX_PIXELS`` (also after padding to the model's tile):
  413 ``too_many_pixels``, before decoding. A body over ``MAX_UPLOAD_BYTES``: 413 ``too_large``,
  also when it is streamed in chunks without a Content-Length.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

OK = "ok"
BOUNDARY = "loomwatch-hostile"


@dataclass(frozen=True)
class Hostile:
    name: str
    filename: str
    content_type: str
    data: bytes
    status: int  # the answer on /predict (and the item's status in /predict/batch)
    code: str  # the error code, or OK
    size: tuple[int, int] | None = None  # (width, height) the service must report when scored
    streamed: int = 0  # > 0: send this many bytes of filler, chunked, after `data`


def encode(pixels: np.ndarray | Image.Image, fmt: str, **options: object) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a few bytes of pixel data only."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian grey TIFF whose one strip claims width x height pixels (8 bytes given)."""
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),  # the strip starts right after the header
        (277, 3, 1),
        (278, 4, height),
        (279, 4, min(width * height, 0xFFFFFFFF)),
    ]
    ifd_offset = 8 + 8
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + b"\x00" * 8 + ifd


def _frames(strip: np.ndarray, count: int = 3) -> list[Image.Image]:
    return [Image.fromarray(np.roll(strip, shift * 7, axis=1)) for shift in range(count)]


def _rotated_jpeg(strip: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; display rotated 90 degrees clockwise
    return encode(strip, "JPEG", quality=92, exif=exif.tobytes())


def build_corpus(
    strip: np.ndarray, *, max_pixels: int, max_upload_bytes: int, tile_size: int
) -> list[Hostile]:
    """The corpus for a service with these limits; `strip` is a grey uint8 fabric image."""
    height, width = strip.shape
    png, jpeg = encode(strip, "PNG"), encode(strip, "JPEG", quality=90)
    frames = _frames(strip)
    rgb = np.repeat(strip[..., None], 3, axis=2)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    svg = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="4096" height="256">'
        b'<script>alert(1)</script><rect width="100%" height="100%"/></svg>'
    )
    html = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
    noise = np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    thin = max_pixels // max(tile_size // 2, 1)  # fits the limit alone, not once padded
    undecodable, refused = "undecodable_image", "unsupported_media_type"
    return [
        Hostile("zero bytes", "empty.png", "image/png", b"", 422, undecodable),
        Hostile("random bytes named .png", "photo.png", "image/png", noise, 422, undecodable),
        Hostile("truncated PNG", "cut.png", "image/png", png[: len(png) // 2], 422, undecodable),
        Hostile(
            "truncated JPEG", "cut.jpg", "image/jpeg", jpeg[: len(jpeg) // 2], 422, undecodable
        ),
        Hostile(
            "PNG header 100000 x 100000 (bomb)",
            "bomb.png",
            "image/png",
            png_header_only(100_000, 100_000),
            413,
            "too_many_pixels",
        ),
        Hostile(
            f"PNG 1 x {thin} (padded to the tile: over MAX_PIXELS)",
            "thread.png",
            "image/png",
            png_header_only(thin, 1),
            413,
            "too_many_pixels",
        ),
        Hostile(
            "16-bit PNG",
            "deep.png",
            "image/png",
            encode((strip.astype(np.uint16) * 257).astype(np.uint16), "PNG"),
            200,
            OK,
            (width, height),
        ),
        Hostile(
            "palette PNG",
            "palette.png",
            "image/png",
            encode(palette, "PNG"),
            200,
            OK,
            (width, height),
        ),
        Hostile(
            "CMYK JPEG",
            "cmyk.jpg",
            "image/jpeg",
            encode(Image.fromarray(strip).convert("CMYK"), "JPEG"),
            200,
            OK,
            (width, height),
        ),
        Hostile(
            "EXIF-rotated JPEG (orientation 6)",
            "rotated.jpg",
            "image/jpeg",
            _rotated_jpeg(strip),
            200,
            OK,
            (height, width),
        ),
        Hostile(
            "animated GIF",
            "anim.gif",
            "image/gif",
            encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
            415,
            refused,
        ),
        Hostile(
            "animated GIF named .png",
            "anim.png",
            "image/png",
            encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
            415,
            refused,
        ),
        Hostile(
            "multi-page TIFF",
            "pages.tif",
            "image/tiff",
            encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
            422,
            undecodable,
        ),
        Hostile(
            "TIFF header 100000 x 100000",
            "huge.tif",
            "image/tiff",
            tiff_header_only(100_000, 100_000),
            413,
            "too_many_pixels",
        ),
        Hostile("SVG as image/svg+xml", "logo.svg", "image/svg+xml", svg, 415, refused),
        Hostile("SVG as image/png", "logo.png", "image/png", svg, 422, undecodable),
        Hostile("HTML as image/jpeg", "page.jpg", "image/jpeg", html, 422, undecodable),
        Hostile(
            f"over MAX_UPLOAD_BYTES ({max_upload_bytes}), chunked",
            "big.png",
            "image/png",
            png,
            413,
            "too_large",
            streamed=max_upload_bytes + (1 << 20),
        ),
    ]


def multipart_stream(item: Hostile, field: str, chunk: int = 1 << 16) -> Iterator[bytes]:
    """A multipart body for `item`, yielded in chunks (so no Content-Length is sent)."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{item.filename}"\r\nContent-Type: {item.content_type}\r\n\r\n'
    ).encode()
    yield item.data
    left = item.streamed
    while left > 0:
        yield b"\x00" * min(chunk, left)
        left -= chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART_STREAM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"

ROUTES = ("/predict", "/predict/batch")
LEAKS = ("Traceback", 'File "', "site-packages", ".py:", "/usr/", "/home/", "/tmp/", "/work/")


def post(client: Any, item: Hostile, route: str) -> Any:
    """Post `item` to `route` (either of ROUTES) with an httpx-style client."""
    field = "files" if route.endswith("/batch") else "file"
    if item.streamed:
        headers = {"Content-Type": MULTIPART_STREAM_TYPE}
        return client.post(route, content=multipart_stream(item, field), headers=headers)
    files = [(field, (item.filename, item.data, item.content_type))]
    return client.post(route, files=files, params={"mask": "none"})


def _error_problem(body: dict[str, Any], item: Hostile) -> str | None:
    if body.get("code") != item.code or not body.get("detail"):
        return f"expected code {item.code}, got {body}"
    return None


def _result_problem(result: dict[str, Any], item: Hostile) -> str | None:
    size = (result["image"]["width"], result["image"]["height"])
    if item.size is not None and size != item.size:
        return f"scored as {size[0]}x{size[1]}, expected {item.size[0]}x{item.size[1]}"
    return None


def problem(item: Hostile, route: str, response: Any, hidden: tuple[str, ...] = ()) -> str | None:
    """None when `response` is the documented answer to `item` on `route`; else what is wrong."""
    text = response.text
    for leak in (*LEAKS, *hidden):
        if leak in text:
            return f"the body shows {leak!r}"
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code}: not JSON"
    batch = route.endswith("/batch") and not item.streamed
    expected = 200 if batch else item.status
    if response.status_code != expected:
        return f"status {response.status_code}, expected {expected}: {text[:200]}"
    if batch:
        answer = body["items"][0]
        if answer["status"] != item.status:
            return f"item status {answer['status']}, expected {item.status}"
        if item.code != OK:
            return _error_problem(answer["error"], item)
        return _result_problem(answer["result"], item)
    if item.code != OK:
        if body.get("request_id") != response.headers.get("X-Request-ID"):
            return "the request id of the body and of the header differ"
        return _error_problem(body, item)
    return _result_problem(body, item)
