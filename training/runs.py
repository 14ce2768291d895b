"""The MLflow run of a training: what it logs, and how its model is registered.

The store itself (where it is, reaching it, its errors) and the registry are :mod:`tracking`'s;
this module only says what a ``loomwatch train`` records there.

A training run ends FINISHED only when the bundle, the logged model and (if asked) the registered
version all exist; an exception ends it FAILED, Ctrl-C or SIGTERM ends it KILLED, and in both
cases nothing is registered.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.entities import RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from models.base import EpochLog
from models.manifest import Manifest, read_manifest
from models.overlay import encode_png
from tracking.registry import TAG, register_version, version_tags
from tracking.store import (
    TrackingError,
    experiment_id,
    mlflow_errors,
    mlflow_message,
    use_tracking_store,
)
from tracking.uris import parse_model_uri, pin_model_uri
from training import pyfunc
from training.config import TrainConfig
from training.data import Dataset, Split, fingerprint, load_image

if TYPE_CHECKING:
    from training.train import TrainResult

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "model"  # the logged model: runs:/<run id>/model
BUNDLE_IN_RUN = "bundle"  # the bundle again, as plain run artifacts: runs:/<run id>/bundle


# ---- what a run logs ---------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.backbone": "resnet18", ...}; non-strings as JSON."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def finite_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The entries that are finite numbers (MLflow metrics), NaN and None left out."""
    metrics: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            continue
        if math.isfinite(float(value)):
            metrics[f"{prefix}{key}"] = float(value)
    return metrics


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out where Loomwatch's code lives (read from .git, no git binary)."""
    here = (start or Path(__file__)).resolve()
    for folder in (here, *here.parents):
        dot_git = folder / ".git"
        if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text().strip()
            dot_git = (folder / text.removeprefix("gitdir:").strip()).resolve()
        if dot_git.is_dir():
            return _read_head(dot_git)
    return None


