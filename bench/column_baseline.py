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

import numpy as np

from bench.fleet_variant import learned_variant_main
from models.manifest import PipelineConfig
from training.train import with_column_baseline


def describe(pipeline: PipelineConfig) -> str:
    baseline = pipeline.column_baseline
    if baseline is None:
        return "baseline none"
    return f"baseline {np.min(baseline.values):.4f}-{np.max(baseline.values):.4f}"


def main(argv: list[str] | None = None) -> None:
    learned_variant_main(argv, __doc__ or "", with_column_baseline, describe, "rebased_from")


if __name__ == "__main__":
    main()
