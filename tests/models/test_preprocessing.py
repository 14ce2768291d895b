"""Decoding to 8-bit grey and the valid (non-padding) area, on small synthetic images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import ImageDecodeError, ValidAreaSettings, decode_image, valid_area

MARGIN = ValidAreaSettings().margin
# The padding rules on their own; the strip-end margin and the selvage have their own tests.
PADDING_ONLY = ValidAreaSettings(end_margin=0, selvage_width=0)
WITH_SELVAGE = ValidAreaSettings(end_margin=0)


def _fabric(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Grey woven-looking texture that never reaches white."""
    rng = np.random.default_rng(seed)
    rows = np.sin(np.arange(height) * 0.9)[:, None]
    cols = np.sin(np.arange(width) * 1.3)[None, :]
    texture = 120 + 30 * rows * cols + rng.normal(0, 12, (height, width))
    return np.clip(texture, 40, 200).astype(np.uint8)


def _png_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _white_fraction(image: np.ndarray) -> np.ndarray:
    return np.asarray((image >= 250).mean(axis=0))


# --- valid_area: padding quirks 6, 7, 8 -----------------------------------------------------


def test_plain_fabric_is_all_valid() -> None:
    assert valid_area(_fabric(64, 300), PADDING_ONLY).all()


def test_white_padding_columns_and_margin_are_invalid() -> None:
    image = _fabric(64, 600)
    image[:, :200] = 255  # padding at the start of the strip (quirk 6)

    valid = valid_area(image, PADDING_ONLY)

    assert valid.shape == image.shape
    assert not valid[:, : 200 + MARGIN].any()
    assert valid[:, 200 + MARGIN :].all()


def test_padding_at_the_far_end_is_invalid_too() -> None:
    image = _fabric(32, 500)
    image[:, 380:] = 255

    valid = valid_area(image, PADDING_ONLY)

    assert not valid[:, 380 - MARGIN :].any()
    assert valid[:, : 380 - MARGIN].all()


def test_ragged_partly_white_border_and_bright_line_are_excluded() -> None:
    # Quirk 7: between padding and fabric a band of partly white columns fades out over more
    # columns than the margin, then a bright (not white) line runs along the fabric edge.
    height, width, pad, fade = 100, 500, 150, 30
    image = _fabric(height, width)
    image[:, :pad] = 255
    rng = np.random.default_rng(1)
    for step, column in enumerate(range(pad, pad + fade)):
        fraction = 0.8 - 0.6 * step / (fade - 1)  # 80 % white down to 20 % white
        rows = rng.choice(height, size=round(fraction * height), replace=False)
        image[rows, column] = 255
        image[~np.isin(np.arange(height), rows), column] = 235
    image[:, pad + fade : pad + fade + 3] = 230  # bright edge line

    valid = valid_area(image, PADDING_ONLY)

    assert not valid[:, : pad + fade + MARGIN].any()
    assert valid[:, pad + fade + MARGIN :].all()
    assert _white_fraction(image)[valid.any(axis=0)].max() == 0.0


@pytest.mark.parametrize("run_width", [1, 5, 14])
def test_thin_white_runs_inside_the_fabric_are_excluded_with_margin(run_width: int) -> None:
    image = _fabric(64, 700)
    start = 400
    image[:, start : start + run_width] = 255

    valid = valid_area(image, PADDING_ONLY)

    assert not valid[:, start - MARGIN : start + run_width + MARGIN].any()
    assert valid[:, : start - MARGIN].all()
    assert valid[:, start + run_width + MARGIN :].all()


def test_near_white_seam_that_is_not_fully_white_is_excluded() -> None:
    # Seen in AITEX fabrics 04 and 06: a seam of columns only 55-75 % white, never fully white.
    image = _fabric(256, 900, seed=3)
    rng = np.random.default_rng(4)
    seam = range(500, 506)
    for column, fraction in zip(seam, [0.3, 0.55, 0.7, 0.75, 0.6, 0.25], strict=True):
        rows = rng.choice(256, size=round(fraction * 256), replace=False)
        image[:, column] = 215
        image[rows, column] = 255

    valid = valid_area(image, PADDING_ONLY)

    assert not valid[:, 500 - MARGIN : 506 + MARGIN].any()
    assert valid[:, : 500 - MARGIN].all()
    assert valid[:, 506 + MARGIN :].all()


def test_small_bright_defect_inside_the_fabric_stays_valid() -> None:
    # A bright defect (white over a third of a few columns) is fabric to be judged, not padding.
    image = _fabric(256, 600)
    image[100:180, 300:306] = 255

    assert valid_area(image, PADDING_ONLY).all()


@pytest.mark.parametrize("width", [40, 777, 3796, 4096])
def test_any_width_works(width: int) -> None:
    image = _fabric(16, width)
    pad = width // 4
    image[:, :pad] = 255

    valid = valid_area(image, PADDING_ONLY)

    assert valid.shape == (16, width)
    assert not valid[:, : pad + MARGIN].any()
    assert valid[:, pad + MARGIN :].all()


