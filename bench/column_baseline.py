"""A fleet trained without the column baseline, given one (or none), recalibrated: the same
networks scored with and without it (a paired comparison: same weights, same split).

    python -m bench.column_baseline --fleet runs/fleet-a --data runs/hall/fit --out runs/fleet-a-cb
    loomwatch evaluate --model-uri runs/fleet-a-cb --data runs/hall/test --split all ...

For every fabric of ``--fleet`` it learns the column baseline (:mod:`models.baseline`) from the
maps of the training images that fabric's model was fitted on (the split its manifest records,
as ``loomwatch train`` does), or with ``--without`` removes it, then re-fits the operating point
on the same validation split (``loomwatch calibrate --split test``: the same held-back
defect-free strips, the same rule) and writes a fleet manifest beside the bundles, so that
``evaluate`` judges them as it would a fleet that ``train`` wrote. Prints each fabric's
baseline and its raw image thresholds before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.fleet_variant import rewrite_fleet
from models.pipeline import Detector
from training.data import load_dataset, split_dataset
from training.recalibrate import Recalibration, write_recalibrated
from training.train import with_column_baseline


def rebased_bundle(source: Path, data: Path, fabric: str, out: Path, without: bool) -> Path:
    """Write ``source`` at ``out`` with a column baseline learned from its own training images
    in ``data`` (or with none when ``without``); its calibration is to be re-fitted."""
    detector = Detector.from_bundle(source)
    manifest = detector.manifest
    training = manifest.training
    split = split_dataset(
        load_dataset(data, fabric=fabric),
        training.get("val_fraction", 0.3),
        training.get("seed", 0),
    )
    if without:
        pipeline = manifest.pipeline.model_copy(update={"column_baseline": None})
    else:
        pipeline = with_column_baseline(detector, list(split.train), learn=True)
    updated = manifest.model_copy(update={"pipeline": pipeline})
    return write_recalibrated(source, out, updated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the data the fleet trained on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--without", action="store_true", help="remove the baseline instead")
    args = parser.parse_args(argv)

    def change(source: Path, fabric: str, staged: Path) -> Path:
        return rebased_bundle(source, args.data, fabric, staged, args.without)

    def report(fabric: str, result: Recalibration) -> None:
        baseline = result.manifest.pipeline.column_baseline
        level = (
            "none"
            if baseline is None
            else f"{np.min(baseline.values):.4f}-{np.max(baseline.values):.4f}"
        )
        before = result.before.image_threshold
        after = result.manifest.calibration.image_threshold
        print(
            f"{fabric}: baseline {level}; raw image threshold {before:.4f} -> {after:.4f}"
            f" -> {result.folder}",
            flush=True,
        )

    extra = {"rebased_from": str(args.fleet)}
    rewrite_fleet(args.fleet, args.data, args.out, change, extra, report)


if __name__ == "__main__":
    main()
