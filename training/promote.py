"""Promotion by evidence: the alias ``champion`` moves only to a version that does better.

``loomwatch promote NAME --metric M [--data DIR]`` compares the newest version of NAME with the
current champion on metric M (higher is better), on the same evaluation data:

* with ``--data DIR``, both versions are evaluated on every image in DIR (``evaluate --split all``
  semantics), through the serving pipeline;
* without it, the validation figures logged by their training runs are compared, and only when
  both runs validated on the same images (same validation-split fingerprint).

When the newest version wins (or there is no champion yet) the alias moves and both figures are
recorded as tags of the new champion. Otherwise nothing changes and the reason is returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion

from tracking.registry import TAG, alias_version, newest_version, set_alias, tag_version
from tracking.store import TrackingError, mlflow_errors
from tracking.uris import resolve_model_uri

CHAMPION = "champion"
METRICS = ("image_auroc", "strip_auroc", "pixel_auroc", "aupro", "pixel_ap", "f1_max")


@dataclass
class Figure:
    version: str
    value: float
    data: str  # fingerprint of the images the figure was measured on


@dataclass
class Decision:
    promoted: bool
    message: str
    candidate: Figure | None = None
    champion: Figure | None = None


def promote(
    name: str,
    metric: str,
    *,
    data: Path | None = None,
    fabric: str | None = None,
    progress: bool = False,
) -> Decision:
    if metric not in METRICS:
        raise TrackingError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    with mlflow_errors(f"registered model '{name}'"):
        newest = newest_version(name)
        current = alias_version(name, CHAMPION)
        if current is not None and str(current.version) == str(newest.version):
            return Decision(False, f"not promoted: version {newest.version} is already {CHAMPION}")
        candidate = _measure(newest, metric, data, fabric, progress)
        if candidate is None:
            return Decision(False, _no_figure(newest, metric, data))
        champion = None
        if current is not None:
            champion = _measure(current, metric, data, fabric, progress)
            if champion is None:
                return Decision(False, _no_figure(current, metric, data), candidate)
            if candidate.data != champion.data:
                return Decision(
                    False,
                    f"not promoted: versions {newest.version} and {current.version} were "
                    f"validated on different data ({candidate.data[:12]} vs "
                    f"{champion.data[:12]}); pass --data DIR to evaluate both on the same images",
                    candidate,
                    champion,
                )
            if not candidate.value > champion.value:
                return Decision(
                    False,
                    f"not promoted: version {newest.version} has {metric} {candidate.value:.4f}, "
                    f"not above {CHAMPION} version {current.version} ({champion.value:.4f})",
                    candidate,
                    champion,
                )
        _record(name, metric, candidate, champion, data)
        set_alias(name, CHAMPION, str(newest.version))
    if champion is None:
        message = f"promoted version {newest.version} to {CHAMPION} (there was none)"
    else:
        message = (
            f"promoted version {newest.version} to {CHAMPION}: {metric} {candidate.value:.4f} > "
            f"{champion.value:.4f} (version {champion.version})"
        )
    return Decision(True, f"{message}; models:/{name}@{CHAMPION}", candidate, champion)


def _no_figure(version: ModelVersion, metric: str, data: Path | None) -> str:
    where = f"on {data}" if data is not None else "in its run's logged validation metrics"
    hint = "" if data is not None else "; pass --data DIR to evaluate it"
    return f"not promoted: version {version.version} has no finite {metric} {where}{hint}"


def _measure(
    version: ModelVersion, metric: str, data: Path | None, fabric: str | None, progress: bool
) -> Figure | None:
    if data is not None:
        return _evaluate(version, metric, data, fabric, progress)
    if not version.run_id:
        return None
    run = mlflow.MlflowClient().get_run(version.run_id)
    value = run.data.metrics.get(metric)
    fingerprint = run.data.tags.get(f"{TAG}validation_fingerprint")
    if value is None or not math.isfinite(value) or not fingerprint:
        return None
    return Figure(str(version.version), float(value), fingerprint)


def _evaluate(
    version: ModelVersion, metric: str, data: Path, fabric: str | None, progress: bool
) -> Figure | None:
    from models.pipeline import Detector
    from training.data import fingerprint, load_dataset
    from training.evaluate import analyse_samples, run_evaluation

    dataset = load_dataset(data, fabric=fabric)
    detector = Detector.from_bundle(resolve_model_uri(f"models:/{version.name}/{version.version}"))
    analysed = analyse_samples(
        detector, dataset.samples, progress=progress, desc=f"version {version.version}"
    )
    value = run_evaluation(detector, analysed).metrics.get(metric)
    if value is None or not math.isfinite(value):
        return None
    return Figure(str(version.version), float(value), fingerprint(dataset.samples, dataset.root))


def _record(
    name: str,
    metric: str,
    candidate: Figure,
    champion: Figure | None,
    data: Path | None,
) -> None:
    tags = {
        f"{TAG}promotion.metric": metric,
        f"{TAG}promotion.value": f"{candidate.value:.6g}",
        f"{TAG}promotion.data": str(data) if data is not None else "logged validation metrics",
        f"{TAG}promotion.data_fingerprint": candidate.data,
        f"{TAG}promotion.previous_version": champion.version if champion else "none",
        f"{TAG}promotion.at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if champion is not None:
        tags[f"{TAG}promotion.previous_value"] = f"{champion.value:.6g}"
    tag_version(name, candidate.version, tags)
