"""Promotion by evidence: the alias ``champion`` moves only when the improvement is clear.

``loomwatch promote NAME [--metric M] [--data DIR] [--margin X]`` judges the newest version of NAME
(the challenger) against the version with alias ``champion`` on the same strips, through the
serving pipeline, and compares them with a paired bootstrap
(:func:`training.decisions.paired_comparison`): both models' outcomes on a resample of the
common strips give one difference, challenger minus champion, signed so that positive is better.
The alias moves only when the whole 95 % interval of that difference lies above the margin.

The common strips are every image in ``--data DIR`` (``evaluate --split all``), or else the
strips neither version trained on: the validation splits of the data folder both manifests
record, recomputed from their seeds, intersected by image name. Versions trained on different
data share no such strips: :class:`~training.decisions.NoCommonDataError`.

With no champion yet the newest version is promoted, with its own figure and interval. Either way
the figures, the interval and the outcome are recorded on the challenger version (tags
``loomwatch.promotion.*`` and its description).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion

from models.pipeline import Detector
from tracking.registry import TAG, alias_version, newest_version, set_alias, tag_version
from tracking.store import TrackingError, mlflow_errors
from tracking.uris import resolve_model_uri
from training.data import DatasetError, Sample, fingerprint, load_dataset, recorded_split
from training.decisions import (
    DEFAULT_RESAMPLES,
    FIGURES,
    NoCommonDataError,
    PairedComparison,
    StripOutcome,
    interval,
    paired_comparison,
)
from training.evaluate import analyse_samples, run_evaluation

CHAMPION = "champion"
DEFAULT_METRIC = "decision_balance"
MIN_RESAMPLES = 100
PROMOTION = f"{TAG}promotion."


@dataclass
class Decision:
    promoted: bool
    message: str
    comparison: PairedComparison | None = None


@dataclass
class Contender:
    version: ModelVersion
    detector: Detector

    @property
    def number(self) -> str:
        return str(self.version.version)

    @property
    def training(self) -> dict[str, object]:
        return self.detector.manifest.training


@dataclass
class Strips:
    samples: list[Sample]
    data: str  # where they come from, in words
    fingerprint: str  # of the data set they were drawn from


def check_request(metric: str, margin: float, resamples: int) -> None:
    if metric not in FIGURES:
        raise TrackingError(f"--metric {metric}: choose one of {', '.join(FIGURES)}")
    if not 0.0 <= margin < 1.0:
        raise TrackingError(f"--margin {margin}: must be in [0, 1)")
    if resamples < MIN_RESAMPLES:
        raise TrackingError(f"--resamples {resamples}: must be at least {MIN_RESAMPLES}")


def clears(comparison: PairedComparison, margin: float) -> bool:
    """The rule: the whole 95 % interval of the improvement lies above the margin.

    An undefined interval (NaN: the figure does not exist on these strips) never clears it.
    """
    return comparison.low > margin


def promote(
    name: str,
    metric: str = DEFAULT_METRIC,
    *,
    data: Path | None = None,
    fabric: str | None = None,
    margin: float = 0.0,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> Decision:
    check_request(metric, margin, resamples)
    with mlflow_errors(f"registered model '{name}'"):
        newest = newest_version(name)
        current = alias_version(name, CHAMPION)
        if current is not None and str(current.version) == str(newest.version):
            return Decision(False, f"not promoted: version {newest.version} is already {CHAMPION}")
        challenger = _load(newest)
        if current is None:
            return _first(name, challenger, metric, data, fabric, resamples, seed, progress)
        champion = _load(current)
        strips = (
            _folder_strips(data, fabric)
            if data is not None
            else _common_validation_strips(champion, challenger)
        )
        theirs = _outcomes(champion, strips.samples, seed, progress)
        ours = _outcomes(challenger, strips.samples, seed, progress)
        comparison = paired_comparison(theirs, ours, metric, seed=seed, resamples=resamples)
        promoted = clears(comparison, margin)
        line = f"{comparison.describe()}; margin {margin:.2f}"
        tags = _comparison_tags(comparison, champion.number, margin, strips, promoted)
        _record(name, challenger.number, tags, line)
        if promoted:
            set_alias(name, CHAMPION, challenger.number)
    low, high = f"{comparison.low:+.2f}", f"{comparison.high:+.2f}"
    rule = f"the 95% CI of the improvement [{low}, {high}]"
    if math.isnan(comparison.low):
        rule = f"{metric} is undefined on these {comparison.n_strips} strips, so its CI"
    if promoted:
        verdict = (
            f"promoted version {challenger.number} to {CHAMPION} over version {champion.number}: "
            f"{rule} lies above the margin {margin:.2f}; models:/{name}@{CHAMPION}"
        )
    else:
        verdict = (
            f"not promoted: {rule} does not lie above the margin {margin:.2f}; "
            f"version {champion.number} stays {CHAMPION}"
        )
    return Decision(promoted, f"{verdict}\n{comparison.describe()}", comparison)


def _load(version: ModelVersion) -> Contender:
    uri = f"models:/{version.name}/{version.version}"
    return Contender(version, Detector.from_bundle(resolve_model_uri(uri)))


def _outcomes(
    contender: Contender, samples: list[Sample], seed: int, progress: bool
) -> list[StripOutcome]:
    detector = contender.detector
    desc = f"version {contender.number}"
    analysed = analyse_samples(detector, samples, progress=progress, desc=desc)
    return run_evaluation(detector, analysed, seed=seed).outcomes


# --- which strips ---------------------------------------------------------------------------


def _folder_strips(data: Path, fabric: str | None) -> Strips:
    dataset = load_dataset(data, fabric=fabric)
    where = f"{data} (fabric {fabric})" if fabric else str(data)
    return Strips(list(dataset.samples), where, fingerprint(dataset.samples, dataset.root))


def _validation_split(contender: Contender) -> Strips:
    """The strips a version validated on (and never trained on), from what its manifest records."""
    training = contender.training
    hint = "pass --data DIR to compare on a folder of images"
    folder, recorded = training.get("data"), training.get("fingerprint")
    if not folder or not recorded:
        raise NoCommonDataError(f"version {contender.number} records no training data; {hint}")
    root = Path(str(folder))
    if not root.is_dir():
        raise NoCommonDataError(
            f"{root}, the data version {contender.number} was trained on, is gone; {hint}"
        )
    fabric = training.get("fabric")
    layout = str(training.get("layout") or "auto")
    try:
        dataset = load_dataset(root, fabric=str(fabric) if fabric else None, layout=layout)
    except DatasetError as exc:
        raise NoCommonDataError(f"{exc}; {hint}") from None
    if fingerprint(dataset.samples, dataset.root) != recorded:
        raise NoCommonDataError(
            f"{root} changed since version {contender.number} was trained on it; {hint}"
        )
    split = recorded_split(dataset, training)
    return Strips(list(split.validation), f"validation strips of {root}", str(recorded))


def _common_validation_strips(champion: Contender, challenger: Contender) -> Strips:
    hint = "pass --data DIR to compare on a folder of images"
    ours, theirs = (c.training.get("fingerprint") for c in (challenger, champion))
    if not ours or not theirs or ours != theirs:
        raise NoCommonDataError(
            f"versions {challenger.number} and {champion.number} were trained on different data "
            f"and share no strips neither trained on; {hint}"
        )
    mine, other = _validation_split(challenger), _validation_split(champion)
    names = {sample.name for sample in other.samples}
    common = [sample for sample in mine.samples if sample.name in names]
    if not common:
        raise NoCommonDataError(
            f"versions {challenger.number} and {champion.number} share no validation strip; {hint}"
        )
    return Strips(common, f"common {mine.data}", mine.fingerprint)


def _first(
    name: str,
    challenger: Contender,
    metric: str,
    data: Path | None,
    fabric: str | None,
    resamples: int,
    seed: int,
    progress: bool,
) -> Decision:
    """No champion yet: promote, with the challenger's own figure where it can be measured."""
    tags = {
        f"{PROMOTION}metric": metric,
        f"{PROMOTION}champion_version": "none",
        f"{PROMOTION}outcome": "promoted",
    }
    try:
        strips = _folder_strips(data, fabric) if data is not None else _validation_split(challenger)
    except NoCommonDataError as exc:
        figure = f"{metric} not measured: {exc}"
    else:
        outcomes = _outcomes(challenger, strips.samples, seed, progress)
        value = FIGURES[metric](outcomes, np.arange(len(outcomes)))
        low, high = interval(outcomes, FIGURES[metric], seed=seed, resamples=resamples)
        figure = (
            f"{metric}: version {challenger.number} {value:.4f}, 95% CI [{low:.4f}, {high:.4f}] "
            f"over {len(outcomes)} strips (bootstrap)"
        )
        tags.update(
            {
                f"{PROMOTION}challenger_value": _number(value),
                f"{PROMOTION}ci95_low": _number(low),
                f"{PROMOTION}ci95_high": _number(high),
                f"{PROMOTION}n_strips": str(len(outcomes)),
                f"{PROMOTION}data": strips.data,
                f"{PROMOTION}data_fingerprint": strips.fingerprint,
            }
        )
    _record(name, challenger.number, tags, f"promoted: there was no {CHAMPION}; {figure}")
    set_alias(name, CHAMPION, challenger.number)
    message = (
        f"promoted version {challenger.number} to {CHAMPION} (there was none); "
        f"models:/{name}@{CHAMPION}\n{figure}"
    )
    return Decision(True, message)


# --- what is recorded -------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else "nan"


def _comparison_tags(
    comparison: PairedComparison, champion: str, margin: float, strips: Strips, promoted: bool
) -> dict[str, str]:
    return {
        f"{PROMOTION}metric": comparison.metric,
        f"{PROMOTION}champion_version": champion,
        f"{PROMOTION}challenger_value": _number(comparison.challenger),
        f"{PROMOTION}champion_value": _number(comparison.champion),
        f"{PROMOTION}difference": _number(comparison.difference),
        f"{PROMOTION}ci95_low": _number(comparison.low),
        f"{PROMOTION}ci95_high": _number(comparison.high),
        f"{PROMOTION}margin": _number(margin),
        f"{PROMOTION}n_strips": str(comparison.n_strips),
        f"{PROMOTION}data": strips.data,
        f"{PROMOTION}data_fingerprint": strips.fingerprint,
        f"{PROMOTION}outcome": "promoted" if promoted else "not promoted",
    }


def _record(name: str, version: str, tags: dict[str, str], description: str) -> None:
    """Tags and the one-line description of the challenger version, promoted or not."""
    tags = {**tags, f"{PROMOTION}at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tag_version(name, version, tags)
    mlflow.MlflowClient().update_model_version(name, version, description=description)
