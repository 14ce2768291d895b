"""Export a bundle's network for CPU runtimes: ONNX (ONNX Runtime) or OpenVINO IR, fp32 or int8.

What is exported is the model's whole ``predict`` for a batch of tiles: inputs ``tiles``
[B,1,T,T] float32 in [0,1] and ``valid`` [B,1,T,T] float32 (1 on fabric), outputs ``map``
[B,T,T] and ``score`` [B]. Everything around it (decoding, valid area, tiling, stitching,
calibration, post-processing) stays the one Python pipeline, so an exported folder is the
bundle's manifest (with an ``export`` section) plus the network file(s) instead of weights.

int8 is static post-training quantisation on defect-free tiles: ONNX Runtime's quantisation
tools (QDQ, per-channel signed weights) for ONNX, NNCF for OpenVINO. Only the convolutions are
quantised (weights and input activations); the normalisation, the nearest-neighbour distances
of PatchCore and the scoring stay in float (they are cheap and sensitive).

The folder is written beside its target and renamed into place: a failed export leaves nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.base import AnomalyModel
from models.bundle import load_bundle
from models.manifest import (
    MANIFEST,
    PIPELINE_VERSION,
    BundleError,
    ExportInfo,
    file_sha256,
    folder_digest,
    move_into_place,
    read_manifest,
)
from models.network import require_runtime

log = logging.getLogger("loomwatch.export")

FORMATS = ("onnx", "openvino")
OPSET = 18
ONNX_FILE = "model.onnx"
IR_FILE = "model.xml"
# the runtime each format needs to be written (and, for int8, quantised)
WRITERS = {"onnx": ("onnxruntime",), "openvino": ("openvino",)}
# the OpenVINO operations that int8 quantises (their weights and input activations)
CONVOLUTIONS = {"Convolution", "GroupConvolution", "ConvolutionBackpropData"}


class ExportError(RuntimeError):
    """An export cannot be made as asked; one line."""


class _Graph(nn.Module):
    """The model's predict as a graph of tensors: (tiles, valid 0/1) -> (map, score)."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tiles: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model.predict(tiles, valid > 0.5)
        return output.anomaly_map, output.score


