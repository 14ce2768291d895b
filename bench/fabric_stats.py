"""What makes one fabric harder than another: per-fabric figures of a data folder, no model.

    python -m bench.fabric_stats [--data DIR] [--json FILE]

For every fabric (AITEX code or MVTec category) of DIR (default: the AITEX folder of
``bench.aitex_dir()``): strips, defective strips and their defect kinds; the defects' sizes
(connected regions of the masks: area and the longer side of their box, px); their contrast (the
mean grey inside a defect against a ring 6-12 px around it, in units of the fabric's own
pixel standard deviation: how far a defect stands out of the weave); the fabric's brightness and
pixel standard deviation on the valid area; and the weave period along x and y (the first peak of
the autocorrelation of the mean-removed valid area, px): the scale a tile and a network see.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from bench import aitex_dir
from models.preprocessing import valid_area
from training.data import Sample, load_dataset, load_image, load_mask


def longest_run(flags: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of True in a 1-d boolean array ((0, 0) when none)."""
    best, start = (0, 0), None
    for index, flag in enumerate([*flags.tolist(), False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            best = max(best, (start, index), key=lambda run: run[1] - run[0])
            start = None
    return best


def weave_period(image: np.ndarray, valid: np.ndarray, axis: int) -> float | None:
    """The lag of the first local maximum of the autocorrelation along ``axis`` (px), on the
    largest fully valid block of the strip; None when there is no clear one below 64 px."""
    start, stop = longest_run(np.asarray(valid.all(axis=0)))
    rows = np.asarray(valid[:, start:stop].all(axis=1))
    first, last = longest_run(rows)
    if stop - start < 128 or last - first < 128:
        return None
    block = image[first:last, start:stop].astype(np.float64)
    block = block - block.mean(axis=axis, keepdims=True)  # each line about its own mean
    spectrum = np.abs(np.fft.rfft(block, n=2 * block.shape[axis], axis=axis)) ** 2
    correlation = np.fft.irfft(spectrum, axis=axis)
    profile = correlation.mean(axis=1 - axis)[:64]
    profile = profile / profile[0]
    for lag in range(2, 63):
        peak = profile[lag] > profile[lag - 1] and profile[lag] >= profile[lag + 1]
        if peak and profile[lag] > 0:
            return float(lag)
    return None


def defect_figures(
    image: np.ndarray, mask: np.ndarray, valid: np.ndarray
) -> list[dict[str, float]]:
    """Area, longer box side and contrast (in fabric standard deviations) of each defect region."""
    fabric = image[valid & ~mask].astype(np.float64)
    spread = float(fabric.std()) or 1.0
    binary = mask.astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    regions = []
    for index in range(1, count):
        region = labels == index
        near = cv2.dilate(region.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool)
        close = cv2.dilate(region.astype(np.uint8), np.ones((13, 13), np.uint8)).astype(bool)
        ring = near & ~close & valid & ~mask
        if not ring.any():
            continue
        inside = float(image[region].mean())
        regions.append({
            "area": float(stats[index, cv2.CC_STAT_AREA]),
            "side": float(max(stats[index, cv2.CC_STAT_WIDTH], stats[index, cv2.CC_STAT_HEIGHT])),
            "contrast": abs(inside - float(image[ring].mean())) / spread,
        })  # fmt: skip
    return regions


def fabric_figures(samples: list[Sample]) -> dict[str, Any]:
    kinds: dict[str, int] = defaultdict(int)
    regions: list[dict[str, float]] = []
    brightness: list[float] = []
    spread: list[float] = []
    period_x: list[float] = []
    period_y: list[float] = []
    for sample in samples:
        image = load_image(sample)
        valid = valid_area(image)
        if not valid.any():
            continue
        fabric = image[valid].astype(np.float64)
        brightness.append(float(fabric.mean()))
        spread.append(float(fabric.std()))
        for axis, periods in ((1, period_x), (0, period_y)):
            period = weave_period(image, valid, axis)
            if period is not None:
                periods.append(period)
        if sample.label == 1:
            kinds[sample.defect or "?"] += 1
            mask = load_mask(sample, image.shape)
            if mask.any():
                regions.extend(defect_figures(image, mask, valid))

    def middle(values: list[float]) -> float | None:
        return round(median(values), 2) if values else None

    return {
        "strips": len(samples),
        "defective": sum(sample.label for sample in samples),
        "defect_kinds": dict(sorted(kinds.items())),
        "regions": len(regions),
        "region_area_median": middle([r["area"] for r in regions]),
        "region_side_median": middle([r["side"] for r in regions]),
        "region_contrast_median": middle([r["contrast"] for r in regions]),
        "regions_below_1_sd": sum(r["contrast"] < 1.0 for r in regions),
        "brightness": middle(brightness),
        "pixel_sd": middle(spread),
        "weave_period_x": middle(period_x),
        "weave_period_y": middle(period_y),
    }


COLUMNS = ["strips", "defective", "regions", "region_area_median", "region_side_median",
           "region_contrast_median", "regions_below_1_sd", "brightness", "pixel_sd",
           "weave_period_x", "weave_period_y"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="data folder (default: AITEX)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    data = args.data or aitex_dir()
    if data is None or not Path(data).is_dir():
        print("fabric_stats: no data folder (give --data DIR)", file=sys.stderr)
        return 2
    dataset = load_dataset(data)
    by_fabric: dict[str, list[Sample]] = defaultdict(list)
    for sample in dataset.samples:
        by_fabric[sample.fabric or "-"].append(sample)
    figures = {
        fabric: fabric_figures(samples)
        for fabric, samples in tqdm(sorted(by_fabric.items()), desc="fabrics", unit="fabric")
    }
    print("fabric " + " ".join(f"{name:>10.10s}" for name in COLUMNS) + "  defect kinds")
    for fabric, row in figures.items():
        cells = " ".join(f"{'-' if row[n] is None else row[n]!s:>10.10s}" for n in COLUMNS)
        kinds = ", ".join(f"{kind}:{count}" for kind, count in row["defect_kinds"].items())
        print(f"{fabric:6s} {cells}  {kinds}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
