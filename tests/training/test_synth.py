"""Tests of the synthetic fabric generator: layout, masks, padding, determinism, arguments."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import decode_image
from training import synth
from training.synth import (
    DEFECT_KINDS,
    MASK_DELTA,
    WEAVES,
    Strip,
    SynthSummary,
    add_defect,
    generate_dataset,
    make_fabric,
    make_strip,
    sample_fabric_params,
)

WIDTH, HEIGHT = 512, 128
STEM = re.compile(r"^(\d{4})_(\d{3})_(\d{2})$")


def _generate(out: Path, **kwargs: int) -> SynthSummary:
    args = {"fabrics": 2, "normal": 2, "defective": 3, "width": WIDTH, "height": HEIGHT}
    args.update(kwargs)
    return generate_dataset(out, progress=False, **args)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _white_columns(image: np.ndarray) -> np.ndarray:
    return np.asarray((image == 255).all(axis=0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, _generate(out, fabrics=2, normal=4, defective=9)


def test_layout_and_names_parse_as_aitex(dataset: tuple[Path, SynthSummary]) -> None:
    out, summary = dataset
    normal = sorted((out / "NoDefect_images").glob("*/*.png"))
    defects = sorted((out / "Defect_images").glob("*.png"))
    masks = sorted((out / "Mask_images").glob("*.png"))
    assert len(normal) == summary.normal == 8
    assert len(defects) == len(masks) == summary.defective == 18
    ids = []
    for path in normal:
        match = STEM.match(path.stem)
        assert match, path.name
        ids.append(match[1])
        assert match[2] == "000"
        assert path.parent.name.startswith(f"synth{match[3]}-")
    for path in defects:
        match = STEM.match(path.stem)
        assert match, path.name
        ids.append(match[1])
        assert match[2] in DEFECT_KINDS
        assert (out / "Mask_images" / f"{path.stem}_mask.png") in masks
    assert len(set(ids)) == len(ids), "running ids must be unique"
    assert {path.stem[-2:] for path in defects} == {"00", "01"}
    assert len(summary.files) == 8 + 2 * 18
    assert set(summary.files) == set(normal) | set(defects) | set(masks)


def test_images_are_8bit_grey_of_the_asked_size(dataset: tuple[Path, SynthSummary]) -> None:
    _, summary = dataset
    for path in summary.files:
        with Image.open(path) as image:
            assert image.mode == "L", path.name
            assert image.size == (WIDTH, HEIGHT)


def test_summary_prints_one_line(dataset: tuple[Path, SynthSummary]) -> None:
    out, summary = dataset
    text = str(summary)
    assert "\n" not in text
    assert str(out) in text and "8 defect-free" in text and "18 defective" in text


def test_every_defect_kind_is_written(dataset: tuple[Path, SynthSummary]) -> None:
    _, summary = dataset
    assert dict(summary.by_code) == dict.fromkeys(DEFECT_KINDS, 2)


def test_masks_are_binary_non_empty_and_off_the_padding(
    dataset: tuple[Path, SynthSummary],
) -> None:
    out, _ = dataset
    for path in sorted((out / "Defect_images").glob("*.png")):
        image = decode_image(path)
        mask = decode_image(out / "Mask_images" / f"{path.stem}_mask.png")
        assert set(np.unique(mask)) == {0, 255}, path.name
        white = _white_columns(image)
        # Keep clear of padding by the margin the loaders exclude.
        near_white = np.convolve(white, np.ones(2 * synth.EDGE_MARGIN + 1), mode="same") > 0
        assert not mask[:, near_white].any(), path.name


def test_written_files_are_the_strips_and_masks_match_the_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Strip] = []

    def recording_make_strip(*args: object, **kwargs: object) -> Strip:
        strip = make_strip(*args, **kwargs)  # type: ignore[arg-type]
        made.append(strip)
        return strip

    monkeypatch.setattr(synth.writer, "make_strip", recording_make_strip)
    summary = _generate(tmp_path / "data", fabrics=1, normal=1, defective=9)
    images = [p for p in summary.files if not p.name.endswith("_mask.png")]
    assert len(made) == len(images) == 10
    for strip, path in zip(made, images, strict=True):
        assert np.array_equal(decode_image(path), strip.image)
        if strip.mask is None:
            assert np.array_equal(strip.image, strip.clean)
            continue
        mask = decode_image(path.parent.parent / "Mask_images" / f"{path.stem}_mask.png")
        assert np.array_equal(mask > 127, strip.mask)
        _assert_mask_rule(strip.clean, strip.image, strip.mask, strip.valid)


def _assert_mask_rule(
    clean: np.ndarray, image: np.ndarray, mask: np.ndarray, valid: np.ndarray
) -> None:
    change = np.abs(image.astype(int) - clean.astype(int))
    assert mask.any()
    assert not change[~valid].any(), "a defect changed pixels outside the valid area"
    assert not (mask & (change == 0)).any(), "mask marks pixels the defect left alone"
    assert not ((change >= MASK_DELTA) & ~mask).any(), "a visible change is missing from the mask"


@pytest.mark.parametrize("kind", list(DEFECT_KINDS))
def test_each_kind_paints_a_mask_exactly_where_it_changed_the_image(kind: str) -> None:
    for seed in range(4):
        rng = np.random.default_rng([seed, int(kind)])
        params = sample_fabric_params(rng, WEAVES[seed % len(WEAVES)])
        strip = make_strip(rng, params, HEIGHT, WIDTH, kind)
        assert strip.mask is not None
        assert strip.mask.dtype == bool and strip.mask.shape == (HEIGHT, WIDTH)
        _assert_mask_rule(strip.clean, strip.image, strip.mask, strip.valid)


def test_add_defect_respects_a_small_valid_area() -> None:
    rng = np.random.default_rng(5)
    image = make_fabric(rng, sample_fabric_params(rng), 96, 96)
    valid = np.zeros(image.shape, dtype=bool)
    valid[40:60, 30:50] = True
    for kind in DEFECT_KINDS:
        painted, mask = add_defect(rng, image, kind, valid)
        _assert_mask_rule(image, painted, mask, valid)
        assert image is not painted


def test_padding_is_pure_white_at_one_end_and_free_of_defects() -> None:
    padded = {"left": 0, "right": 0}
    strips = 45
    for seed in range(strips):
        rng = np.random.default_rng(seed)
        kind = list(DEFECT_KINDS)[seed % len(DEFECT_KINDS)]
        strip = make_strip(rng, sample_fabric_params(rng), HEIGHT, WIDTH, kind)
        white = _white_columns(strip.image)
        assert strip.mask is not None
        if strip.pad_left == strip.pad_right == 0:
            assert not white.any()
            continue
        assert 0 in (strip.pad_left, strip.pad_right), "padding at both ends"
        side = "left" if strip.pad_left else "right"
        padded[side] += 1
        pad = strip.pad_left or strip.pad_right
        assert 160 * WIDTH / 4096 - 1 <= pad <= 1238 * WIDTH / 4096 + 1
        expected = np.zeros(WIDTH, dtype=bool)
        if side == "left":
            expected[:pad] = True
        else:
            expected[WIDTH - pad :] = True
        assert np.array_equal(white, expected), "pure white columns must be exactly the padding"
        # Beyond the padding: the ragged bright fabric edge (over 10 px wide), then the margin.
        edge = pad + 10 + synth.EDGE_MARGIN
        margin = slice(0, edge) if side == "left" else slice(WIDTH - edge, WIDTH)
        assert not strip.mask[:, margin].any()
        assert not strip.valid[:, margin].any()
        # The fabric edge is ragged and bright, as in AITEX: partly white columns next to it.
        beside = strip.image[:, pad] if side == "left" else strip.image[:, WIDTH - pad - 1]
        assert beside.mean() > strip.clean[:, WIDTH // 2].mean()
    assert padded["left"] > 0 and padded["right"] > 0
    assert strips / 6 <= padded["left"] + padded["right"] <= strips / 2


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    first = _generate(tmp_path / "a", seed=7)
    second = _generate(tmp_path / "b", seed=7)
    third = _generate(tmp_path / "c", seed=8)
    files_a, files_b, files_c = _files(first.out), _files(second.out), _files(third.out)
    assert files_a == files_b
    assert set(files_a) != set(files_c) or files_a != files_c
    normal_a = sorted(k for k in files_a if k.startswith("NoDefect_images"))
    normal_c = sorted(k for k in files_c if k.startswith("NoDefect_images"))
    assert all(files_a[a] != files_c[c] for a, c in zip(normal_a, normal_c, strict=True))


def test_strips_of_one_fabric_differ_but_look_alike() -> None:
    rng = np.random.default_rng(3)
    params = sample_fabric_params(rng)
    one, two = (make_fabric(np.random.default_rng(k), params, HEIGHT, WIDTH) for k in (1, 2))
    assert not np.array_equal(one, two)
    assert abs(float(one.mean()) - float(two.mean())) < 8
    assert abs(float(one.std()) - float(two.std())) < 5


@pytest.mark.parametrize("seed", range(12))
def test_fabric_is_a_low_contrast_grey_weave(seed: int) -> None:
    rng = np.random.default_rng(seed)
    params = sample_fabric_params(rng)
    assert params.weave in WEAVES
    assert 2.5 <= params.warp_period <= 12 and 2.5 <= params.weft_period <= 12
    image = make_fabric(rng, params, HEIGHT, WIDTH)
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH)
    assert 60 <= image.mean() <= 150
    assert 5 <= image.std() <= 35
    assert (image == 255).mean() < 1e-3
    # A weave repeats: the spectrum has a clear peak away from the slow illumination drift.
    spectrum = np.abs(np.fft.rfft2(image.astype(float) - image.mean()))
    spectrum[:4, :4] = 0
    assert spectrum.max() > 20 * np.median(spectrum)


def test_rerun_replaces_an_earlier_output(tmp_path: Path) -> None:
    out = tmp_path / "data"
    _generate(out, fabrics=2, normal=3, defective=3)
    summary = _generate(out, fabrics=1, normal=1, defective=1)
    on_disk = {p for p in out.rglob("*.png")}
    assert on_disk == set(summary.files)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fabrics": 0},
        {"fabrics": 21},
        {"normal": -1},
        {"defective": -1},
        {"normal": 0, "defective": 0},
        {"width": 63},
        {"height": 10},
        {"seed": -1},
        {"fabrics": 20, "normal": 400, "defective": 100},
    ],
)
def test_bad_arguments_raise_a_one_line_value_error(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]+$"):
        _generate(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        _generate(a_file)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        _generate(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_add_defect_rejects_unknown_kind_and_nowhere_to_go() -> None:
    image = np.full((64, 64), 100, dtype=np.uint8)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect kind"):
        add_defect(rng, image, "999")
    with pytest.raises(ValueError, match="no valid pixel"):
        add_defect(rng, image, "019", np.zeros(image.shape, dtype=bool))


def test_progress_bar_is_silent_when_disabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _generate(tmp_path / "data", fabrics=1, normal=1, defective=1)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
