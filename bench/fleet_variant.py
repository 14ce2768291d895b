"""A trained fleet rewritten fabric by fabric, each bundle changed and recalibrated on the same
validation split, with a fleet manifest beside them: what the paired benches
(``bench.ensemble_members``, ``bench.column_baseline``) share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.manifest import ImageLevel
from tracking.fleet import resolve_fleet, write_fleet_manifest
from training.recalibrate import Recalibration, recalibrate_on_data

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