def _read_head(git_dir: Path) -> str | None:
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.removeprefix("ref:").strip()
        common = git_dir
        if (git_dir / "commondir").is_file():
            common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
        for base in (git_dir, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    except OSError:
        return None
    return None  # a branch with no commit yet


def run_tags(model_type: str, fabric: str | None, data: Path) -> dict[str, str]:
    from models.bundle import library_versions

    tags = {f"{TAG}model_type": model_type, f"{TAG}fabric": fabric or "all"}
    tags[f"{TAG}data"] = str(data)
    commit = git_commit()
    if commit:
        tags[f"{TAG}git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    versions = {**library_versions(), "mlflow": mlflow.__version__}
    tags.update({f"{TAG}version.{name}": value for name, value in versions.items()})
    return tags


def input_example(split: Split, tile_size: int) -> pd.DataFrame:
    """A small real image (a crop of a validation image, two tiles wide) for the logged model."""
    samples = sorted(split.validation, key=lambda s: s.label) or list(split.train)
    image = load_image(samples[0])
    crop = image[:, : min(image.shape[1], 2 * tile_size)]
    return pd.DataFrame({pyfunc.IMAGE_COLUMN: [encode_png(np.ascontiguousarray(crop))]})


class TrainingRun:
    """The MLflow run of one ``loomwatch train``: hands callbacks to training, logs its result."""

    def __init__(self, run_id: str, store: str) -> None:
        self.run_id = run_id
        self.store = store
        self.client = mlflow.MlflowClient()
        self._epoch_logging_failed = False
        self.model_info: ModelInfo | None = None
        self.version: ModelVersion | None = None

    @property
    def model_uri(self) -> str:
        """``models:/NAME/VERSION`` when registered, else ``runs:/<run id>/model``."""
        if self.version is not None:
            return f"models:/{self.version.name}/{self.version.version}"
        return f"runs:/{self.run_id}/{MODEL_NAME_IN_RUN}"

    def log_params(self, config: TrainConfig, extra: Mapping[str, Any]) -> None:
        params = flatten(config.model_dump(mode="json"))
        params.update(flatten(extra, "train."))
        mlflow.log_params(params)

    def on_epoch(self, entry: EpochLog) -> None:
        """The models' fit callback: per-epoch figures as ``fit/<name>`` at step = epoch.

        A tracking hiccup here must not lose hours of training: it is logged once and skipped;
        the final logging reports any lasting problem.
        """
        metrics = finite_metrics(entry.metrics, "fit/")
        metrics["fit/epoch_seconds"] = float(entry.seconds)
        try:
            mlflow.log_metrics(metrics, step=entry.epoch)
        except MlflowException as exc:
            if not self._epoch_logging_failed:
                log.warning("could not log epoch metrics to MLflow: %s", mlflow_message(exc))
            self._epoch_logging_failed = True

    def on_split(self, dataset: Dataset, split: Split) -> None:
        """Tag the data as soon as it is known, so even a failed run says what it trained on."""
        mlflow.set_tags(
            {
                f"{TAG}data_fingerprint": fingerprint(dataset.samples, dataset.root),
                f"{TAG}validation_fingerprint": fingerprint(split.validation, dataset.root),
                f"{TAG}data_layout": dataset.layout,
            }
        )
        mlflow.log_params(
            {"data.train_images": len(split.train), "data.validation_images": len(split.validation)}
        )

    def log_result(
        self,
        result: TrainResult,
        config: TrainConfig,
        config_file: Path | None,
        description: str,
    ) -> ModelInfo:
        """Validation metrics, report, config, bundle and the pyfunc model, in that order."""
        from training.evaluate import evaluation_summary, write_outputs

        metrics = finite_metrics(result.evaluation.metrics)
        fit_summary = result.manifest.training.get("fit_summary", {})
        metrics.update(finite_metrics(fit_summary, "fit_summary/"))
        metrics.update(finite_metrics(result.seconds, "seconds/"))
        mlflow.log_metrics(metrics)
        mlflow.set_tag(f"{TAG}bundle", str(result.bundle.resolve()))
        with tempfile.TemporaryDirectory(prefix="loomwatch-run-") as tmp:
            folder = Path(tmp)
            summary = evaluation_summary(result.detector, result.evaluation, self.model_uri)
            write_outputs(
                result.detector,
                result.evaluation,
                summary,
                json_path=folder / "evaluation" / "metrics.json",
                report_dir=folder / "evaluation",
                data=description,
            )
            mlflow.log_artifacts(str(folder / "evaluation"), "evaluation")
            resolved = folder / "config"
            resolved.mkdir()
            (resolved / "resolved.yaml").write_text(
                yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
            )
            if config_file is not None:
                (resolved / f"given-{config_file.name}").write_bytes(config_file.read_bytes())
            mlflow.log_artifacts(str(resolved), "config")
        example = input_example(result.split, result.manifest.pipeline.tile_size)
        return self.log_model(result.bundle, result.manifest, example)

    def log_model(self, folder: Path, manifest: Manifest, example: pd.DataFrame) -> ModelInfo:
        """The model folder as plain artifacts (``bundle/``) and as the self-contained pyfunc
        model ``model``: the folder, the project's code and pinned requirements."""
        mlflow.log_artifacts(str(folder), BUNDLE_IN_RUN)
        with tempfile.TemporaryDirectory(prefix="loomwatch-code-") as code:
            self.model_info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(Path(pyfunc.__file__).with_name("mlflow_model.py")),
                artifacts={pyfunc.BUNDLE_ARTIFACT: str(folder)},
                code_paths=pyfunc.code_paths(Path(code)),
                signature=pyfunc.SIGNATURE,
                input_example=example,
                pip_requirements=pyfunc.pip_requirements(manifest),
            )
        return self.model_info

    def register(
        self, name: str, alias: str | None, description: str | None = None
    ) -> ModelVersion:
        """A new version of `name` from this run's logged model, then the alias; all or nothing."""
        if self.model_info is None:
            raise TrackingError("nothing to register: the model was not logged")
        run = self.client.get_run(self.run_id)
        tags = version_tags(run.data.tags)
        uri = self.model_info.model_uri
        self.version = register_version(uri, name, alias, tags, description)
        return self.version


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, a CI cancel) while a run is open: ends it KILLED like Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextmanager
def training_run(
    run_name: str, tags: Mapping[str, str], *, progress: bool = False, nested: bool = False
) -> Iterator[TrainingRun]:
    """Open a run; end it FINISHED, FAILED (exception) or KILLED (Ctrl-C, SIGTERM, timeout).

    ``nested``: a child of the run already open (one fabric's run under its fleet's run)."""
    store = use_tracking_store(progress=progress)
    experiment = experiment_id()
    with mlflow_errors("MLflow run"):
        run = mlflow.start_run(
            experiment_id=experiment, run_name=run_name, tags=dict(tags), nested=nested
        )
    previous = _handle_sigterm()
    status = RunStatus.FAILED
    try:
        yield TrainingRun(run.info.run_id, store)
        status = RunStatus.FINISHED
    except (KeyboardInterrupt, TimeoutError):
        status = RunStatus.KILLED
        raise
    except MlflowException as exc:  # e.g. the server went away while the run was open
        raise TrackingError(f"MLflow run {run.info.run_id}: {mlflow_message(exc)}") from None
    finally:
        _restore_sigterm(previous)
        try:
            mlflow.end_run(RunStatus.to_string(status))
        except MlflowException as exc:
            log.warning("could not close MLflow run %s: %s", run.info.run_id, mlflow_message(exc))


