"""One member of a DRAEM ensemble fleet as a fleet of its own, recalibrated, to judge what the
averaging gave on the same training run (a paired comparison: same networks, same split).

    python -m bench.ensemble_members --fleet runs/fleet-ens --member 1 --data runs/hall/fit \
        --out runs/fleet-ens-m1
    loomwatch evaluate --model-uri runs/fleet-ens-m1 --data runs/hall/test --split all ...

For every fabric of ``--fleet`` (trained with ``model.members`` of 2 or more) it writes a bundle
holding member ``--member``'s network alone (``members`` 1), re-fits its operating point on the
same validation split its ensemble was calibrated on (``loomwatch calibrate --split test``:
the same held-back defect-free strips, the same rule) and writes a fleet manifest beside them, so
that ``evaluate`` judges the member as it would a fleet that ``train`` wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.fleet_variant import rewrite_fleet
from models.bundle import Manifest, load_bundle, save_bundle
from models.draem import Draem
from training.recalibrate import Recalibration


def member_bundle(source: Path, member: int, out: Path) -> Path:
    """Write member ``member`` (1-based) of the DRAEM ensemble bundle ``source`` as a bundle of
    one network at ``out`` (the ensemble's calibration, to be re-fitted)."""
    model, manifest = load_bundle(source)
    if not isinstance(model, Draem) or not model.others:
        raise SystemExit(f"{source} is not a DRAEM ensemble (model.members 2 or more)")
    count = 1 + len(model.others)
    if not 1 <= member <= count:
        raise SystemExit(f"--member must lie in 1..{count} for {source}")
    chosen: Draem = model if member == 1 else model.others[member - 2]  # type: ignore[assignment]
    config = model.config.model_copy(update={"members": 1})
    single = Draem(config, load_weights=False)
    state = {k: v for k, v in chosen.state_dict().items() if not k.startswith("others.")}
    single.load_state_dict(state)
    alone = Manifest.model_validate(
        {**manifest.model_dump(), "config": config.model_dump(), "export": None}
    )
    return save_bundle(out, single, alone)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--member", type=int, default=1)
    parser.add_argument("--data", type=Path, required=True, help="the data the fleet trained on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    def change(source: Path, fabric: str, staged: Path) -> Path:
        return member_bundle(source, args.member, staged)

    def report(fabric: str, result: Recalibration) -> None:
        print(f"{fabric}: member {args.member} -> {result.folder}", flush=True)

    extra = {"member_of": str(args.fleet), "member": args.member}
    rewrite_fleet(args.fleet, args.data, args.out, change, extra, report)


if __name__ == "__main__":
    main()