def test_image_smaller_than_the_margin_window_keeps_its_shape() -> None:
    image = _fabric(20, 3 + MARGIN + 2)
    image[:, :3] = 255

    valid = valid_area(image, PADDING_ONLY)

    assert valid.shape == image.shape
    assert not valid[:, : 3 + MARGIN].any()
    assert valid[:, 3 + MARGIN :].all()


def test_wide_side_padding_does_not_make_every_row_padding() -> None:
    # A narrow tile that is mostly padding: each row is > 90 % white, yet the fabric is fabric.
    image = _fabric(64, 400)
    image[:, :370] = 255

    valid = valid_area(image, PADDING_ONLY)

    assert not valid[:, : 370 + MARGIN].any()
    assert valid[:, 370 + MARGIN :].all()


def test_white_padding_rows_are_excluded() -> None:
    image = _fabric(200, 300)
    image[150:, :] = 255

    valid = valid_area(image, PADDING_ONLY)

    assert not valid[150 - MARGIN :].any()
    assert valid[: 150 - MARGIN].all()


def test_the_ends_of_a_strip_are_not_fabric() -> None:
    ends = ValidAreaSettings().end_margin
    valid = valid_area(_fabric(64, 4096))
    columns = np.asarray(valid.all(axis=0))
    assert not columns[:ends].any() and not columns[-ends:].any()
    assert columns[ends:-ends].all() and valid.all(axis=1).sum() == 0  # rows are not cut
    # never more than a sixteenth of the width: a narrow image keeps most of itself
    narrow = np.asarray(valid_area(_fabric(64, 128)).all(axis=0))
    assert narrow.sum() == 128 - 2 * (128 // 16)
    assert valid_area(_fabric(64, 300), ValidAreaSettings(end_margin=0)).all()


def test_all_white_image_has_no_valid_area() -> None:
    assert not valid_area(np.full((32, 64), 255, dtype=np.uint8)).any()


def test_settings_change_the_margin() -> None:
    image = _fabric(16, 200)
    image[:, :50] = 255

    valid = valid_area(image, ValidAreaSettings(margin=0, end_margin=0, selvage_width=0))

    assert not valid[:, :50].any()
    assert valid[:, 50:].all()


# --- decode_image -------------------------------------------------------------------------


def test_grey_png_round_trips_exactly(tmp_path: Path) -> None:
    grey = _fabric(12, 34)
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)

    decoded = decode_image(path)

    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, grey)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), grey)


def test_la_image_decodes_to_its_grey_channel() -> None:
    grey = _fabric(10, 20)
    alpha = np.tile(np.linspace(0, 255, 20).astype(np.uint8), (10, 1))
    la = Image.fromarray(np.dstack([grey, alpha]), mode="LA")

    decoded = decode_image(_png_bytes(la))

    assert decoded.shape == (10, 20)
    np.testing.assert_array_equal(decoded, grey)


def test_rgba_image_decodes_to_luma_and_ignores_alpha() -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 0  # fully transparent: the colour still counts
    decoded = decode_image(_png_bytes(Image.fromarray(rgba, mode="RGBA")))

    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert decoded.shape == (4, 6)
    assert np.abs(decoded.astype(int) - expected).max() <= 1


def test_palette_image_decodes_to_the_grey_of_its_colours() -> None:
    palette_image = Image.new("P", (8, 4))
    palette_image.putpalette([0, 0, 0, 255, 255, 255, 90, 90, 90] + [0] * (253 * 3))
    indices = np.zeros((4, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    indices[0, 0] = 2
    palette_image.putdata(indices.ravel().tolist())

    decoded = decode_image(_png_bytes(palette_image))

    assert decoded[1, 0] == 0
    assert decoded[0, 0] == 90
    assert (decoded[:, 4:] == 255).all()


def test_16_bit_png_is_scaled_to_8_bit() -> None:
    wide = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    decoded = decode_image(_png_bytes(Image.fromarray(wide)))

    assert decoded.dtype == np.uint8
    np.testing.assert_allclose(decoded[0], [0, 127.5, 255, 1], atol=1)


def test_cmyk_jpeg_decodes_to_grey() -> None:
    image = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (16, 0, 32, 16))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)

    decoded = decode_image(buffer.getvalue())

    assert decoded.shape == (16, 32)
    assert decoded[:, :12].min() > 240  # no ink: white
    assert decoded[:, 20:].max() < 15  # full black ink


def test_exif_orientation_is_honoured() -> None:
    stored = np.full((40, 80), 30, dtype=np.uint8)
    stored[:, 40:] = 220  # left half dark, right half bright, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer must rotate 90 degrees clockwise
    buffer = io.BytesIO()
    Image.fromarray(stored, mode="L").save(buffer, format="JPEG", quality=95, exif=exif)

    decoded = decode_image(buffer.getvalue())

    assert decoded.shape == (80, 40)
    assert decoded[:35].mean() < 60  # the stored left half is now on top
    assert decoded[45:].mean() > 190