class _ChannelwiseGroupNorm(nn.Module):
    """``nn.GroupNorm`` written with reductions over the spatial axes and per-channel arithmetic
    only (the same function, two-pass variance as PyTorch's): no reshape of the whole tensor.

    PyTorch exports GroupNorm as Reshape -> InstanceNormalization -> Reshape. OpenVINO's CPU
    plugin keeps convolution outputs in a blocked channel layout and has to turn every one of
    them back into plain NCHW for that reshape: those reorders took 39 % of a DRAEM tile
    (OpenVINO's per-layer counters). Written this way the layout stays blocked and the
    element-wise parts fuse. ONNX Runtime is the other way round: its InstanceNormalization is
    one kernel where this is five (the int8 network was 1.4x slower this way), so only the
    OpenVINO format is exported with it."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def _group_mean(self, values: torch.Tensor) -> torch.Tensor:
        """[B,C] per-channel means -> [B,C,1,1] the mean of each channel's group."""
        channels = values.shape[1]
        size = channels // self.groups
        grouped = values.reshape(-1, self.groups, size).mean(dim=2, keepdim=True)
        return grouped.expand(-1, self.groups, size).reshape(-1, channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._group_mean(x.mean(dim=(2, 3)))
        variance = self._group_mean((centred * centred).mean(dim=(2, 3)))
        scale = torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(1, -1, 1, 1)
        result = centred * scale
        return result + self.bias.view(1, -1, 1, 1) if self.bias is not None else result


def _channelwise_group_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every GroupNorm as :class:`_ChannelwiseGroupNorm`."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, _ChannelwiseGroupNorm(child))
    return model


def export_onnx(
    model: AnomalyModel, tile_size: int, path: Path, *, for_openvino: bool = False
) -> None:
    """Write ``model``'s predict to ``path`` as ONNX (opset 18, any batch size).

    ``for_openvino``: GroupNorm in the form OpenVINO runs fast (:class:`_ChannelwiseGroupNorm`),
    for a network that becomes OpenVINO IR."""
    tiles = torch.rand(2, 1, tile_size, tile_size)
    valid = torch.ones_like(tiles)
    valid[1, :, : tile_size // 4] = 0.0  # a tile partly off the fabric, so masking is traced
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph: nn.Module = _Graph(model.eval())
    if for_openvino and any(isinstance(m, nn.GroupNorm) for m in graph.modules()):
        graph = _channelwise_group_norms(graph)
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (tiles, valid),
            str(path),
            input_names=["tiles", "valid"],
            output_names=["map", "score"],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes={"tiles": {0: batch}, "valid": {0: batch}},
            external_data=False,
            verbose=False,
        )


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence chatty loggers (the exporter logs its progress at INFO) within a block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _batches(tiles: np.ndarray, valid: np.ndarray, size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(tiles), size):
        yield {
            "tiles": tiles[start : start + size, None].astype(np.float32) / 255.0,
            "valid": valid[start : start + size, None].astype(np.float32),
        }


def quantise_onnx(source: Path, target: Path, tiles: np.ndarray, valid: np.ndarray) -> None:
    """Static int8 quantisation of an ONNX network with ONNX Runtime (QDQ, per channel)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = _batches(tiles, valid, 8)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        op_types_to_quantize=["Conv", "ConvTranspose"],
    )
    prepared.unlink(missing_ok=True)


def openvino_ir(
    source: Path, target: Path, tiles: np.ndarray | None, valid: np.ndarray | None
) -> None:
    """Convert an ONNX network to OpenVINO IR; with tiles, quantise it to int8 with NNCF."""
    import openvino as ov

    network = ov.convert_model(str(source))
    if tiles is not None and valid is not None:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        # Convolutions only, as for ONNX Runtime: left to itself NNCF also quantises the inputs
        # of the element-wise arithmetic (GroupNorm's, the tile normalisation's), which cost
        # DRAEM 0.14 of tile AUROC on AITEX fabric 02, and PatchCore's distance products.
        others = {op.get_type_name() for op in network.get_ops()} - CONVOLUTIONS
        # Activation ranges from the extremes over all tiles, as ONNX Runtime's MinMax: NNCF's
        # default averages each tile's extremes, which clips the responses of the calibration
        # tiles with synthetic defects back to those of clean fabric (PatchCore, fabric 02:
        # pixel AP 0.003 against 0.204 in fp32).
        advanced = AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        )
        with _quiet("nncf"):
            network = nncf.quantize(
                network,
                nncf.Dataset(list(_batches(tiles, valid, 1))),
                subset_size=len(tiles),
                ignored_scope=nncf.IgnoredScope(types=sorted(others), validate=False),
                advanced_parameters=advanced,
            )
    ov.save_model(network, str(target), compress_to_fp16=False)


def _versions(fmt: str, int8: bool) -> dict[str, str]:
    packages = ["torch", "onnx", "onnxscript", *WRITERS[fmt]]
    if int8 and fmt == "openvino":
        packages.append("nncf")
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def check_export_request(fmt: str, int8: bool, calibration: np.ndarray | None) -> None:
    """One-line errors before any work: unknown format, missing runtime, int8 without data."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for package in ("onnx", "onnxscript"):
        if not _installed(package):
            raise ExportError(f"exporting needs {package}: pip install 'loomwatch[export]'")
    for runtime in WRITERS[fmt]:
        require_runtime(runtime)
    if int8 and fmt == "openvino" and not _installed("nncf"):
        raise ExportError("int8 for OpenVINO needs nncf: pip install nncf")
    if int8 and (calibration is None or len(calibration) == 0):
        raise ExportError("--int8 needs defect-free calibration tiles: give --calibration-data DIR")


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def export_bundle(
    source: Path,
    out: Path,
    fmt: str,
    *,
    source_uri: str,
    int8: bool = False,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
    calibration_images: int | None = None,
    calibration_synthetic: int | None = None,
    say: Callable[[str], None] = log.info,
) -> Path:
    """Export the bundle at ``source`` into the folder ``out`` (replaced if it exists).

    ``calibration`` is (tiles [N,T,T] uint8, valid [N,T,T] bool) of defect-free fabric, needed
    for ``int8``.
    """
    tiles, valid = calibration if calibration is not None else (None, None)
    check_export_request(fmt, int8, tiles)
    if read_manifest(source).export is not None:
        raise ExportError(f"{source} is already an exported model: export its source bundle")
    model, manifest = load_bundle(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.perf_counter()
        onnx_path = staging / ONNX_FILE
        tile_size = manifest.pipeline.tile_size
        export_onnx(model, tile_size, onnx_path, for_openvino=fmt == "openvino")
        say(f"exported {manifest.model_type} to ONNX in {time.perf_counter() - started:.1f} s")
        if fmt == "onnx" and int8:
            assert tiles is not None and valid is not None
            started = time.perf_counter()
            fp32 = staging / "fp32.onnx"
            os.replace(onnx_path, fp32)
            quantise_onnx(fp32, onnx_path, tiles, valid)
            fp32.unlink()
            say(f"quantised to int8 on {len(tiles)} tiles in {time.perf_counter() - started:.1f} s")
        network = ONNX_FILE
        if fmt == "openvino":
            started = time.perf_counter()
            openvino_ir(onnx_path, staging / IR_FILE, tiles if int8 else None, valid)
            onnx_path.unlink()
            network = IR_FILE
            what = f"int8 (NNCF, {len(tiles)} tiles)" if int8 and tiles is not None else "fp32"
            say(f"converted to OpenVINO IR, {what}, in {time.perf_counter() - started:.1f} s")
        files = {
            path.name: file_sha256(path) for path in sorted(staging.iterdir()) if path.is_file()
        }
        exported = manifest.model_copy(deep=True)
        exported.export = ExportInfo(
            format=fmt,  # type: ignore[arg-type]
            precision="int8" if int8 else "fp32",
            files=files,
            network=network,
            pipeline_version=PIPELINE_VERSION,
            source_uri=source_uri,
            source_digest=folder_digest(source),
            opset=OPSET,
            calibration_images=calibration_images if int8 else None,
            calibration_tiles=len(tiles) if int8 and tiles is not None else None,
            calibration_synthetic=calibration_synthetic if int8 else None,
            versions=_versions(fmt, int8),
        )
        text = exported.model_dump_json(indent=2)
        (staging / MANIFEST).write_text(text + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a service user must read it
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace(staging: Path, target: Path) -> None:
    """Move the export into place; a folder there that is not a model folder is kept."""
    if target.exists() and not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise BundleError(f"{target}: exists and is not a model folder; not replaced")
    move_into_place(staging, target)


def exported_size(folder: Path) -> dict[str, Any]:
    """Bytes of each file of an exported folder (for the CLI's summary)."""
    return {path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()}