# ---- the run of an export ---------------------------------------------------------------------

# Tags of the source run an export run keeps: what the network was trained on.
SOURCE_TAGS = ("model_type", "fabric", "data", "data_fingerprint", "validation_fingerprint",
               "data_layout")  # fmt: skip


def source_run_id(uri: str) -> str | None:
    """The MLflow run that logged the model at ``uri``; None for a local folder."""
    parsed = parse_model_uri(uri)
    if parsed.kind == "local":
        return None
    if parsed.kind == "run":
        return parsed.run_id
    client = mlflow.MlflowClient()
    with mlflow_errors(uri):
        if parsed.kind == "logged":
            return str(client.get_logged_model(parsed.name).source_run_id or "") or None
        pinned = parse_model_uri(pin_model_uri(uri))
        return str(client.get_model_version(pinned.name, pinned.version).run_id or "") or None


def trained_on_tags(
    manifest: Manifest, source_uri: str, kept: Iterable[str], source_run_tag: str
) -> dict[str, str]:
    """What a model folder's weights were trained on: the manifest's training record, and the
    ``kept`` tags of the source run when ``source_uri`` is an MLflow model (its id as
    ``source_run_tag``)."""
    training = manifest.training
    tags = run_tags(manifest.model_type, training.get("fabric"), Path(training.get("data", "")))
    if "fingerprint" in training:
        tags[f"{TAG}data_fingerprint"] = str(training["fingerprint"])
    run_id = source_run_id(source_uri)
    if run_id is not None:
        with mlflow_errors(source_uri):
            source = mlflow.MlflowClient().get_run(run_id).data.tags
        names = {f"{TAG}{key}" for key in kept}
        tags.update({key: value for key, value in source.items() if key in names})
        tags[f"{TAG}{source_run_tag}"] = run_id
    return tags


def export_run_tags(manifest: Manifest, source_uri: str) -> dict[str, str]:
    """An export run's tags: what the source was trained on (the source run's tags when it is
    an MLflow model, else the manifest's), this checkout and its libraries, and the export."""
    export = manifest.export
    if export is None:
        raise TrackingError("not an exported model: export it first")
    tags = trained_on_tags(manifest, source_uri, SOURCE_TAGS, "export.source_run")
    tags[f"{TAG}export.format"] = export.format
    tags[f"{TAG}export.precision"] = export.precision
    tags[f"{TAG}export.source_uri"] = source_uri
    return tags


