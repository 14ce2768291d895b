"""The MLflow pyfunc face of a Loomwatch model folder (a bundle or an exported model).

A training run (and ``loomwatch export --register``) logs its model folder as an MLflow model
whose ``python_function`` flavour is :class:`BundleModel`, logged "from code": MLflow runs
``training/mlflow_model.py``, which only builds this class, so no pickled object is stored.

The logged model is self-contained: it carries the folder (artifact ``bundle``), the project's
own code (``code/models`` and ``code/training``, sources only, through MLflow's ``code_paths``;
MLflow puts ``code/`` first on ``sys.path`` when it loads the model) and requirements pinned to
the versions that logged it (:func:`pip_requirements`: PyTorch only for a PyTorch bundle, ONNX
Runtime or OpenVINO for an exported one). So a fresh environment with nothing but those
requirements loads and serves it, without this repository or the ``loomwatch`` package::

    model = mlflow.pyfunc.load_model("models:/fabric-demo@champion")
    model.predict(pd.DataFrame({"image": [Path("strip.png").read_bytes()]}))

Input: a DataFrame with one column ``image`` holding encoded image files (PNG, JPEG, BMP, TIFF),
as bytes; over HTTP (``mlflow models serve``) the same column is sent base64-encoded, as MLflow
does for binary columns. Optional parameter ``threshold`` (normalised image threshold, 0.5).
Output: one row per image with the columns of :data:`OUTPUT_COLUMNS`.
"""

from __future__ import annotations

import base64
import binascii
import json
from importlib import import_module, metadata
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from models.manifest import Manifest
from models.pipeline import Detector
from models.preprocessing import ImageDecodeError

IMAGE_COLUMN = "image"
BUNDLE_ARTIFACT = "bundle"
OUTPUT_COLUMNS: dict[str, str] = {
    "score": "double",  # normalised image score, 0.5 = calibrated threshold
    "raw_score": "double",
    "threshold": "double",  # normalised threshold used
    "decision": "string",  # "anomalous" or "normal"
    "is_anomalous": "boolean",
    "n_regions": "long",  # defect regions kept after suppression
    "n_suppressed": "long",
    "regions": "string",  # JSON list of kept regions: bbox, area, peak, mean
    "width": "long",
    "height": "long",
}

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
    outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()]),
    params=ParamSchema([ParamSpec("threshold", "double", 0.5)]),
)


def image_bytes(value: Any) -> bytes:
    """One cell of the ``image`` column as file bytes (base64 text is decoded)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("a string image must be base64-encoded file bytes") from None
    raise ValueError(f"expected encoded image bytes, got {type(value).__name__}")


def predict_frame(detector: Detector, frame: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    if IMAGE_COLUMN not in frame.columns:
        raise MlflowException.invalid_parameter_value(
            f"input needs a column '{IMAGE_COLUMN}' of encoded images; got {list(frame.columns)}"
        )
    rows = []
    for index, value in enumerate(frame[IMAGE_COLUMN]):
        try:
            prediction = detector.predict(image_bytes(value), threshold=threshold)
        except (ImageDecodeError, ValueError) as exc:
            raise MlflowException.invalid_parameter_value(f"image {index}: {exc}") from None
        height, width = prediction.analysis.image.shape
        rows.append(
            {
                "score": prediction.score,
                "raw_score": prediction.raw_score,
                "threshold": prediction.threshold,
                "decision": "anomalous" if prediction.decision else "normal",
                "is_anomalous": prediction.decision,
                "n_regions": len(prediction.post.kept),
                "n_suppressed": len(prediction.post.suppressed),
                "regions": json.dumps([region.to_json() for region in prediction.post.kept]),
                "width": width,
                "height": height,
            }
        )
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


class BundleModel(PythonModel):
    """Loads the bundle artifact into a :class:`Detector` and scores a column of images."""

    detector: Detector

    def load_context(self, context: PythonModelContext) -> None:
        self.detector = Detector.from_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        threshold = (params or {}).get("threshold")
        return predict_frame(self.detector, model_input, None if threshold is None else threshold)


# What every logged model imports: MLflow and this pipeline (models.pipeline and what it reads).
COMMON_REQUIREMENTS = ("mlflow", "pandas", "numpy", "pillow", "pydantic")
# ... and what runs its network: a bundle's model (models.bundle -> models.registry), or a runtime.
NETWORK_REQUIREMENTS = {
    "torch": ("torch", "torchvision", "safetensors", "tqdm"),
    "onnx": ("onnxruntime",),
    "openvino": ("openvino",),
}
OPENCV = "cv2"  # several distributions provide it: the one installed is pinned
CODE_PACKAGES = ("models", "training")  # the project's code the model carries


def pip_requirements(manifest: Manifest) -> list[str]:
    """What a fresh environment needs to load the model of ``manifest``, pinned to the versions
    installed here (local version labels such as ``+cu130`` dropped: they are not on PyPI).

    Not ``loomwatch`` itself: its code travels in the model (:func:`code_paths`)."""
    return requirements_for("torch" if manifest.export is None else manifest.export.format)


def requirements_for(kind: str) -> list[str]:
    """The pinned requirements of a model whose network is ``kind`` (torch, onnx, openvino)."""
    packages = [*COMMON_REQUIREMENTS, _distribution(OPENCV, "opencv-python-headless")]
    return [_pinned(package) for package in [*packages, *NETWORK_REQUIREMENTS[kind]]]


def _distribution(module: str, default: str) -> str:
    names = metadata.packages_distributions().get(module) or [default]
    return names[0]


def _pinned(package: str) -> str:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return package
    return f"{package}=={version.partition('+')[0]}"


def code_paths(staging: Path) -> list[str]:
    """Copies of the project's packages the model imports (``.py`` files only) in ``staging``,
    for ``log_model(code_paths=...)``: MLflow copies each into the model's ``code/`` folder."""
    folders = []
    for name in CODE_PACKAGES:
        source = Path(import_module(name).__file__ or "").parent
        target = staging / name
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            copy = target / path.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
        folders.append(str(target))
    return folders
