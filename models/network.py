"""What runs a model's network: eager PyTorch or an exported graph, behind one interface.

The pipeline (:mod:`models.pipeline`) cuts tiles, stitches maps, calibrates and post-processes
in Python whatever runs the network; a :class:`Network` only turns a batch of tiles into anomaly
maps and tile scores. ``torch`` runs a bundle's model; ``onnxruntime`` and ``openvino`` run the
network file of an exported folder (``loomwatch export``). This module imports no runtime until
one is asked for, so a service that runs an exported model needs no PyTorch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.manifest import PIPELINE_VERSION, BundleError, Manifest, file_sha256

if TYPE_CHECKING:
    from models.base import AnomalyModel

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# format -> the runtimes that can run it, the first being what "auto" picks
RUNTIMES = {"torch": ("torch",), "onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


class BackendError(RuntimeError):
    """A backend cannot run this model (wrong format, runtime not installed); one line."""


class Network(Protocol):
    backend: str

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tiles [B,1,T,T] float32 in [0,1] and valid [B,1,T,T] bool -> maps [B,T,T] float32
        (higher = more anomalous) and tile scores [B] float32."""
        ...


class TorchNetwork:
    """A bundle's model run eagerly by PyTorch on the CPU."""

    backend = "torch"

    def __init__(self, model: AnomalyModel, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self.model = model.eval()

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            output = self.model.predict(torch.from_numpy(tiles), torch.from_numpy(valid))
        return output.anomaly_map.float().numpy(), output.score.float().numpy()


class OnnxRuntimeNetwork:
    """An exported ONNX network run by ONNX Runtime (CPU execution provider)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for a bad file
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({_first_line(exc)})") from None

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = {"tiles": tiles, "valid": valid.astype(np.float32)}
        maps, scores = self.session.run(None, feeds)
        return np.asarray(maps, np.float32), np.asarray(scores, np.float32)


class OpenVinoNetwork:
    """An exported network (OpenVINO IR or ONNX) compiled by OpenVINO for the CPU.

    fp32 networks are compiled with the f32 inference precision: OpenVINO would otherwise pick
    bf16 on CPUs that have it, and the maps would no longer match PyTorch's."""

    backend = "openvino"

    def __init__(self, path: Path, int8: bool, threads: int | None = None) -> None:
        import openvino as ov

        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if not int8:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a long text
            raise BundleError(f"{path}: OpenVINO cannot load it ({_first_line(exc)})") from None
        self.request = self.compiled.create_infer_request()

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = self.request.infer({"tiles": tiles, "valid": valid.astype(np.float32)})
        maps, scores = (results[output] for output in self.compiled.outputs)
        return np.array(maps, np.float32), np.array(scores, np.float32)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def require_runtime(backend: str) -> None:
    """BackendError naming the package to install when ``backend``'s runtime is missing."""
    package = PACKAGES[backend]
    if importlib.util.find_spec(package) is not None:
        return
    if backend == "torch":  # torch alone is not enough: safetensors, torchvision for PatchCore
        how = "pip install 'loomwatch[torch]' (README \"Install\": the CPU-only build)"
    else:
        how = f"pip install {package} (the '{backend}' extra: pip install 'loomwatch[{backend}]')"
    raise BackendError(f"the {backend} backend needs {package}, which is not installed: {how}")


def choose_backend(manifest: Manifest, backend: str, where: str) -> str:
    """The runtime that will run the model of ``manifest`` for the asked ``backend``."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    kind = "torch" if manifest.export is None else manifest.export.format
    able = RUNTIMES[kind]
    if backend == "auto":
        return able[0]
    if backend not in able:
        if kind == "torch":
            raise BackendError(
                f"{where} is a PyTorch bundle; the {backend} backend runs exported models: "
                f"loomwatch export --model-uri {where} --format onnx --out DIR"
            )
        raise BackendError(
            f"{where} is an exported {kind} model: the {backend} backend cannot run it "
            f"(it runs on {' or '.join(able)})"
        )
    return backend


def load_network(
    directory: Path | str, manifest: Manifest, backend: str = "auto", threads: int | None = None
) -> Network:
    """The network of the model folder ``directory``, on ``backend`` (see :data:`BACKENDS`)."""
    folder = Path(directory)
    chosen = choose_backend(manifest, backend, str(folder))
    require_runtime(chosen)
    if manifest.export is None:
        from models.bundle import load_bundle

        model, _ = load_bundle(folder)
        return TorchNetwork(model, threads)
    export = manifest.export
    if export.pipeline_version != PIPELINE_VERSION:
        raise BundleError(
            f"{folder}: exported for pipeline version {export.pipeline_version}, this Loomwatch "
            f"runs version {PIPELINE_VERSION}: export the source model again "
            f"({export.source_uri})"
        )
    for name, digest in export.files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: missing")
        if file_sha256(path) != digest:
            raise BundleError(
                f"{path}: corrupt or truncated (its sha256 differs from the manifest)"
            )
    network = folder / export.network
    if chosen == "onnxruntime":
        return OnnxRuntimeNetwork(network, threads)
    return OpenVinoNetwork(network, export.precision == "int8", threads)