def fabric_example(tile_size: int, seed: int = 0) -> pd.DataFrame:
    """A synthetic defect-free strip two tiles wide: the input example of an export run, which
    has no data of its own."""
    from training.synth.fabric import make_fabric, sample_fabric_params

    rng = np.random.default_rng(seed)
    strip = make_fabric(rng, sample_fabric_params(rng), tile_size, 2 * tile_size)
    return pd.DataFrame({pyfunc.IMAGE_COLUMN: [encode_png(strip)]})


def log_export(
    folder: Path, source_uri: str, name: str | None, alias: str | None, *, progress: bool = False
) -> TrainingRun:
    """Log the exported model folder ``folder`` as a run of its own with the same pyfunc model
    as a training run (its network run by the export's runtime), and register it as a new
    version of ``name`` (alias ``alias``) when a name is given."""
    manifest = read_manifest(folder)
    use_tracking_store(progress=progress)
    tags = export_run_tags(manifest, source_uri)
    export = manifest.export
    assert export is not None  # export_run_tags checked it
    with training_run(f"export-{folder.name}", tags, progress=progress) as run:
        params = flatten(manifest.training.get("full_config") or {})
        params.update(
            flatten(
                {
                    "format": export.format,
                    "precision": export.precision,
                    "source_uri": source_uri,
                    "opset": export.opset,
                    "calibration_images": export.calibration_images,
                    "calibration_tiles": export.calibration_tiles,
                },
                "export.",
            )
        )
        mlflow.log_params(params)
        run.log_model(folder, manifest, fabric_example(manifest.pipeline.tile_size))
        if name:
            run.register(name, alias)
    return run


# ---- the run of a recalibration ---------------------------------------------------------------


def recalibration_run_tags(manifest: Manifest, source_uri: str, evidence: str) -> dict[str, str]:
    """What the weights were trained on (the source run's tags when it is an MLflow model, else
    the manifest's), the export they run as, and where the new calibration came from."""
    kept = (*SOURCE_TAGS, "export.format", "export.precision")
    tags = trained_on_tags(manifest, source_uri, kept, "calibration.source_run")
    if manifest.export is not None:
        tags[f"{TAG}export.format"] = manifest.export.format
        tags[f"{TAG}export.precision"] = manifest.export.precision
    tags[f"{TAG}calibration.source_uri"] = source_uri
    tags[f"{TAG}calibration.evidence"] = evidence
    return tags


def log_recalibration(
    folder: Path,
    source_uri: str,
    evidence: Mapping[str, Any],
    description: str,
    name: str | None,
    alias: str | None,
    *,
    progress: bool = False,
) -> TrainingRun:
    """Log the recalibrated model folder as a run of its own (the evidence as an artifact and
    the description as the run's note) and register it, with the description, as a new version
    of ``name`` when a name is given."""
    manifest = read_manifest(folder)
    use_tracking_store(progress=progress)
    tags = recalibration_run_tags(manifest, source_uri, str(evidence["source"]))
    tags["mlflow.note.content"] = description
    calibration = manifest.calibration
    with training_run(f"calibrate-{folder.name}", tags, progress=progress) as run:
        params = flatten(manifest.training.get("full_config") or {})
        params.update(
            flatten(
                {
                    "source_uri": source_uri,
                    "evidence": evidence["source"],
                    "image_threshold": calibration.image_threshold,
                    "pixel_threshold": calibration.pixel_threshold,
                    "method": calibration.method,
                },
                "recalibration.",
            )
        )
        mlflow.log_params(params)
        for when in ("before", "after"):
            rates = evidence[when]
            figures = {
                f"{when}/false_alarm_rate": rates["false_alarms"] / rates["defect_free"]
                if rates["defect_free"]
                else math.nan,
                f"{when}/detection_rate": rates["defects_caught"] / rates["defects"]
                if rates["defects"]
                else math.nan,
            }
            mlflow.log_metrics(finite_metrics(figures))
        mlflow.log_dict(dict(evidence), "calibration/evidence.json")
        mlflow.log_text(description, "calibration/description.txt")
        run.log_model(folder, manifest, fabric_example(manifest.pipeline.tile_size))
        if name:
            run.register(name, alias, description)
    return run


def _handle_sigterm() -> Any:
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
