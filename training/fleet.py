"""Fleets: one model per fabric, trained under one budget and one parent MLflow run.

``loomwatch train --fabric all --out FLEET`` trains a model for every fabric of the data (AITEX
fabric codes from the file names, MVTec categories), each as a nested MLflow run of its own under
one parent run, registers each as ``NAME-FF`` (with ``--register NAME``), and writes the fleet
manifest ``FLEET/fleet.json`` (:mod:`tracking.fleet`) last and atomically.

The one ``--max-minutes`` budget is shared in equal shares of what remains: fabric ``i`` of
``n`` gets ``(budget - time spent so far) / (n - i)``, so a fabric that finishes early leaves its
time to the ones after it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from models.device import Runtime
from models.manifest import folder_digest, weights_digest
from tracking.fleet import (
    FLEET_FORMAT,
    FLEET_IN_RUN,
    FLEET_KIND,
    FLEET_MANIFEST,
    write_fleet_manifest,
)
from tracking.registry import TAG
from training.calibrate import CalibrationError, describe_operating_point
from training.config import TrainConfig
from training.data import DatasetError, load_dataset, split_dataset
from training.runs import finite_metrics, run_tags, training_run
from training.train import TrainResult, check_split, train

VALIDATION_KEYS = ("image_auroc", "strip_auroc", "pixel_auroc", "aupro", "pixel_ap",
                   "detection_rate", "false_alarm_rate")  # fmt: skip


def fleet_fabrics(data: Path) -> list[str]:
    """The fabrics of a data folder (AITEX fabric codes, MVTec categories); DatasetError when
    the layout has none (a plain folder: train it without --fabric)."""
    dataset = load_dataset(data)
    if not dataset.fabrics:
        raise DatasetError(
            f"{data}: --fabric all needs fabric codes (AITEX file names or MVTec categories); "
            f"this {dataset.layout} layout has none"
        )
    return list(dataset.fabrics)


def check_fleet_data(
    data: Path, fabrics: list[str], config: TrainConfig, seed: int
) -> dict[str, str]:
    """Before any run: the fabrics that cannot be trained (no defect-free image to train on, or
    too few held back to calibrate), each with the reason; they are left out of the fleet (a
    data folder often holds a few strips of an article nobody trains for, like fabric 08 of
    the AITEX dev data: one defective strip). DatasetError when no fabric can be trained."""
    skipped: dict[str, str] = {}
    for fabric in fabrics:
        dataset = load_dataset(data, fabric=fabric)  # listed: it has images
        try:
            split = split_dataset(dataset, config.data.val_fraction, seed)
            check_split(split, config, f"{data} fabric {fabric}")
        except (DatasetError, CalibrationError) as exc:
            counts = f"{len(dataset.normal)} defect-free, {len(dataset.anomalous)} defective"
            skipped[fabric] = f"{str(exc).removeprefix(f'{data}: ')} ({counts})"
    if len(skipped) == len(fabrics):
        reasons = "; ".join(f"fabric {f}: {why}" for f, why in skipped.items())
        raise DatasetError(f"no fabric can be trained: {reasons}")
    return skipped


def calibration_line(result: TrainResult) -> str:
    """How a fabric's model was calibrated, in one line (says so when no defective strip
    took part: the threshold then rests on defect-free strips alone)."""
    calibration = result.manifest.calibration
    evidence = calibration.evidence
    defective = sum(sample.label == 1 for sample in result.split.validation)
    parts = [f"calibration {calibration.method}"]
    if "operating_point" in evidence:
        parts.append(describe_operating_point(evidence["operating_point"]))
    if defective == 0:
        parts.append(
            "no defective validation strip: image threshold from defect-free strips only, pixel "
            "threshold a percentile of defect-free pixels, detection rate not measured"
        )
    regions = evidence.get("regions", {})
    if regions.get("fitted"):
        parts.append(f"regions fitted (region F1 {regions['region_f1']:.2f})")
    elif regions:
        parts.append(f"regions not fitted ({regions.get('reason', 'no reason given')})")
    return "; ".join(parts)


@dataclass
class FleetResult:
    folder: Path
    manifest: dict[str, Any]
    parent_run_id: str
    store: str
    results: dict[str, TrainResult] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"runs:/{self.parent_run_id}/{FLEET_IN_RUN}"


def train_fleet(
    model_type: str,
    data: Path,
    config: TrainConfig,
    *,
    out: Path,
    fabrics: list[str],
    max_minutes: float | None,
    seed: int,
    runtime: Runtime,
    register: str | None,
    alias: str | None,
    config_file: Path | None,
    progress: bool,
    say: Callable[[str], None],
    skipped: dict[str, str] | None = None,
) -> FleetResult:
    """Train one model per fabric under one parent run; write ``out/fleet.json`` at the end."""
    started = time.monotonic()
    budget = max_minutes * 60.0 if max_minutes else None
    tags = run_tags(model_type, "all", data)
    tags[f"{TAG}fleet"] = ",".join(fabrics)
    entries: dict[str, dict[str, Any]] = {}
    results: dict[str, TrainResult] = {}
    with training_run(f"fleet-{out.name}", tags, progress=progress) as parent:
        say(f"MLflow fleet run {parent.run_id} (store {parent.store}): {len(fabrics)} fabrics")
        mlflow.log_params(
            {"fleet.model_type": model_type, "fleet.data": str(data), "fleet.seed": seed,
             "fleet.fabrics": ",".join(fabrics), "fleet.max_minutes": str(max_minutes),
             "fleet.out": str(out)}
        )  # fmt: skip
        for index, fabric in enumerate(fabrics):
            share = None
            if budget is not None:
                left = budget - (time.monotonic() - started)
                share = max(left, 1.0) / (len(fabrics) - index)
            child_tags = run_tags(model_type, fabric, data)
            child_tags[f"{TAG}fleet_run"] = parent.run_id
            with training_run(f"{out.name}-{fabric}", child_tags, nested=True) as run:
                run.log_params(
                    config,
                    {"model_type": model_type, "data": str(data), "fabric": fabric,
                     "seed": seed, "max_minutes": share / 60.0 if share else None,
                     "config_file": str(config_file) if config_file else None,
                     "out": str(out / fabric), "fleet_run": parent.run_id},
                )  # fmt: skip
                result = train(
                    model_type,
                    data,
                    config.model_copy(deep=True),
                    out=out / fabric,
                    fabric=fabric,
                    max_minutes=share / 60.0 if share else None,
                    seed=seed,
                    progress=progress,
                    callback=run.on_epoch,
                    on_split=run.on_split,
                    runtime=runtime,
                )
                scope = f"{data} (validation split, fabric {fabric})"
                run.log_result(result, config, config_file, scope)
                pinned = None
                if register:
                    run.register(f"{register}-{fabric}", alias)
                    pinned = run.model_uri
                uri = f"models:/{register}-{fabric}@{alias}" if register and alias else None
                line = calibration_line(result)
                entries[fabric] = {
                    "bundle": fabric,
                    "uri": uri or run.model_uri,
                    "pinned": pinned,
                    "run_id": run.run_id,
                    "digest": folder_digest(result.bundle),
                    "weights": weights_digest(result.bundle),
                    "calibration": line,
                    "train_images": len(result.split.train),
                    "validation_images": len(result.split.validation),
                    "validation_defective": sum(s.label == 1 for s in result.split.validation),
                    "budget_seconds": round(share, 1) if share else None,
                    "seconds": round(result.seconds["total"], 1),
                    "validation": {k: _finite(result.evaluation.metrics.get(k))
                                   for k in VALIDATION_KEYS},
                }  # fmt: skip
            results[fabric] = result
            figures = ", ".join(
                f"{k} {v:.3f}" for k, v in entries[fabric]["validation"].items() if v is not None
            )
            budget_text = f" of {share:.0f} s" if share else ""
            say(
                f"fabric {fabric}: {result.seconds['total']:.0f} s{budget_text}; "
                f"validation {figures}; {line}; model URI {entries[fabric]['uri']}"
            )
        manifest: dict[str, Any] = {
            "kind": FLEET_KIND,
            "format": FLEET_FORMAT,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model_type": model_type,
            "data": str(Path(data).resolve()),
            "seed": seed,
            "max_minutes": max_minutes,
            "seconds": round(time.monotonic() - started, 1),
            "parent_run_id": parent.run_id,
            "registered_as": f"{register}-FF" if register else None,
            "alias": alias,
            "fabrics": entries,
            "skipped": skipped or {},
        }
        macro = {
            f"macro/{key}": float(np.mean(values))
            for key in VALIDATION_KEYS
            if (values := [e["validation"][key] for e in entries.values()
                           if e["validation"][key] is not None])
        }  # fmt: skip
        mlflow.log_metrics(finite_metrics(macro))
        mlflow.log_dict(manifest, f"{FLEET_IN_RUN}/{FLEET_MANIFEST}")
        mlflow.set_tag(f"{TAG}fleet_uri", f"runs:/{parent.run_id}/{FLEET_IN_RUN}")
        write_fleet_manifest(out, manifest)
    return FleetResult(out, manifest, parent.run_id, parent.store, results)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ---- promotion of a fleet -----------------------------------------------------------------------


def fleet_model_names(name: str) -> dict[str, str]:
    """Fabric -> registered model name, for the models ``NAME-FF`` of a fleet registered as
    NAME; empty when NAME itself is a registered model (a single model) or none is found."""
    from tracking.store import mlflow_errors

    client = mlflow.MlflowClient()
    with mlflow_errors(f"registered model '{name}'"):
        if client.search_registered_models(filter_string=f"name = '{name}'"):
            return {}
        found = client.search_registered_models(filter_string=f"name LIKE '{name}-%'")
    prefix = f"{name}-"
    return {m.name.removeprefix(prefix): m.name for m in sorted(found, key=lambda m: m.name)
            if "-" not in m.name.removeprefix(prefix)}  # fmt: skip


def promote_fleet(
    names: dict[str, str],
    metric: str,
    *,
    data: Path | None,
    fabric: str | None,
    margin: float,
    resamples: int,
    progress: bool,
) -> list[str]:
    """Promote each fabric's model on its own, as a single model is (``training.promote``):
    the newest version of NAME-FF against its champion, on that fabric's strips only (``data``
    with ``--fabric FF``, or the validation strips both versions share). One line per fabric."""
    from training.promote import promote

    chosen = names
    if fabric is not None:
        chosen = {f: n for f, n in names.items() if f.lower() == fabric.strip().lower()}
        if not chosen:
            raise DatasetError(
                f"the fleet has no model for fabric {fabric!r}; its fabrics: {', '.join(names)}"
            )
    lines = []
    for code, registered in chosen.items():
        decision = promote(
            registered,
            metric,
            data=data,
            fabric=code if data is not None else None,
            margin=margin,
            resamples=resamples,
            progress=progress,
        )
        lines.append(f"fabric {code} ({registered}): {decision.message}")
    return lines
