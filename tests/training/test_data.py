"""Dataset loading (AITEX quirks, MVTec AD, plain folders), splits and fingerprints.

Every test writes its own tiny PNGs under tmp_path; one test reads the real AITEX development
strips (``LOOMWATCH_AITEX_DIR``, else ../shared/data/aitex-dev) and is skipped when they are absent.
"""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import ImageDecodeError
from tests.helpers import real_aitex
from training.data import (
    Dataset,
    DatasetError,
    Sample,
    detect_layout,
    evenly_spread,
    fingerprint,
    has_pixel_labels,
    load_dataset,
    load_image,
    load_mask,
    split_dataset,
)

SHAPE = (8, 24)  # tiny strips: H x W


def _write(path: Path, array: np.ndarray | None = None, mode: str = "L") -> Path:
    """Write a small image; grey fabric by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.full(SHAPE, 120, dtype=np.uint8)
    if mode == "LA":
        alpha = np.full(array.shape, 255, dtype=np.uint8)
        alpha[0, :] = 40  # a partly transparent row, as in the AITEX LA files
        Image.fromarray(np.dstack([array, alpha]), mode="LA").save(path)
    else:
        Image.fromarray(array).save(path)
    return path


def _mask(*boxes: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    for top, bottom, left, right in boxes:
        mask[top:bottom, left:right] = value
    return mask


def _aitex(root: Path) -> Path:
    """A small AITEX tree: fabrics 00 and 02, one roll folder each."""
    _write(root / "Defect_images" / "0001_002_00.png")
    _write(root / "Mask_images" / "0001_002_00_mask.png", _mask((1, 3, 2, 5)))
    _write(root / "Defect_images" / "0010_019_02.png")
    _write(root / "Mask_images" / "0010_019_02_mask.png", _mask((4, 6, 10, 12)))
    for index in range(1, 4):
        _write(root / "NoDefect_images" / "2311694-2040n7u" / f"000{index}_000_00.png")
        _write(root / "NoDefect_images" / "2306894-210033u" / f"000{index}_000_02.png")
    return root


def _by_name(dataset: Dataset) -> dict[str, Sample]:
    return {sample.name: sample for sample in dataset.samples}


def _mvtec_category(root: Path) -> Path:
    _write(root / "train" / "good" / "000.png")
    _write(root / "train" / "good" / "001.png")
    _write(root / "train" / "good" / "002.png")
    _write(root / "test" / "good" / "000.png")
    _write(root / "test" / "crack" / "000.png")
    _write(root / "test" / "hole" / "000.png")
    _write(root / "ground_truth" / "crack" / "000_mask.png", _mask((0, 2, 0, 2)))
    _write(root / "ground_truth" / "hole" / "000_mask.png", _mask((5, 8, 20, 24)))
    return root


# --- layout detection and user-facing errors -------------------------------------------------


def test_detect_layout_recognises_the_three_layouts(tmp_path: Path) -> None:
    assert detect_layout(_aitex(tmp_path / "aitex")) == "aitex"
    assert detect_layout(_mvtec_category(tmp_path / "mvtec" / "carpet").parent) == "mvtec"
    assert detect_layout(tmp_path / "mvtec" / "carpet") == "mvtec"
    _write(tmp_path / "plain" / "normal" / "a.png")
    assert detect_layout(tmp_path / "plain") == "folder"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: _write(root / "file.png"), "is not a folder"),
        (lambda root: (root / "other" / "stuff").mkdir(parents=True) or root / "other", "layout"),
    ],
)
def test_unusable_paths_raise_one_line_dataset_errors(
    tmp_path: Path, make: object, message: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset(path)
    assert "\n" not in str(error.value)
    assert str(path) in str(error.value)


def test_layout_without_images_raises(tmp_path: Path) -> None:
    (tmp_path / "Defect_images").mkdir()
    (tmp_path / "NoDefect_images" / "roll").mkdir(parents=True)
    (tmp_path / "NoDefect_images" / "roll" / "notes.txt").write_text("no pixels here")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path)


def test_unknown_or_mismatched_layout_argument_raises(tmp_path: Path) -> None:
    _aitex(tmp_path)
    with pytest.raises(DatasetError, match="unknown data layout"):
        load_dataset(tmp_path, layout="kitti")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path, layout="mvtec")


# --- AITEX -------------------------------------------------------------------------------------


def test_aitex_samples_carry_label_defect_fabric_and_masks(tmp_path: Path) -> None:
    dataset = load_dataset(_aitex(tmp_path))

    assert dataset.layout == "aitex"
    assert dataset.root == tmp_path
    assert len(dataset.anomalous) == 2
    assert len(dataset.normal) == 6
    assert dataset.fabrics == ("00", "02")
    samples = _by_name(dataset)
    defective = samples["0010_019_02"]
    assert (defective.label, defective.defect, defective.fabric, defective.subset) == (
        1,
        "019",
        "02",
        None,
    )
    assert defective.masks == (tmp_path / "Mask_images" / "0010_019_02_mask.png",)
    assert has_pixel_labels(defective)
    clean = samples["0002_000_00"]
    assert (clean.label, clean.defect, clean.fabric, clean.masks) == (0, None, "00", ())
    assert not has_pixel_labels(clean)


def test_aitex_folder_names_match_case_insensitively(tmp_path: Path) -> None:
    # Quirk 1: the original download spells it NODefect_images.
    _write(tmp_path / "Defect_images" / "0001_002_00.png")
    _write(tmp_path / "mask_images" / "0001_002_00_mask.png", _mask((0, 1, 0, 1)))
    _write(tmp_path / "NODefect_images" / "2311694-2040n7u" / "0001_000_00.png")

    dataset = load_dataset(tmp_path)

    assert [s.name for s in dataset.normal] == ["0001_000_00"]
    assert len(dataset.anomalous[0].masks) == 1


def test_aitex_is_found_below_an_extra_folder_level(tmp_path: Path) -> None:
    _aitex(tmp_path / "AITEX_unpacked")

    dataset = load_dataset(tmp_path)

    assert dataset.layout == "aitex"
    assert len(dataset.samples) == 8


def test_aitex_defect_image_in_unused_subfolder_is_found(tmp_path: Path) -> None:
    _aitex(tmp_path)
    odd = _write(tmp_path / "Defect_images" / "unused" / "0044_019_04.png")
    _write(tmp_path / "Mask_images" / "0044_019_04_mask.png", _mask((0, 2, 0, 2)))

    sample = _by_name(load_dataset(tmp_path))["0044_019_04"]

    assert sample.image == odd
    assert (sample.label, sample.defect, sample.fabric) == (1, "019", "04")
    assert len(sample.masks) == 1


def test_grey_mask_edges_are_binarised_above_127(tmp_path: Path) -> None:
    # Quirk 2: anti-aliased masks.
    grey = np.zeros(SHAPE, dtype=np.uint8)
    grey[0, :4] = [127, 128, 200, 255]
    grey[1, :2] = [60, 10]
    _write(tmp_path / "Defect_images" / "0001_002_00.png")
    _write(tmp_path / "Mask_images" / "0001_002_00_mask.png", grey)

    mask = load_mask(load_dataset(tmp_path).samples[0], SHAPE)

    assert mask.dtype == bool
    assert mask.shape == SHAPE
    assert mask[0, :4].tolist() == [False, True, True, True]
    assert int(mask.sum()) == 3


def test_la_mode_images_and_masks_load_as_8_bit_grey(tmp_path: Path) -> None:
    # Quirk 3: grey + alpha files; the mask lives in the grey channel, not in the alpha.
    texture = np.tile(np.arange(SHAPE[1], dtype=np.uint8) * 10, (SHAPE[0], 1))
    _write(tmp_path / "Defect_images" / "0043_019_04.png", texture, mode="LA")
    _write(tmp_path / "Mask_images" / "0043_019_04_mask.png", _mask((2, 4, 5, 9)), mode="LA")
    sample = load_dataset(tmp_path).samples[0]

    image = load_image(sample)
    mask = load_mask(sample, image.shape)

    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, texture)
    assert int(mask.sum()) == 2 * 4
    assert mask[2:4, 5:9].all()


def test_several_masks_per_image_are_combined_with_or(tmp_path: Path) -> None:
    # Quirk 4: <stem>_mask1.png, <stem>_mask2.png (and a plain <stem>_mask.png) are one label.
    _write(tmp_path / "Defect_images" / "0005_010_03.png")
    masks = tmp_path / "Mask_images"
    _write(masks / "0005_010_03_mask2.png", _mask((5, 7, 0, 3)))
    _write(masks / "0005_010_03_mask10.png", _mask((0, 1, 20, 24)))
    _write(masks / "0005_010_03_mask1.png", _mask((0, 2, 0, 3)))
    _write(masks / "0005_010_03_mask.png", _mask((3, 4, 10, 11)))
    _write(masks / "0005_010_033_mask.png", _mask((7, 8, 0, 24)))  # another image's mask

    sample = load_dataset(tmp_path).samples[0]
    mask = load_mask(sample, SHAPE)

    assert [path.name for path in sample.masks] == [
        "0005_010_03_mask.png",
        "0005_010_03_mask1.png",
        "0005_010_03_mask2.png",
        "0005_010_03_mask10.png",
    ]
    expected = (_mask((5, 7, 0, 3), (0, 1, 20, 24), (0, 2, 0, 3), (3, 4, 10, 11))) > 0
    np.testing.assert_array_equal(mask, expected)


def test_defect_image_without_mask_is_image_level_only(tmp_path: Path) -> None:
    # Quirk 5: 0100_025_08 has no mask at all.
    _aitex(tmp_path)
    _write(tmp_path / "Defect_images" / "0100_025_08.png")

    sample = _by_name(load_dataset(tmp_path))["0100_025_08"]

    assert sample.masks == ()
    assert sample.label == 1
    assert not has_pixel_labels(sample)
    mask = load_mask(sample, SHAPE)
    assert mask.shape == SHAPE
    assert not mask.any()


def test_all_zero_mask_loads_as_empty_but_counts_as_pixel_labelled(tmp_path: Path) -> None:
    # Quirk 5: 0106_010_03's mask is all zeros in the original.
    _write(tmp_path / "Defect_images" / "0106_010_03.png")
    _write(tmp_path / "Mask_images" / "0106_010_03_mask.png", _mask())

    sample = load_dataset(tmp_path).samples[0]

    assert has_pixel_labels(sample)
    assert not load_mask(sample, SHAPE).any()


def test_mask_of_another_size_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "Defect_images" / "0001_002_00.png")
    _write(tmp_path / "Mask_images" / "0001_002_00_mask.png", np.zeros((8, 30), np.uint8))
    sample = load_dataset(tmp_path).samples[0]

    with pytest.raises(DatasetError, match=re.escape("0001_002_00_mask.png")) as error:
        load_mask(sample, SHAPE)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("code", ["02", "2", " 02 "])
def test_fabric_selects_one_aitex_fabric(tmp_path: Path, code: str) -> None:
    dataset = load_dataset(_aitex(tmp_path), fabric=code)

    assert dataset.fabrics == ("02",)
    assert len(dataset.anomalous) == 1
    assert len(dataset.normal) == 3


def test_unknown_fabric_lists_the_fabrics_present(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="fabrics present: 00, 02") as error:
        load_dataset(_aitex(tmp_path), fabric="09")
    assert "'09'" in str(error.value)


def test_hidden_files_and_non_images_are_ignored(tmp_path: Path) -> None:
    _aitex(tmp_path)
    (tmp_path / "Defect_images" / "._0001_002_00.png").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "Defect_images" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "NoDefect_images" / "readme.txt").write_text("rolls")
    _write(tmp_path / ".cache" / "Defect_images" / "0099_002_00.png")

    assert len(load_dataset(tmp_path).samples) == 8


def test_unreadable_image_raises_image_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "Defect_images" / "0001_002_00.png"
    path.parent.mkdir()
    path.write_bytes(b"\x89PNG\r\n\x1a\n broken")

    with pytest.raises(ImageDecodeError, match=re.escape("0001_002_00.png")):
        load_image(load_dataset(tmp_path).samples[0])


# --- MVTec AD and plain folders ----------------------------------------------------------


def test_mvtec_category_folder(tmp_path: Path) -> None:
    dataset = load_dataset(_mvtec_category(tmp_path / "carpet"))

    assert dataset.layout == "mvtec"
    assert dataset.fabrics == ("carpet",)
    subsets = sorted((s.subset, s.label, s.defect or "") for s in dataset.samples)
    assert subsets == [
        ("test", 0, ""),
        ("test", 1, "crack"),
        ("test", 1, "hole"),
        ("train", 0, ""),
        ("train", 0, ""),
        ("train", 0, ""),
    ]
    hole = next(s for s in dataset.samples if s.defect == "hole")
    assert hole.masks == (tmp_path / "carpet" / "ground_truth" / "hole" / "000_mask.png",)
    assert load_mask(hole, SHAPE)[5:8, 20:24].all()
    assert all(s.masks == () for s in dataset.normal)


def test_mvtec_root_with_categories_and_selection(tmp_path: Path) -> None:
    _mvtec_category(tmp_path / "carpet")
    _mvtec_category(tmp_path / "grid")
    (tmp_path / "license.txt").write_text("CC BY-NC-SA 4.0")

    assert load_dataset(tmp_path).fabrics == ("carpet", "grid")
    assert {s.fabric for s in load_dataset(tmp_path, fabric="grid").samples} == {"grid"}
    with pytest.raises(DatasetError, match="carpet, grid"):
        load_dataset(tmp_path, fabric="leather")


def test_folder_layout_defect_types_and_masks(tmp_path: Path) -> None:
    _write(tmp_path / "normal" / "n1.png")
    _write(tmp_path / "normal" / "day2" / "n2.JPG")
    _write(tmp_path / "anomalous" / "loose.png")
    _write(tmp_path / "anomalous" / "hole" / "h1.bmp")
    _write(tmp_path / "anomalous" / "stain" / "s1.TIFF")
    _write(tmp_path / "anomalous" / "stain" / "same.png")
    _write(tmp_path / "anomalous" / "hole" / "same.png")
    _write(tmp_path / "masks" / "h1.png", _mask((0, 1, 0, 1)))
    _write(tmp_path / "masks" / "s1_mask1.png", _mask((1, 2, 0, 1)))
    _write(tmp_path / "masks" / "s1_mask2.png", _mask((2, 3, 0, 1)))
    _write(tmp_path / "masks" / "stain" / "same.png", _mask((3, 4, 0, 1)))
    _write(tmp_path / "masks" / "hole" / "same_mask.png", _mask((4, 5, 0, 1)))

    dataset = load_dataset(tmp_path)

    assert dataset.layout == "folder"
    assert sorted(s.name for s in dataset.normal) == ["n1", "n2"]
    defects = {s.image.relative_to(tmp_path).as_posix(): s for s in dataset.anomalous}
    assert defects["anomalous/loose.png"].defect == "anomalous"
    assert defects["anomalous/loose.png"].masks == ()
    assert defects["anomalous/hole/h1.bmp"].defect == "hole"
    assert [p.name for p in defects["anomalous/stain/s1.TIFF"].masks] == [
        "s1_mask1.png",
        "s1_mask2.png",
    ]
    assert defects["anomalous/stain/same.png"].masks == (tmp_path / "masks/stain/same.png",)
    assert defects["anomalous/hole/same.png"].masks == (tmp_path / "masks/hole/same_mask.png",)
    assert all(s.fabric is None and s.subset is None for s in dataset.samples)
    with pytest.raises(DatasetError, match="no fabric"):
        load_dataset(tmp_path, fabric="02")


# --- splits -------------------------------------------------------------------------------


def _clean_dataset(tmp_path: Path, n_normal: int, n_defective: int = 3) -> Dataset:
    for index in range(n_normal):
        _write(tmp_path / "NoDefect_images" / "roll" / f"{index:04d}_000_00.png")
    for index in range(n_defective):
        _write(tmp_path / "Defect_images" / f"{index + 500:04d}_019_00.png")
    return load_dataset(tmp_path)


def test_split_keeps_defects_out_of_training_and_rounds_the_fraction(tmp_path: Path) -> None:
    dataset = _clean_dataset(tmp_path, n_normal=10)

    split = split_dataset(dataset, val_fraction=0.3, seed=0)

    assert all(s.label == 0 for s in split.train)
    assert len(split.train) == 7
    assert len(split.validation) == 3 + 3
    assert set(split.train).isdisjoint(split.validation)
    assert set(split.train) | set(split.validation) == set(dataset.samples)


def test_split_is_deterministic_and_ignores_listing_order(tmp_path: Path) -> None:
    dataset = _clean_dataset(tmp_path, n_normal=20)
    shuffled = list(dataset.samples)
    random.Random(7).shuffle(shuffled)
    reordered = dataclasses.replace(dataset, samples=tuple(shuffled))

    first = split_dataset(dataset, seed=3)

    assert split_dataset(dataset, seed=3) == first
    assert split_dataset(reordered, seed=3) == first
    other_seeds = {frozenset(split_dataset(dataset, seed=s).train) for s in range(1, 6)}
    assert any(train != frozenset(first.train) for train in other_seeds)


@pytest.mark.parametrize(
    ("n_normal", "fraction", "n_val"), [(2, 0.1, 1), (1, 0.9, 0), (4, 0.9, 3), (5, 0.0, 0)]
)
def test_split_validation_count_edge_cases(
    tmp_path: Path, n_normal: int, fraction: float, n_val: int
) -> None:
    split = split_dataset(_clean_dataset(tmp_path, n_normal), val_fraction=fraction)

    assert sum(1 for s in split.validation if s.label == 0) == n_val
    assert len(split.train) == n_normal - n_val


def test_split_without_defect_free_images_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no defect-free"):
        split_dataset(_clean_dataset(tmp_path, n_normal=0))


def test_split_rejects_a_fraction_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="val_fraction"):
        split_dataset(_clean_dataset(tmp_path, n_normal=3), val_fraction=1.0)


def test_mvtec_split_sends_the_whole_test_subset_to_validation(tmp_path: Path) -> None:
    dataset = load_dataset(_mvtec_category(tmp_path / "carpet"))

    split = split_dataset(dataset, val_fraction=0.3)

    assert all(s.subset == "train" and s.label == 0 for s in split.train)
    assert len(split.train) == 2
    test_samples = {s for s in dataset.samples if s.subset == "test"}
    assert test_samples <= set(split.validation)
    assert len(split.validation) == len(test_samples) + 1


# --- fingerprint --------------------------------------------------------------------------


def test_fingerprint_depends_on_files_not_on_order_or_location(tmp_path: Path) -> None:
    dataset = load_dataset(_aitex(tmp_path / "a"))
    value = fingerprint(dataset.samples, dataset.root)

    assert len(value) == 64
    assert fingerprint(reversed(dataset.samples), dataset.root) == value
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = load_dataset(tmp_path / "b")
    assert fingerprint(copy.samples, copy.root) == value


def test_fingerprint_changes_with_sizes_masks_and_membership(tmp_path: Path) -> None:
    dataset = load_dataset(_aitex(tmp_path))
    value = fingerprint(dataset.samples, dataset.root)

    assert fingerprint(dataset.samples[1:], dataset.root) != value
    mask = tmp_path / "Mask_images" / "0001_002_00_mask.png"
    _write(mask, np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8))
    assert fingerprint(dataset.samples, dataset.root) != value


# --- the real AITEX strips ----------------------------------------------------------------


@pytest.mark.realdata
def test_real_aitex_development_strips() -> None:
    real_data = real_aitex()
    dataset = load_dataset(real_data)

    assert dataset.layout == "aitex"
    assert (len(dataset.anomalous), len(dataset.normal)) == (54, 99)
    assert dataset.fabrics == ("00", "01", "02", "03", "04", "05", "06", "08")
    fabric_02 = load_dataset(real_data, fabric="2")
    assert (len(fabric_02.anomalous), len(fabric_02.normal)) == (19, 14)
    unlabelled = [s.name for s in dataset.anomalous if not has_pixel_labels(s)]
    assert unlabelled == ["0100_025_08"]
    for name in ("0043_019_04", "0103_010_03"):  # an LA strip and a large binary mask
        sample = _by_name(dataset)[name]
        image = load_image(sample)
        mask = load_mask(sample, image.shape)
        assert image.shape == mask.shape == (256, 4096)
        assert 0 < mask.sum() < mask.size
    split = split_dataset(fabric_02, seed=0)
    assert (len(split.train), len(split.validation)) == (10, 4 + 19)


def test_evenly_spread_keeps_at_most_the_limit_spread_over_all() -> None:
    """The cap on the fitted-on images scored for the operating point and on the column
    baseline's images: distinct, first and last kept, order kept; fewer are returned whole."""
    samples = [Sample(Path(f"{i:03d}.png"), (), 0, None, None) for i in range(101)]
    chosen = evenly_spread(samples, 50)
    assert len(chosen) == len({s.image for s in chosen}) == 50
    assert chosen[0] is samples[0] and chosen[-1] is samples[-1]
    assert [s.name for s in chosen] == sorted(s.name for s in chosen)
    assert evenly_spread(samples[:7], 50) == samples[:7]
