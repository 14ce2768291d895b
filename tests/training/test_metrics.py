"""Metrics against values worked out by hand on tiny arrays (the working is in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.metrics import (
    EvaluationAccumulator,
    ImageRecord,
    _BottomK,
    aupro,
    f1_max,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    to_jsonable,
)


def row(*values: float) -> np.ndarray:
    """A 1 x N image."""
    return np.array([values], dtype=np.float64)


# --------------------------------------------------------------------------- image level


def test_image_auroc_by_hand() -> None:
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats 0.1 only, 0.8 beats both,
    # so 3 of the 4 (positive, negative) pairs are ordered correctly: 3/4.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A tie counts one half.
    assert image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_image_auroc_is_nan_with_one_class_or_none() -> None:
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(image_auroc([1, 1], [0.1, 0.2]))
    assert math.isnan(image_auroc([], []))


def test_image_auroc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_f1_max_by_hand() -> None:
    # labels 0 1 1 0 1, scores .1 .9 .6 .7 .3; predict anomalous when score >= t:
    #   t=.9: TP1 FP0 FN2 -> P=1   R=1/3 F1=.5
    #   t=.7: TP1 FP1 FN2 -> P=1/2 R=1/3 F1=.4
    #   t=.6: TP2 FP1 FN1 -> P=2/3 R=2/3 F1=2/3
    #   t=.3: TP3 FP1 FN0 -> P=3/4 R=1   F1=6/7  <- best
    #   t=.1: TP3 FP2 FN0 -> P=3/5 R=1   F1=3/4
    best, threshold = f1_max([0, 1, 1, 0, 1], [0.1, 0.9, 0.6, 0.7, 0.3])
    assert best == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.3)


def test_f1_max_without_positives_is_nan() -> None:
    best, threshold = f1_max([0, 0], [0.1, 0.2])
    assert math.isnan(best) and math.isnan(threshold)


# --------------------------------------------------------------------------- pixel level


def test_pixel_auroc_uses_only_valid_pixels_by_hand() -> None:
    # Image A (2x3): defects at (0,0)=.9 and (1,1)=.6; (1,2)=.95 is invalid and must not count.
    # Image B (1x2, another shape): defect .7, normal .3.
    # Valid positives {.9, .6, .7}, negatives {.2, .8, .1, .3}:
    #   .9 beats 4, .6 beats 3 (.2 .1 .3), .7 beats 3 -> 10 of 12 pairs = 5/6.
    # (Were .95 counted as a negative it would beat every positive: 10/15.)
    masks = [np.array([[1, 0, 0], [0, 1, 0]]), np.array([[1, 0]])]
    maps = [np.array([[0.9, 0.2, 0.8], [0.1, 0.6, 0.95]]), row(0.7, 0.3)]
    valids = [np.array([[1, 1, 1], [1, 1, 0]], bool), np.ones((1, 2), bool)]
    assert pixel_auroc(masks, maps, valids) == pytest.approx(10 / 12)
    assert pixel_auroc(masks, maps) == pytest.approx(10 / 15)


def test_pixel_ap_by_hand() -> None:
    # Scores descending .9(+) .8(-) .7(+) .1(-): AP = sum over positives of precision at its rank
    # times the recall step = 1 * 1/2 + 2/3 * 1/2 = 5/6.
    assert pixel_ap([row(1, 0, 1, 0)], [row(0.9, 0.8, 0.7, 0.1)]) == pytest.approx(5 / 6)


def test_aupro_by_hand_two_regions_of_different_size() -> None:
    # 1x6: mask 1 1 0 0 0 1 -> regions {0,1} (size 2) and {5} (size 1); negatives .1 .3 .4.
    # scores .9 .2 .1 .3 .4 .8. Thresholds descending (FPR, PRO):
    #   .9: (0, mean(1/2, 0) = .25)   .8: (0, .75)   .4: (1/3, .75)   .3: (2/3, .75)
    #   .2: (2/3, 1)                  .1: (1, 1)
    # Limit 1:  area = .75 * 2/3 + 1 * 1/3 = 5/6.
    # Limit .5: area = .75 * .5 = .375, normalised by .5 -> .75.
    masks, maps = [row(1, 1, 0, 0, 0, 1)], [row(0.9, 0.2, 0.1, 0.3, 0.4, 0.8)]
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(5 / 6)
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx(0.75)


def test_aupro_interpolates_at_the_limit_by_hand() -> None:
    # 1x4: mask 1 1 0 0 (one region of 2), scores .5 .9 .5 .1.
    #   .9: (FPR 0, PRO .5); .5 ties a defect and a normal pixel: (.5, 1); .1: (1, 1).
    # The tie is a straight segment from (0, .5) to (.5, 1), so PRO(.25) = .75 and the area up to
    # .25 is .25 * (.5 + .75) / 2 = .15625, normalised by .25 -> .625.
    assert aupro([row(1, 1, 0, 0)], [row(0.5, 0.9, 0.5, 0.1)], fpr_limit=0.25) == pytest.approx(
        0.625
    )


def test_aupro_regions_are_8_connected_by_hand() -> None:
    # 3x3 mask with (0,0) touching (1,1),(1,2) only diagonally: one 8-connected region of 3.
    # (0,0)=.9, the other two defect pixels .1, the six normal pixels .5.
    #   .9: (0, 1/3)   .5: (1, 1/3)   .1: (1, 1)  -> area up to FPR 1 = 1/3.
    # With 4-connectivity it would be two regions, PRO(.9) = mean(1, 0) = .5, area .5.
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    scores = np.full((3, 3), 0.5)
    scores[0, 0], scores[1, 1], scores[1, 2] = 0.9, 0.1, 0.1
    assert aupro([mask], [scores], fpr_limit=1.0) == pytest.approx(1 / 3)


def test_aupro_averages_regions_not_pixels_across_images_by_hand() -> None:
    # A: mask 1 1 1 0, scores .9 .9 .9 .1 (region of 3);  B: mask 1 0, scores .2 .5 (region of 1).
    # Negatives .1 and .5.
    #   .9: (0, mean(1, 0) = .5)   .5: (.5, .5)   .2: (.5, 1)   .1: (1, 1)
    # Area up to 1 = .5 * .5 + 1 * .5 = .75 (pixel-weighted overlap would give 3/4 at .9, not .5).
    masks = [row(1, 1, 1, 0), row(1, 0)]
    maps = [row(0.9, 0.9, 0.9, 0.1), row(0.2, 0.5)]
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_regions_are_cut_by_invalid_pixels_by_hand() -> None:
    # 1x5: mask 1 1 1 0 0 with the middle defect pixel invalid -> regions {0} and {2}, size 1 each.
    # scores .9 (0) .1 .5 .3: .9: (0, .5)   .5: (.5, .5)   .3: (1, .5)   .1: (1, 1) -> area .5.
    # (Were the invalid pixel counted, one region of 3 would give PRO 1/3 and area 1/3.)
    valid = np.array([[1, 0, 1, 1, 1]], bool)
    value = aupro([row(1, 1, 1, 0, 0)], [row(0.9, 0.0, 0.1, 0.5, 0.3)], [valid], fpr_limit=1.0)
    assert value == pytest.approx(0.5)


def test_perfect_and_inverted_detectors() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:5] = 255
    mask[6, 6] = 255
    perfect = mask / 255.0
    assert aupro([mask], [perfect]) == pytest.approx(1.0)
    assert pixel_auroc([mask], [perfect]) == pytest.approx(1.0)
    assert pixel_ap([mask], [perfect]) == pytest.approx(1.0)
    assert aupro([mask], [1.0 - perfect]) == pytest.approx(0.0)


def test_undefined_pixel_metrics_are_nan() -> None:
    clean = [np.zeros((2, 2))]
    scores = [np.ones((2, 2))]
    assert math.isnan(pixel_auroc(clean, scores))
    assert math.isnan(pixel_ap(clean, scores))
    assert math.isnan(aupro(clean, scores))
    assert math.isnan(aupro([np.ones((2, 2))], scores))
    assert math.isnan(pixel_auroc([], []))


def test_pixel_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([np.eye(2)], [np.full((2, 2), np.nan)])
    with pytest.raises(ValueError, match="one entry per image"):
        pixel_auroc([np.eye(2)], [])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([np.eye(2)], [np.eye(2)], fpr_limit=0.0)


def random_images(
    seed: int, count: int = 4, shape: tuple[int, int] = (40, 60)
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks, maps, valids = [], [], []
    for index in range(count):
        height, width = shape[0] + index, shape[1] - 2 * index
        mask = np.zeros((height, width), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, height - 6), rng.integers(0, width - 6)
            mask[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = 1
        valid = np.ones((height, width), bool)
        valid[:, width - 5 :] = False  # padding at one end
        maps.append(rng.random((height, width)).astype(np.float32) + 0.5 * mask)
        masks.append(mask)
        valids.append(valid)
    return masks, maps, valids


def test_subsampling_above_the_cap_is_deterministic_and_close() -> None:
    masks, maps, valids = random_images(seed=1, count=6)
    exact = [f(masks, maps, valids) for f in (pixel_auroc, pixel_ap, aupro)]
    capped = [f(masks, maps, valids, max_pixels=4000) for f in (pixel_auroc, pixel_ap, aupro)]
    again = [f(masks, maps, valids, max_pixels=4000) for f in (pixel_auroc, pixel_ap, aupro)]
    other_seed = pixel_auroc(masks, maps, valids, max_pixels=4000, seed=1)
    assert capped == again
    assert other_seed != capped[0]
    assert capped != exact
    np.testing.assert_allclose(capped, exact, atol=0.03)


def test_bottom_k_keeps_the_smallest_keys_while_capacity_shrinks() -> None:
    rng = np.random.default_rng(0)
    sample = _BottomK()
    chunks = [rng.integers(0, 2**32, size=n, dtype=np.uint32) for n in (50, 300, 7, 400, 120)]
    capacities = [100, 90, 90, 60, 60]
    for keys, capacity in zip(chunks, capacities, strict=True):
        sample.add(keys, (keys.astype(np.int64),), capacity)
    (kept,) = sample.sample(60)
    assert sample.seen == 877
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.concatenate(chunks))[:60])


# --------------------------------------------------------------------------- accumulator


def record(
    name: str, label: int, score: float, defect: str | None = None, decision: bool = False
) -> ImageRecord:
    return ImageRecord(
        name=name,
        label=label,
        defect=defect,
        score=score,
        normalized_score=score / 2,
        decision=decision,
        has_mask=label == 1,
    )


def test_accumulator_equals_the_exact_functions_on_small_inputs() -> None:
    masks, maps, valids = random_images(seed=2, count=4)
    masks[3][:] = 0  # a defect-free image
    accumulator = EvaluationAccumulator()
    for index in range(3):
        accumulator.add_image(
            record(f"d{index}", 1, 1.0 + index), maps[index], masks[index], valids[index]
        )
    # Defect-free without a mask: its pixels are all normal.
    accumulator.add_image(record("ok", 0, 0.5), maps[3], None, valids[3])
    # Defective without a mask: image level only.
    accumulator.add_image(record("nomask", 1, 0.2), np.ones((5, 5)), None, None)

    result = accumulator.compute()
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps, valids), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(pixel_ap(masks, maps, valids), abs=1e-12)
    assert result["aupro"] == pytest.approx(aupro(masks, maps, valids), abs=1e-12)
    # Images: scores 1, 2, 3 (defective), .5 (clean), .2 (defective): 3 of 4 pairs -> .75.
    assert result["image_auroc"] == pytest.approx(0.75)
    assert "strip_auroc" not in result
    assert result["n_images"] == 5 and result["n_anomalous"] == 4
    assert result["n_tiles"] == 0
    assert result["n_pixels"] == result["n_pixels_used"] == sum(int(v.sum()) for v in valids)
    assert set(accumulator.curves()) == {"image", "pixel"}


def test_accumulator_stays_within_max_pixels() -> None:
    masks, maps, valids = random_images(seed=3, count=5)
    accumulator = EvaluationAccumulator(max_pixels=3000, seed=7)
    for index in range(5):
        accumulator.add_image(
            record(f"d{index}", 1, index), maps[index], masks[index], valids[index]
        )
        assert accumulator._pixels._negatives.stored <= 2 * 3000
    result = accumulator.compute()
    assert result["n_pixels_used"] == 3000 < result["n_pixels"]
    assert result["pixel_auroc"] == pytest.approx(
        pixel_auroc(masks, maps, valids, max_pixels=3000, seed=7), abs=1e-12
    )
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps, valids), abs=0.03)


def test_accumulator_tiles_by_hand() -> None:
    # Image 4 x 12, columns 10..11 padding. Tiles (4x4): [0:4], [4:8], [8:12], [12:16].
    #   [0:4]  defect pixel at (1,2)                    -> anomalous, score .9
    #   [4:8]  nothing                                  -> normal, score .8
    #   [8:12] defect only at (0,11), which is padding  -> normal (valid part clean), score .95
    #   [12:16] outside the image                       -> no valid pixel: left out
    # Second image, clean, no mask, one tile [0:4] score .1 -> normal.
    # Third image, defective but no mask: its tile cannot be labelled -> left out.
    # Fourth image, defective with an all-zero mask: treated as having no mask -> left out.
    # Tiles: anomalous {.9}, normal {.8, .95, .1}: .9 beats 2 of 3 -> tile AUROC 2/3.
    # Strips: defective 2.0, .3 and .3 against clean 1.0 -> 1 of 3 pairs -> 1/3.
    valid = np.ones((4, 12), bool)
    valid[:, 10:] = False
    mask = np.zeros((4, 12), bool)
    mask[1, 2] = mask[0, 11] = True
    boxes = [(0, 0, 4, 4), (0, 4, 4, 8), (0, 8, 4, 12), (0, 12, 4, 16)]
    accumulator = EvaluationAccumulator()
    accumulator.add_image(
        record("a", 1, 2.0, "002"), np.zeros((4, 12)), mask, valid, boxes, [0.9, 0.8, 0.95, 0.99]
    )
    accumulator.add_image(record("b", 0, 1.0), None, None, None, [(0, 0, 4, 4)], [0.1])
    accumulator.add_image(record("c", 1, 0.3, "002"), None, None, None, [(0, 0, 4, 4)], [0.7])
    empty = np.zeros((4, 12), bool)
    accumulator.add_image(record("z", 1, 0.3, "002"), None, empty, None, [(0, 0, 4, 4)], [0.6])
    result = accumulator.compute()
    assert result["n_tiles"] == 4 and result["n_anomalous_tiles"] == 1
    assert result["image_auroc"] == pytest.approx(2 / 3)
    assert result["strip_auroc"] == pytest.approx(1 / 3)
    # F1 over tiles: t=.95 -> 0; t=.9 -> P 1/2 R 1 -> 2/3; t=.8 -> P 1/3 -> 1/2; best 2/3 at .9.
    assert result["f1_max"] == pytest.approx(2 / 3)
    assert result["f1_max_threshold"] == pytest.approx(0.9)
    assert set(accumulator.curves()) == {"strip", "tile", "pixel"}


def test_accumulator_rejects_bad_images_and_stays_unchanged() -> None:
    accumulator = EvaluationAccumulator()
    with pytest.raises(ValueError, match="tile"):
        accumulator.add_image(record("a", 0, 1.0), None, None, None, [(0, 0, 1, 1)], [])
    with pytest.raises(ValueError, match="shape"):
        accumulator.add_image(record("b", 1, 1.0), np.zeros((2, 3)), np.zeros((2, 2)), None)
    with pytest.raises(ValueError, match="NaN"):
        accumulator.add_image(record("c", 1, 1.0), np.full((2, 2), np.nan), np.eye(2), None)
    assert accumulator.records == ()
    assert accumulator.compute()["n_pixels"] == 0


def test_per_defect_by_hand() -> None:
    # "002": scores 3 (detected) and 1 (missed) against clean .5 and 2 -> pairs 3>.5, 3>2, 1>.5,
    # 1<2 -> AUROC 3/4; mean normalised score (1.5 + .5) / 2 = 1.
    # "006": score 4 (detected), beats both clean -> AUROC 1.
    # Defect-free: 2 images, one false alarm (decision True).
    accumulator = EvaluationAccumulator()
    for name, label, score, code, decision in [
        ("a", 1, 3.0, "002", True),
        ("b", 1, 1.0, "002", False),
        ("c", 1, 4.0, "006", True),
        ("d", 0, 0.5, None, False),
        ("e", 0, 2.0, None, True),
    ]:
        accumulator.add_image(record(name, label, score, code, decision), None, None, None)
    rows = {row["defect"]: row for row in accumulator.per_defect()}
    assert list(rows) == ["002", "006", "defect-free"]
    assert rows["002"]["n"] == 2 and rows["002"]["detected"] == 1
    assert rows["002"]["detection_rate"] == pytest.approx(0.5)
    assert rows["002"]["mean_normalized_score"] == pytest.approx(1.0)
    assert rows["002"]["auroc"] == pytest.approx(0.75)
    assert rows["006"]["auroc"] == pytest.approx(1.0)
    assert rows["defect-free"]["n"] == 2 and rows["defect-free"]["detected"] == 1
    assert math.isnan(rows["defect-free"]["auroc"])
    # No map anywhere: the pixel metrics are undefined, and JSON gets null for them.
    result = accumulator.compute()
    assert math.isnan(result["pixel_auroc"]) and math.isnan(result["aupro"])
    decoded = json.loads(json.dumps(to_jsonable(result), allow_nan=False))
    assert decoded["pixel_auroc"] is None
    assert decoded["image_auroc"] == pytest.approx(5 / 6)  # 3>.5,3>2,1>.5,4>.5,4>2; 1<2


def test_to_jsonable_converts_numpy_and_non_finite_values() -> None:
    value = {"a": np.float32(0.5), "b": [float("inf"), np.int64(3)], "c": np.array([1.0, np.nan])}
    assert to_jsonable(value) == {"a": 0.5, "b": [None, 3], "c": [1.0, None]}


def test_clean_vs_defect_tile_auroc_leaves_out_normal_tiles_of_defective_images() -> None:
    # Defective image: tile A (defect, score 5), tile B (no defect, score 9).
    # Clean image: tiles C (score 1) and D (score 2).
    # All tiles: positives {5}, negatives {9, 1, 2} -> 2 of 3 pairs ranked right = 0.667.
    # Clean vs defect: positives {5}, negatives {1, 2} -> 1.0.
    acc = EvaluationAccumulator()
    mask = np.zeros((4, 8), bool)
    mask[1, 1] = True
    boxes = [(0, 0, 4, 4), (0, 4, 4, 8)]
    defective = ImageRecord("d", 1, "019", 9.0, 0.9, True, True)
    clean = ImageRecord("c", 0, None, 2.0, 0.2, False, False)
    acc.add_image(defective, np.zeros((4, 8)), mask, np.ones((4, 8), bool), boxes, [5.0, 9.0])
    acc.add_image(clean, np.zeros((4, 8)), None, np.ones((4, 8), bool), boxes, [1.0, 2.0])
    result = acc.compute()
    assert result["image_auroc"] == pytest.approx(2 / 3)
    assert result["tile_auroc_clean_vs_defect"] == pytest.approx(1.0)
