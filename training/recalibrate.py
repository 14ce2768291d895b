"""`loomwatch calibrate`: new thresholds for a model without retraining it.

The weights stay as they are (copied byte for byte); only the manifest's calibration (and, from
labelled data with defect masks, the region settings) changes, so the new folder is a model of
its own that can be evaluated, registered and promoted like any other.

- From labelled data (``--data``): the images are analysed by the model and calibrated by
  :func:`training.calibrate.fit_operating_point`, the very code training uses. On the data the
  model was trained on (``--split test``, or ``auto`` when the fingerprint matches) that is its
  validation split, which reproduces the training's calibration; on a new folder, every image.
- From operators' feedback (``--feedback DATABASE_URL``): the raw scores the service recorded
  for these same weights, labelled by what people said (a false alarm is defect-free fabric;
  real and missed defects are defects; a strip decided normal that nobody reported counts as
  defect-free; an alarm nobody reviewed is left out). The image threshold is set by the
  operating-point rule of the model's own calibration config
  (``training.calibrate.image_threshold``). Feedback carries no defect outlines, so the pixel
  threshold and the region settings are kept, and the evidence says so.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import ValidationError

from models.calibration import Calibration
from models.manifest import (
    MANIFEST,
    ImageLevel,
    Manifest,
    move_into_place,
    read_manifest,
    weights_digest,
)
from models.pipeline import Detector
from models.postprocess import SuppressionSettings
from training.calibrate import (
    CalibrationError,
    check_clean_images,
    describe_operating_point,
    fit_operating_point,
    image_threshold,
    reference_scores,
)
from training.config import CalibrationConfig
from training.data import Sample, fingerprint, load_dataset, recorded_split
from training.evaluate import analyse_samples, fitted_clean_scores
from training.train import with_isolated_peak

Split = Literal["auto", "test", "all"]


class Reviewed(Protocol):
    """One recorded prediction with what is known of its truth (app.feedback's LabelledScore)."""

    @property
    def raw_score(self) -> float: ...
    @property
    def decision(self) -> str: ...
    @property
    def verdict(self) -> str | None: ...
    @property
    def label(self) -> int | None: ...


@dataclass
class Recalibration:
    folder: Path
    manifest: Manifest
    before: Calibration
    evidence: dict[str, Any]

    def description(self) -> str:
        """What the new calibration rests on, for the registry's version description."""
        return describe(self.evidence, self.before, self.manifest.calibration)


def calibration_config(
    manifest: Manifest, overrides: dict[str, Any] | None = None
) -> CalibrationConfig:
    """The calibration settings the model was trained with (the defaults when not recorded),
    with ``overrides`` (for example another ``image_rule``) laid over them."""
    full = manifest.training.get("full_config") or {}
    recorded = dict(full.get("calibration") or {})
    try:
        return CalibrationConfig.model_validate({**recorded, **(overrides or {})})
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise CalibrationError(f"calibration.{where}: {problem['msg']}") from None


def _record_config(manifest: Manifest, config: CalibrationConfig) -> None:
    """Write the settings used into the manifest, so the next recalibration starts from them."""
    full = dict(manifest.training.get("full_config") or {})
    full["calibration"] = config.model_dump()
    manifest.training["full_config"] = full


def _rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Image decisions at a raw threshold: false alarms on defect-free, defects caught."""
    alarms = scores >= threshold
    clean, defective = labels == 0, labels == 1
    return {
        "false_alarms": int((alarms & clean).sum()),
        "defect_free": int(clean.sum()),
        "defects_caught": int((alarms & defective).sum()),
        "defects": int(defective.sum()),
    }


def _manifest_with(
    manifest: Manifest, calibration: Calibration, suppression: SuppressionSettings
) -> Manifest:
    updated = manifest.model_copy(deep=True)
    updated.calibration = calibration
    updated.suppression = suppression.model_dump()
    updated.created = datetime.now(UTC).isoformat(timespec="seconds")
    return updated


def write_recalibrated(source: Path, out: Path, manifest: Manifest) -> Path:
    """Copy the model folder ``source`` to ``out`` with ``manifest``; all or nothing. Refuses to
    write over the model itself or over a folder that is not a model folder."""
    if out.resolve() == source.resolve():
        raise CalibrationError(f"--out {out} is the model's own folder: choose a new one")
    if out.exists() and not (out / MANIFEST).is_file():
        raise CalibrationError(f"--out {out} exists and is not a model folder: choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for item in source.iterdir():
            if item.name == MANIFEST:
                continue
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, staging / item.name)
        text = json.dumps(manifest.model_dump(mode="json"), indent=2, allow_nan=False)
        (staging / MANIFEST).write_text(text + "\n")
        read_manifest(staging)  # what was written reads back
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ---- from labelled data -----------------------------------------------------------------------


def recalibrate_on_data(
    model_dir: Path,
    data: Path,
    out: Path,
    *,
    fabric: str | None = None,
    split: Split = "auto",
    backend: str = "auto",
    seed: int = 0,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    image_level: ImageLevel | None = None,
) -> Recalibration:
    """``overrides``: calibration settings to use instead of the recorded ones (and record);
    ``image_level``: score the images with that ``pipeline.image_level`` instead of the model's
    (recorded in the new manifest: its scores, so its thresholds, are on that scale)."""
    detector = Detector.from_bundle(model_dir, backend=backend)
    manifest = detector.manifest
    level_before = manifest.pipeline.image_level
    if image_level is not None:
        manifest.pipeline = manifest.pipeline.model_copy(update={"image_level": image_level})
        detector.pipeline = manifest.pipeline
    training = manifest.training
    fabric = fabric if fabric is not None else training.get("fabric")
    dataset = load_dataset(data, fabric=fabric)
    same_data = training.get("fingerprint") == fingerprint(dataset.samples, dataset.root)
    if split == "test" and not same_data:
        raise CalibrationError(
            f"{data} is not the data this model was trained on (fingerprint differs); "
            "use --split all (or auto) to calibrate on other data"
        )
    use_validation = split == "test" or (split == "auto" and same_data)
    fitted: list[Sample] = []  # the defect-free images the model was fitted on, if these
    if use_validation:
        chosen = recorded_split(dataset, training)
        samples, fitted = list(chosen.validation), list(chosen.train)
    else:
        samples = list(dataset.samples)
    if manifest.pipeline.image_level != level_before and manifest.pipeline.isolated_peak:
        # the reference's scores were measured at the old level: learn it again at the new one
        if not fitted:
            raise CalibrationError(
                "this model scores strips by their isolated peak, learned on its training"
                f" strips at image level {level_before}: to change the level, calibrate on the"
                " data it was trained on (--split test), where those strips are"
            )
        manifest.pipeline = with_isolated_peak(detector, fitted, learn=True, progress=progress)
    config = calibration_config(manifest, overrides)
    where = f"{data} ({'validation split' if use_validation else 'every image'})"
    check_clean_images(sum(sample.label == 0 for sample in samples), config, where)
    analysed = [
        (sample.label, analysis, mask)
        for sample, analysis, mask in analyse_samples(
            detector, samples, progress=progress, desc="calibrate"
        )
    ]
    base = SuppressionSettings.model_validate(manifest.suppression)
    trained = fitted_clean_scores(detector, fitted, config, progress=progress)
    calibration, suppression = fit_operating_point(detector, analysed, config, base, seed, trained)
    scores = np.array([analysis.score for _, analysis, _ in analysed])
    labels = np.array([label for label, _, _ in analysed])
    before = manifest.calibration
    evidence: dict[str, Any] = {
        "source": "data",
        "data": str(Path(data).resolve()),
        "fabric": fabric,
        "images": "validation split" if use_validation else "every image",
        "n_images": len(analysed),
        "n_defective": int(labels.sum()),
        "before": _rates(scores, labels, before.image_threshold),
        "after": _rates(scores, labels, calibration.image_threshold),
        "weights_digest": weights_digest(model_dir),
        "image_level": {"before": level_before, "after": manifest.pipeline.image_level},
    }
    calibration.evidence["recalibration"] = evidence
    updated = _manifest_with(manifest, calibration, suppression)
    _record_config(updated, config)
    return Recalibration(write_recalibrated(model_dir, out, updated), updated, before, evidence)


# ---- from operators' feedback -----------------------------------------------------------------


def recalibrate_on_feedback(
    model_dir: Path,
    reviewed: Sequence[Reviewed],
    out: Path,
    *,
    source: str,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Recalibration:
    """``reviewed``: the recorded predictions of these weights (``source`` names where from);
    ``overrides``: calibration settings to use instead of the recorded ones (and record)."""
    manifest = read_manifest(model_dir)
    digest = weights_digest(model_dir)
    if not reviewed:
        raise CalibrationError(
            f"{source} holds no prediction scored by these weights ({digest}): serve the model "
            "and give feedback on the review page (/ui) first"
        )
    known = [item for item in reviewed if item.label is not None]
    scores = np.array([item.raw_score for item in known], dtype=np.float64)
    labels = np.array([item.label for item in known], dtype=np.int64)
    verdicts = Counter(item.verdict or "none" for item in reviewed)
    config = calibration_config(manifest, overrides)
    where = f"feedback in {source}"
    try:
        threshold, operating, method = image_threshold(scores, labels, config, seed, where)
    except CalibrationError as exc:
        raise CalibrationError(
            f"{exc}; the feedback has {int((labels == 0).sum())} defect-free strips "
            f"({verdicts.get('false_alarm', 0)} false alarms, the rest decided normal and not "
            "reported)"
        ) from None
    before = manifest.calibration
    pixel_method = [part for part in before.method.split(",") if part.startswith("pixel:")]
    all_scores = np.array([item.raw_score for item in reviewed], dtype=np.float64)
    calibration = before.model_copy(
        update={
            "image_threshold": threshold,
            "image_min": float(min(before.image_min, all_scores.min())),
            "image_max": float(max(before.image_max, all_scores.max(), threshold)),
            "method": ",".join([f"{method}(feedback)", *pixel_method]),
            "evidence": {
                **before.evidence,
                "operating_point": operating,
                "reference": reference_scores(scores[labels == 0]),
            },
        }
    )
    evidence: dict[str, Any] = {
        "source": "feedback",
        "database": source,
        "weights_digest": digest,
        "predictions": len(reviewed),
        "verdicts": dict(sorted(verdicts.items())),
        "unreviewed_alarms_left_out": sum(1 for item in reviewed if item.label is None),
        "defect_free": int((labels == 0).sum()),
        "defective": int(labels.sum()),
        "before": _rates(scores, labels, before.image_threshold),
        "after": _rates(scores, labels, threshold),
        "pixel_and_regions": "kept: feedback carries no defect outlines",
    }
    calibration.evidence["recalibration"] = evidence
    suppression = SuppressionSettings.model_validate(manifest.suppression)
    updated = _manifest_with(manifest, calibration, suppression)
    _record_config(updated, config)
    return Recalibration(write_recalibrated(model_dir, out, updated), updated, before, evidence)


# ---- saying what it rests on ------------------------------------------------------------------


def _rate_text(rates: dict[str, Any]) -> str:
    def share(part: int, whole: int) -> str:
        return f"{part}/{whole}" + (f" ({part / whole:.0%})" if whole else "")

    return (
        f"false alarms {share(rates['false_alarms'], rates['defect_free'])}, defects caught "
        f"{share(rates['defects_caught'], rates['defects'])}"
    )


def describe(evidence: dict[str, Any], before: Calibration, after: Calibration) -> str:
    """A few lines: where the evidence came from, the thresholds, and the decisions before and
    after on that same evidence."""
    if evidence["source"] == "feedback":
        verdicts = ", ".join(f"{key} {value}" for key, value in evidence["verdicts"].items())
        origin = (
            f"Recalibrated from operators' feedback ({evidence['predictions']} predictions of "
            f"weights {evidence['weights_digest']}: {verdicts}; "
            f"{evidence['unreviewed_alarms_left_out']} unreviewed alarms left out)."
        )
    else:
        origin = (
            f"Recalibrated on labelled data {evidence['data']} ({evidence['images']}: "
            f"{evidence['n_images']} images, {evidence['n_defective']} defective)."
        )
    operating = after.evidence.get("operating_point", {})
    lines = [
        origin,
        f"Image threshold (raw) {before.image_threshold:.6g} -> {after.image_threshold:.6g}; "
        f"pixel threshold {before.pixel_threshold:.6g} -> {after.pixel_threshold:.6g}; "
        f"method {after.method}.",
        f"Before: {_rate_text(evidence['before'])}. After: {_rate_text(evidence['after'])}.",
    ]
    if operating.get("rule") == "false_alarm":
        text = describe_operating_point(operating)
        lines.append(f"{text[0].upper()}{text[1:]}.")
    if evidence["source"] == "feedback":
        lines.append("Pixel threshold and region settings kept (feedback has no outlines).")
    return "\n".join(lines)
