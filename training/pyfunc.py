"""The MLflow pyfunc face of a Loomwatch bundle.

A training run logs its bundle as an MLflow model whose ``python_function`` flavour is
:class:`BundleModel` (logged "from code": MLflow runs ``training/mlflow_model.py``, which only
builds this class, so no pickled object is stored). Any MLflow tool can then score images with
no code beyond the installed ``loomwatch`` package::

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
from importlib import metadata
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

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


def pip_requirements() -> list[str]:
    """What the logged model needs: this package (which brings torch etc.) and MLflow."""
    pins = []
    for package in ("loomwatch", "mlflow", "torch", "torchvision", "pandas"):
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins
