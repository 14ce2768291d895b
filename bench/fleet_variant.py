"""A trained fleet rewritten fabric by fabric, each bundle changed and recalibrated on the same
validation split, with a fleet manifest beside them: what the paired benches
(``bench.ensemble_members``, ``bench.column_baseline``, ``bench.isolated_peak``) share."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.manifest import ImageLevel, PipelineConfig
from models.pipeline import Detector
from tracking.fleet import resolve_fleet, write_fleet_manifest
from training.data import Sample, load_dataset, recorded_split
from training.recalibrate import Recalibration, recalibrate_on_data, write_recalibrated

# (source bundle, fabric, folder to write the changed bundle at) -> that folder
ChangeBundle = Callable[[Path, str, Path], Path]


def rewrite_fleet(
    fleet_uri: Path,
    data: Path,
    out: Path,
    change: ChangeBundle,
    manifest_extra: dict[str, Any],
    report: Callable[[str, Recalibration], None],
    overrides: dict[str, Any] | None = None,
    image_level: ImageLevel | None = None,
) -> Path:
    """Write at ``out`` every fabric of ``fleet_uri`` changed by ``change`` and recalibrated on
    ``data`` (``loomwatch calibrate --split test``: the validation split the fleet's own
    operating points came from), then a fleet manifest with ``manifest_extra``; ``report`` is
    told each fabric's recalibration; ``overrides``: calibration settings laid over the recorded
    ones (as ``loomwatch calibrate`` takes them); ``image_level``: the images scored with that
    ``pipeline.image_level`` (``loomwatch calibrate --image-level``)."""
    fleet = resolve_fleet(str(fleet_uri))
    fabrics: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for fabric in fleet.fabrics:
            entry = fleet.member(fabric)
            if entry is None or entry.bundle is None:
                raise SystemExit(f"{fleet_uri}: fabric {fabric} has no bundle folder beside it")
            staged = change(entry.bundle, fabric, Path(scratch) / fabric)
            target = out / fabric
            result = recalibrate_on_data(
                staged, data, target, fabric=fabric, split="test", progress=False,
                overrides=overrides, image_level=image_level,
            )  # fmt: skip
            shutil.rmtree(staged)
            report(fabric, result)
            fabrics[fabric] = {**entry.info, "bundle": fabric, "uri": str(target), "pinned": None}
    manifest = {**fleet.manifest, "fabrics": fabrics, "registered_as": None, "alias": None,
                **manifest_extra}  # fmt: skip
    return write_fleet_manifest(out, manifest)


# (detector of the source bundle, its defect-free training samples, whether to learn) -> the
# pipeline to write (learned from those samples, or without what it learns)
LearnPipeline = Callable[[Detector, list[Sample], bool], PipelineConfig]


def learned_bundle(
    source: Path, data: Path, fabric: str, out: Path, learn: LearnPipeline, without: bool
) -> Path:
    """Write ``source`` at ``out`` with its pipeline from ``learn``, given the (defect-free)
    images of ``data`` the model was fitted on (the split its manifest records, as ``loomwatch
    train`` made it); its calibration is to be re-fitted."""
    detector = Detector.from_bundle(source)
    manifest = detector.manifest
    split = recorded_split(load_dataset(data, fabric=fabric), manifest.training)
    pipeline = learn(detector, list(split.train), not without)
    updated = manifest.model_copy(update={"pipeline": pipeline})
    return write_recalibrated(source, out, updated)


def learned_variant_main(
    argv: list[str] | None,
    doc: str,
    learn: LearnPipeline,
    describe: Callable[[PipelineConfig], str],
    source_key: str,
) -> None:
    """The command line of a bench that gives each fabric of a fleet what ``learn`` learns (or,
    with ``--without``, removes it) and re-fits its operating point: ``--fleet``, ``--data``,
    ``--out``; prints each fabric's ``describe`` and raw image thresholds before and after."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the data the fleet trained on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--without", action="store_true", help="remove it instead")
    args = parser.parse_args(argv)

    def change(source: Path, fabric: str, staged: Path) -> Path:
        return learned_bundle(source, args.data, fabric, staged, learn, args.without)

    def report(fabric: str, result: Recalibration) -> None:
        before = result.before.image_threshold
        after = result.manifest.calibration.image_threshold
        print(
            f"{fabric}: {describe(result.manifest.pipeline)}; raw image threshold"
            f" {before:.4f} -> {after:.4f} -> {result.folder}",
            flush=True,
        )

    rewrite_fleet(args.fleet, args.data, args.out, change, {source_key: str(args.fleet)}, report)