def test_truncated_png_is_refused() -> None:
    data = _png_bytes(Image.fromarray(_fabric(64, 64)))
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_zero_bytes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(empty)


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("L", (8, 8), value) for value in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])

    with pytest.raises(ImageDecodeError, match="frames"):
        decode_image(buffer.getvalue())


def test_not_an_image_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"this is plain text, not pixels")
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image(tmp_path / "missing.png")


def test_band_beyond_a_white_border_near_the_end_is_not_fabric() -> None:
    from tests.helpers import woven

    image = woven(64, 1024)
    image[:, :100] = 70  # dark selvage band at the left end
    image[:, 100:110] = 255  # white border line
    image[:, -5:] = 255  # and a white border at the right end, with nothing beyond it
    valid = valid_area(image, ValidAreaSettings(selvage_width=0, end_margin=0))
    assert not valid[:, :110].any()  # the band and the border
    assert valid[:, 110 + 16 : -5 - 16].all() and not valid[:, -5 - 16 :].any()
    # By default the selvage stripes on the fabric side of such a border are excluded too.
    valid = valid_area(image, WITH_SELVAGE)
    assert not valid[:, : 110 + 96 + 16].any() and valid[:, 110 + 96 + 16 : -5 - 96 - 16].all()
    assert not valid[:, -5 - 96 - 16 :].any()
    far = woven(64, 1024)
    far[:, 500:505] = 255  # a white run in the middle claims only itself and its margin
    middle = valid_area(far, WITH_SELVAGE)
    assert middle[:, : 500 - 16].all() and not middle[:, 500 - 16 : 505 + 16].any()
    assert middle[:, 505 + 16 :].all()


def test_a_border_a_quarter_of_the_way_in_still_claims_the_end() -> None:
    """AITEX fabrics 00 and 03: white padding over the first 1000-1250 px of a 4096 px strip;
    04 and 06: a streaky machine band of 500-750 px behind a thin white line. Both borders lie
    beyond 512 px of the end, and the selvage or the band beside them is not fabric."""
    from tests.helpers import woven

    padded = woven(64, 4096)
    padded[:, :1100] = 255
    valid = valid_area(padded, WITH_SELVAGE)
    assert not valid[:, : 1100 + 96 + 16].any() and valid[:, 1100 + 96 + 16 :].all()

    banded = woven(64, 4096)
    banded[:, :700] = 60  # the machine band, darker than fabric
    banded[:, 700:706] = 255
    valid = valid_area(banded, WITH_SELVAGE)
    assert not valid[:, : 706 + 96 + 16].any() and valid[:, 706 + 96 + 16 :].all()

    # A white run in the middle of a strip is a bright fault or a splice, not a border: it
    # claims only itself and its margin, however wide the strip.
    middle = woven(64, 4096)
    middle[:, 1800:1806] = 255
    valid = valid_area(middle, WITH_SELVAGE)
    assert valid[:, : 1800 - 16].all() and not valid[:, 1800 - 16 : 1806 + 16].any()


# --- the field of view learned from training images ------------------------------------------


def _valid_from(start: int, width: int = 400, height: int = 8) -> np.ndarray:
    valid = np.zeros((height, width), bool)
    valid[:, start : width - 10] = True
    return valid


def test_field_of_view_spans_the_columns_most_training_images_show_fabric_in() -> None:
    from models.preprocessing import learn_field_of_view

    valids = [_valid_from(start) for start in (100, 104, 108, 30)]  # one strip reaches further
    view = learn_field_of_view(valids)
    assert view is not None
    # columns 30-99 show fabric in one image of four, 100-103 in two: half is enough
    assert (view.width, view.start, view.stop, view.images) == (400, 100, 390, 4)
    every = learn_field_of_view(valids, share=0.25)  # any one image is enough
    assert every is not None and every.start == 30
    assert learn_field_of_view([_valid_from(100), _valid_from(100, width=300)]) is None
    assert learn_field_of_view([np.zeros((8, 400), bool)]) is None
    assert learn_field_of_view([]) is None


def test_valid_area_leaves_out_columns_outside_the_field_of_view_at_its_width_only() -> None:
    from models.preprocessing import FieldOfView

    image = _fabric(32, 400)  # no padding: all fabric by the padding rules
    view = FieldOfView(width=400, start=120, stop=380, images=5)
    settings = ValidAreaSettings(end_margin=0, field_of_view=view)
    valid = valid_area(image, settings)
    assert not valid[:, :120].any() and not valid[:, 380:].any()
    assert valid[:, 120:380].all()
    # an image of another width is not the one the view was learned at: padding rules only
    assert valid_area(_fabric(32, 300), settings).all()
