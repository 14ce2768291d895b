"""A trained fleet given the isolated-peak score (or none), recalibrated: the same networks
scored with and without it (a paired comparison: same weights, same split).

    python -m bench.isolated_peak --fleet runs/fleet-a --data runs/hall/fit --out runs/fleet-a-ip
    loomwatch evaluate --model-uri runs/fleet-a-ip --data runs/hall/test --split all ...

For every fabric of ``--fleet`` it learns the isolated-peak reference (:mod:`models.isolation`)
from the image scores and peak gaps of the defect-free images that fabric's model was fitted on
(the split its manifest records, as ``loomwatch train`` does), or with ``--without`` removes it,
then re-fits the operating point on the same validation split (``loomwatch calibrate --split
test``: the same held-back defect-free strips, the same rule) and writes a fleet manifest beside
the bundles, so that ``evaluate`` judges them as it would a fleet that ``train`` wrote. Prints
each fabric's reference and its raw image thresholds before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.fleet_variant import rewrite_fleet
from models.pipeline import Detector
from training.data import load_dataset, split_dataset
from training.recalibrate import Recalibration, write_recalibrated
from training.train import with_isolated_peak


def peaked_bundle(source: Path, data: Path, fabric: str, out: Path, without: bool) -> Path:
    """Write ``source`` at ``out`` with an isolated-peak reference learned from its own
    training images in ``data`` (or with none when ``without``); its calibration is to be
    re-fitted."""
    detector = Detector.from_bundle(source)
    manifest = detector.manifest
    training = manifest.training
    split = split_dataset(
        load_dataset(data, fabric=fabric),
        training.get("val_fraction", 0.3),
        training.get("seed", 0),
    )
    clean = [sample for sample in split.train if sample.label == 0]
    pipeline = with_isolated_peak(detector, clean, learn=not without)
    updated = manifest.model_copy(update={"pipeline": pipeline})
    return write_recalibrated(source, out, updated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the data the fleet trained on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--without", action="store_true", help="remove the reference instead")
    args = parser.parse_args(argv)

    def change(source: Path, fabric: str, staged: Path) -> Path:
        return peaked_bundle(source, args.data, fabric, staged, args.without)

    def report(fabric: str, result: Recalibration) -> None:
        peak = result.manifest.pipeline.isolated_peak
        reference = (
            "none"
            if peak is None
            else f"score {peak.score_mean:.4f} +- {peak.score_sd:.4f}, gap {peak.gap_mean:.4f}"
            f" +- {peak.gap_sd:.4f} ({peak.images} images)"
        )
        before = result.before.image_threshold
        after = result.manifest.calibration.image_threshold
        print(
            f"{fabric}: {reference}; raw image threshold {before:.4f} -> {after:.4f}"
            f" -> {result.folder}",
            flush=True,
        )

    extra = {"isolated_peak_from": str(args.fleet)}
    rewrite_fleet(args.fleet, args.data, args.out, change, extra, report)


if __name__ == "__main__":
    main()
