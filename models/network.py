"""What runs a model's network: eager PyTorch or an exported graph, behind one interface.

The pipeline (:mod:`models.pipeline`) cuts tiles, stitches maps, calibrates and post-processes
in Python whatever runs the network; a :class:`Network` only turns a batch of tiles into anomaly
maps and tile scores. ``torch`` runs a bundle's model; ``onnxruntime`` and ``openvino`` run the
network file of an exported folder (``loomwatch export``). This module imports no runtime until
one is asked for, so a service that runs an exported model needs no PyTorch.
"""

from __future__ import annotations

import importlib.util
import math
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.device import DeviceError, check_device_name, check_precision_name
from models.manifest import PIPELINE_VERSION, BundleError, Manifest, file_sha256

if TYPE_CHECKING:
    from models.base import AnomalyModel
    from models.device import Runtime

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# format -> the runtimes that can run it; "auto" picks the first one installed
RUNTIMES = {"torch": ("torch",), "onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


class BackendError(RuntimeError):
    """A backend cannot run this model (wrong format, runtime not installed); one line."""


class Network(Protocol):
    backend: str
    device: str  # where it runs: "cpu", "cuda:0", ...
    precision: str  # "32", "bf16", "16-mixed" (torch); "fp32" or "int8" (exports)

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tiles [B,1,T,T] float32 in [0,1] and valid [B,1,T,T] bool -> maps [B,T,T] float32
        (higher = more anomalous) and tile scores [B] float32."""
        ...


class TorchNetwork:
    """A bundle's model run eagerly by PyTorch on the runtime's device and precision (without
    one: fp32 where the model's tensors are); tiles go there, maps come back as host fp32."""

    backend = "torch"

    def __init__(
        self, model: AnomalyModel, threads: int | None = None, runtime: Runtime | None = None
    ) -> None:
        import torch

        from models.device import Runtime, module_device

        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self.runtime = runtime or Runtime(module_device(model))  # fp32 where the model is
        self.runtime.prepare(model)
        model.eval()
        self.model: AnomalyModel = model
        self.device = str(self.runtime.device)
        self.precision = self.runtime.precision

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        output = self.runtime.predict(self.model, torch.from_numpy(tiles), torch.from_numpy(valid))
        return output.anomaly_map.numpy(), output.score.numpy()


class Streams:
    """Tiles spread over independent single-threaded runs of the network, one per core.

    A strip's tiles are independent, so the exported runtimes run one tile per call on one
    thread each, ``count`` calls at a time, instead of one batch on ``count`` intra-op threads:
    no barrier between the threads at every layer, and a tile's activations stay in its core's
    cache. On 2 cores (bench/latency.py, DRAEM default widths) this made a strip 1.4-2x
    faster on ONNX Runtime and OpenVINO alike, more so when the cores are shared with other
    work. Results do not change: every tile is computed alone either way.
    """

    def __init__(self, count: int, run_one: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]):
        self.count = count
        self.run_one = run_one
        self.pool = ThreadPoolExecutor(count, "loomwatch-stream") if count > 1 else None

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = valid.astype(np.float32)
        pieces = [(tiles[i : i + 1], valid[i : i + 1]) for i in range(len(tiles))]
        if self.pool is None or len(pieces) < 2:
            outputs = [self.run_one(*piece) for piece in pieces]
        else:
            outputs = list(self.pool.map(lambda piece: self.run_one(*piece), pieces))
        maps = np.concatenate([np.asarray(m, np.float32) for m, _ in outputs])
        scores = np.concatenate([np.asarray(s, np.float32).reshape(-1) for _, s in outputs])
        return maps, scores


def cores(threads: int | None) -> int:
    """The cores a runtime may use: ``threads``, else the cores this process may run on, fewer
    when a container's CPU quota allows fewer (``docker run --cpus 2`` on a 64-core host
    leaves all 64 in the affinity mask; 64 streams would then fight over two cores' time)."""
    if threads:
        return threads
    allowed = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    return max(1, min(allowed, math.ceil(quota))) if quota else allowed


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup's CFS quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None: no
    quota."""
    v2, v1 = cgroup / "cpu.max", cgroup / "cpu" / "cpu.cfs_quota_us"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int((v1.parent / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


class OnnxRuntimeNetwork:
    """An exported ONNX network run by ONNX Runtime (CPU execution provider).

    One session, all graph optimisations (ORT's NCHWc layout and fusions), one intra-op thread
    per run; ``threads`` runs at a time (:class:`Streams`). ORT's session is thread-safe."""

    backend = "onnxruntime"
    device = "cpu"
    precision = "fp32"  # of the graph as written: an int8 graph says so in its manifest

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for a bad file
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({_first_line(exc)})") from None
        self.streams = Streams(cores(threads), self._run_one)

    def _run_one(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[Any, Any]:
        maps, scores = self.session.run(None, {"tiles": tiles, "valid": valid})
        return maps, scores

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.streams.run(tiles, valid)


class OpenVinoNetwork:
    """An exported network (OpenVINO IR or ONNX) compiled by OpenVINO for the CPU.

    Compiled for one tile at a time (a static shape: OpenVINO plans memory and picks kernels
    once, where a free batch size re-plans per call) with one stream per core and one infer
    request per stream (:class:`Streams`). Networks are compiled with the f32 inference
    precision, the float parts of an int8 network too: OpenVINO would otherwise pick bf16 on
    CPUs that have it, and the maps would no longer match PyTorch's (nor be the same from one
    machine to the next)."""

    backend = "openvino"
    device = "cpu"

    def __init__(self, path: Path, int8: bool, threads: int | None = None) -> None:
        import openvino as ov

        count = cores(threads)
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": count,
            "INFERENCE_NUM_THREADS": count,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        core = ov.Core()
        try:
            network = core.read_model(str(path))
            network.reshape({port.get_any_name(): _one_tile(port) for port in network.inputs})
            self.compiled = core.compile_model(network, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a long text
            raise BundleError(f"{path}: OpenVINO cannot load it ({_first_line(exc)})") from None
        self.int8 = int8
        self.precision = "int8" if int8 else "fp32"
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(count):
            request = self.compiled.create_infer_request()
            # One call on each request from this thread before any concurrent one: two
            # threads making the process's first inferences at once can deadlock inside
            # OpenVINO's Python binding (one holds the GIL and waits on a C++ static's
            # initialisation guard, the other holds the guard and waits for the GIL: seen as
            # a service that never became ready, py-spy on both streams in InferRequest.infer).
            request.infer({port.get_any_name(): np.zeros(port.shape, np.float32)
                           for port in self.compiled.inputs})  # fmt: skip
            self.requests.put(request)
        self.streams = Streams(count, self._run_one)

    def _run_one(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[Any, Any]:
        request = self.requests.get()
        try:
            results = request.infer({"tiles": tiles, "valid": valid})
            maps, scores = (np.array(results[port]) for port in self.compiled.outputs)
        finally:
            self.requests.put(request)
        return maps, scores

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.streams.run(tiles, valid)


def _one_tile(port: Any) -> list[int]:
    """An input's shape with a batch of one (tiles and valid: [1,1,T,T])."""
    shape = port.get_partial_shape()
    return [1, *(int(dimension.get_length()) for dimension in list(shape)[1:])]


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
    if backend == "auto":  # the first that is installed (a slim install has one runtime)
        installed = [name for name in able if importlib.util.find_spec(PACKAGES[name])]
        return (installed or able)[0]
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


def check_export_runtime(manifest: Manifest, device: str, precision: str, where: str) -> None:
    """An exported model runs on the CPU in the precision it was exported in: DeviceError when
    asked for another device or precision (``auto`` and ``32`` ask for nothing)."""
    device, precision = check_device_name(device), check_precision_name(precision)
    if manifest.export is None:
        return
    if device not in ("auto", "cpu"):
        raise DeviceError(
            f"{where} is an exported model, run on the CPU by ONNX Runtime or OpenVINO: device "
            f"{device} needs the PyTorch bundle it came from ({manifest.export.source_uri})"
        )
    if precision != "32":
        raise DeviceError(
            f"{where} is an exported {manifest.export.precision} model: precision {precision} "
            "applies to PyTorch bundles"
        )


def load_network(
    directory: Path | str,
    manifest: Manifest,
    backend: str = "auto",
    threads: int | None = None,
    device: str = "auto",
    precision: str = "32",
    channels_last: bool = False,
) -> Network:
    """The network of the model folder ``directory``, on ``backend`` (see :data:`BACKENDS`),
    ``device`` and ``precision`` (models/device.py; exported models run on the CPU)."""
    folder = Path(directory)
    chosen = choose_backend(manifest, backend, str(folder))
    check_export_runtime(manifest, device, precision, str(folder))
    require_runtime(chosen)
    if manifest.export is None:
        from models.bundle import load_bundle
        from models.device import Runtime

        runtime = Runtime.resolve(device, precision, channels_last)  # before the weights load
        model, _ = load_bundle(folder)
        return TorchNetwork(model, threads, runtime)
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
        session = OnnxRuntimeNetwork(network, threads)
        session.precision = export.precision
        return session
    return OpenVinoNetwork(network, export.precision == "int8", threads)
