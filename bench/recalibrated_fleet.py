"""A trained fleet recalibrated by the current calibration code (or with other calibration
settings), on the same validation split: the same networks judged under two calibrations (a
paired comparison).

    python -m bench.recalibrated_fleet --fleet runs/fleet-a --data runs/hall/fit \
        --out runs/fleet-a-rc [--set smoothing_by=region_f1] [--image-level median]
    loomwatch evaluate --model-uri runs/fleet-a-rc --data runs/hall/test --split all ...

For every fabric of ``--fleet`` it re-fits the operating point and the region settings on the
validation split the fabric's model was trained with (``loomwatch calibrate --split test``: the
same held-back defect-free strips, the same rule unless ``--set`` changes it; ``--image-level``
scores them with that ``pipeline.image_level``) and writes a fleet manifest beside the
bundles. Prints each fabric's image threshold and region settings before and after, with the
pixel AP of each smoothing where it was chosen by pixel AP.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from bench.fleet_variant import rewrite_fleet
from models.bundle import read_manifest
from training.config import ConfigError, parse_override
from training.recalibrate import Recalibration


def copied_bundle(source: Path, fabric: str, staged: Path) -> Path:
    """The bundle unchanged: only its calibration is re-fitted."""
    shutil.copytree(source, staged)
    return staged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the data the fleet trained on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a calibration setting, e.g. smoothing_by=region_f1 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--image-level", choices=("none", "median"), help="score with this pipeline.image_level"
    )
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(text) for text in args.set)
    except ConfigError as exc:
        parser.error(str(exc))

    def report(fabric: str, result: Recalibration) -> None:
        before = read_manifest(Path(args.fleet) / fabric)
        after = result.manifest
        regions = after.calibration.evidence.get("regions", {})

        def settings(manifest: Any) -> str:
            s = manifest.suppression
            return f"sigma {s.get('smoothing_sigma')}, area {s.get('min_region_area')}"

        print(
            f"{fabric}: raw image threshold {before.calibration.image_threshold:.4f} -> "
            f"{after.calibration.image_threshold:.4f}; regions ({settings(before)}) -> "
            f"({settings(after)}); pixel AP by sigma {regions.get('pixel_ap_by_sigma', 'n/a')}",
            flush=True,
        )

    extra = {"recalibrated_from": str(args.fleet), "calibration_overrides": overrides,
             "image_level": args.image_level}  # fmt: skip
    rewrite_fleet(
        args.fleet, args.data, args.out, copied_bundle, extra, report, overrides, args.image_level
    )


if __name__ == "__main__":
    main()
