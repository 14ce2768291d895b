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

from bench.fleet_variant import learned_variant_main
from models.manifest import PipelineConfig
from training.train import with_isolated_peak


def describe(pipeline: PipelineConfig) -> str:
    peak = pipeline.isolated_peak
    if peak is None:
        return "none"
    return (
        f"score {peak.score_mean:.4f} +- {peak.score_sd:.4f}, gap {peak.gap_mean:.4f}"
        f" +- {peak.gap_sd:.4f} ({peak.images} images)"
    )


def main(argv: list[str] | None = None) -> None:
    learned_variant_main(argv, __doc__ or "", with_isolated_peak, describe, "isolated_peak_from")


if __name__ == "__main__":
    main()
