"""Exported models: the same maps as PyTorch through the one pipeline, and clear refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models.base import AnomalyModel, FitContext
from models.bundle import Manifest, PipelineConfig, save_bundle
from models.calibration import Calibration
from models.draem import Draem, DraemConfig
from models.export import ExportError, export_bundle
from models.manifest import BundleError, read_manifest
from models.network import BackendError
from models.pipeline import Detector
from models.preprocessing import ValidAreaSettings
from models.vae import VAE, VAEConfig
from tests.helpers import fitted_patchcore, with_stain, woven, woven_tile_set
from training.export import with_synthetic_defects

CAL = Calibration(image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5,
                  pixel_min=0.0, pixel_max=1.0, method="test")  # fmt: skip
# a strip with a stain, partly padded with white (off the fabric), cut into 64 px tiles
STRIP = with_stain(woven(128, 320, seed=21), 150, 60, radius=5, level=60)[0]
STRIP[:, -40:] = 255


def _draem() -> AnomalyModel:
    torch.manual_seed(0)
    config = {"recon_channels": 8, "disc_channels": 8, "recon_depth": 3, "disc_depth": 3,
              "crop_size": 0, "augment_share": 0.0, "max_epochs": 1}  # fmt: skip
    model = Draem(DraemConfig.model_validate(config))
    model.fit(woven_tile_set(2), FitContext(progress=False, batch_size=4))
    return model


def _vae() -> AnomalyModel:
    torch.manual_seed(0)
    config = {"base_channels": 8, "max_channels": 32, "depth": 3, "latent_channels": 4,
              "max_epochs": 2, "smoothing_sigma": 2.0, "topk": 20}  # fmt: skip
    model = VAE(VAEConfig.model_validate(config))
    model.fit(woven_tile_set(2), FitContext(progress=False, batch_size=4))
    return model


MODELS = {"draem": _draem, "vae": _vae, "patchcore": fitted_patchcore}


class Bundles(dict[str, Path]):
    """Model name -> a bundle of it, trained on first use."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        model = MODELS[name]()
        pipeline = PipelineConfig(
            tile_size=64, stride=64, valid_area=ValidAreaSettings(end_margin=0)
        )
        manifest = Manifest(model_type=model.model_type, config=model.config.model_dump(),
                            calibration=CAL, pipeline=pipeline)  # fmt: skip
        self[name] = save_bundle(self.root / name, model, manifest)
        return self[name]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return Bundles(tmp_path_factory.mktemp("bundles"))


Exported = Callable[[str, str], Path]


@pytest.fixture(scope="module")
def exported(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """(model name, format) -> its exported folder, made on first use."""
    root = tmp_path_factory.mktemp("exported")

    def get(name: str, fmt: str) -> Path:
        folder = root / f"{name}-{fmt}"
        if not folder.exists():
            export_bundle(bundles[name], folder, fmt, source_uri=str(bundles[name]))
        return folder

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("fmt", "backend"), [("onnx", "onnxruntime"), ("onnx", "openvino"),
                                              ("openvino", "openvino")])  # fmt: skip
def test_exported_maps_equal_torch_maps(
    bundles: dict[str, Path], exported: Exported, name: str, fmt: str, backend: str
) -> None:
    reference = Detector.from_bundle(bundles[name])
    detector = Detector.from_bundle(exported(name, fmt), backend=backend)
    assert reference.backend == "torch" and detector.backend == backend
    expected, got = reference.analyse(STRIP), detector.analyse(STRIP)
    assert len(got.boxes) == len(expected.boxes) > 0
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4
    assert np.allclose(got.tile_scores, expected.tile_scores, atol=1e-4, rtol=0)
    assert abs(got.score - expected.score) <= 1e-4
    # the decision and the regions come from the one pipeline: the same
    a, b = reference.predict(STRIP), detector.predict(STRIP)
    assert a.decision == b.decision and len(a.post.kept) == len(b.post.kept)


def test_the_export_carries_the_manifest_and_names_its_source(
    bundles: dict[str, Path], exported: Exported
) -> None:
    source = read_manifest(bundles["vae"])
    manifest = read_manifest(exported("vae", "openvino"))
    assert manifest.export is not None and manifest.export.format == "openvino"
    assert manifest.export.precision == "fp32" and manifest.export.network == "model.xml"
    assert set(manifest.export.files) == {"model.xml", "model.bin"}
    assert manifest.export.source_uri == str(bundles["vae"])
    assert manifest.export.source_digest.startswith("sha256:")
    assert manifest.model_dump(exclude={"export"}) == source.model_dump(exclude={"export"})
    assert not (exported("vae", "openvino") / "weights.safetensors").exists()


@pytest.mark.slow
def test_int8_needs_calibration_tiles_and_keeps_the_ranking(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="calibration"):
        export_bundle(bundles["draem"], tmp_path / "no", "onnx", source_uri="x", int8=True)
    assert not (tmp_path / "no").exists() and not list(tmp_path.iterdir())
    clean = [woven(64, 256, seed=s) for s in range(4)]
    tiles = np.stack([image[:, x : x + 64] for image in clean for x in range(0, 256, 64)])
    valid = np.ones_like(tiles, dtype=bool)
    reference = Detector.from_bundle(bundles["draem"]).analyse(STRIP)
    for fmt in ("onnx", "openvino"):
        out = export_bundle(bundles["draem"], tmp_path / fmt, fmt, source_uri="x", int8=True,
                            calibration=(tiles, valid), calibration_images=4)  # fmt: skip
        manifest = read_manifest(out)
        assert manifest.export is not None and manifest.export.precision == "int8"
        assert manifest.export.calibration_tiles == 16
        got = Detector.from_bundle(out).analyse(STRIP)
        # quantised, so not equal; but the same picture of the strip's fabric (the white
        # padding is 0 in both maps and would make any two maps look alike)
        fabric = reference.valid
        assert (got.valid == fabric).all() and not fabric.all()
        correlation = np.corrcoef(got.anomaly_map[fabric], reference.anomaly_map[fabric])[0, 1]
        assert correlation > 0.8, (fmt, correlation)  # 0.89 measured


@pytest.mark.slow
@pytest.mark.parametrize("name", ["patchcore", "vae"])
def test_int8_calibrated_with_synthetic_defects_keeps_the_mask(
    bundles: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """Calibrated on clean fabric alone, int8 clips what the stain does to the network: on this
    strip PatchCore's pixel AP fell 0.170 -> 0.035 (ONNX Runtime) and the VAE's 0.969 -> 0.559;
    with half the calibration tiles given a synthetic defect both stay within 0.01."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    strip, stain = with_stain(woven(128, 320, seed=21), 150, 60, radius=5, level=60)
    truth = stain.ravel() > 0
    clean = [woven(64, 256, seed=s) for s in range(8)]
    tiles = np.stack([image[:, x : x + 64] for image in clean for x in range(0, 256, 64)])
    valid = np.ones_like(tiles, dtype=bool)
    assert with_synthetic_defects(tiles, valid, 0.5, np.random.default_rng(0)) > 0
    fp32 = Detector.from_bundle(bundles[name]).analyse(strip).anomaly_map.ravel()
    for fmt in ("onnx", "openvino"):
        out = export_bundle(bundles[name], tmp_path / fmt, fmt, source_uri="x", int8=True,
                            calibration=(tiles, valid))  # fmt: skip
        int8 = Detector.from_bundle(out).analyse(strip).anomaly_map.ravel()
        ap, ap8 = average_precision_score(truth, fp32), average_precision_score(truth, int8)
        auroc, auroc8 = roc_auc_score(truth, fp32), roc_auc_score(truth, int8)
        assert abs(ap8 - ap) <= 0.01 and abs(auroc8 - auroc) <= 0.01, (fmt, ap, ap8, auroc8)


def test_backends_that_cannot_run_a_model_say_so(
    bundles: dict[str, Path], exported: Exported
) -> None:
    with pytest.raises(BackendError, match="loomwatch export"):
        Detector.from_bundle(bundles["vae"], backend="onnxruntime")
    with pytest.raises(BackendError, match="exported openvino model"):
        Detector.from_bundle(exported("vae", "openvino"), backend="onnxruntime")
    with pytest.raises(BackendError, match="exported onnx model"):
        Detector.from_bundle(exported("vae", "onnx"), backend="torch")
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        Detector.from_bundle(exported("vae", "onnx"), backend="tensorrt")


def test_a_missing_runtime_names_the_package(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "onnxruntime" else real(name, *args),
    )
    with pytest.raises(BackendError, match="pip install onnxruntime"):
        Detector.from_bundle(exported("vae", "onnx"), backend="onnxruntime")
    # auto takes the runtime that is installed (OpenVINO reads ONNX too)
    assert Detector.from_bundle(exported("vae", "onnx")).backend == "openvino"
    with pytest.raises(BackendError, match="pip install onnxruntime"):
        export_bundle(exported("vae", "onnx"), tmp_path / "y", "onnx", source_uri="x")
    assert not (tmp_path / "y").exists()


def test_corrupt_truncated_or_foreign_exports_are_refused(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    folder = export_bundle(bundles["vae"], tmp_path / "vae", "onnx", source_uri="x")
    network = folder / "model.onnx"
    original = network.read_bytes()
    network.write_bytes(original[: len(original) // 2])
    with pytest.raises(BundleError, match=r"model.onnx: corrupt or truncated"):
        Detector.from_bundle(folder)
    network.write_bytes(original)
    Detector.from_bundle(folder)  # whole again
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["export"]["pipeline_version"] = 0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"exported for pipeline version 0.*export the source"):
        Detector.from_bundle(folder)
    with pytest.raises(ExportError, match="already an exported model"):
        export_bundle(folder, tmp_path / "again", "onnx", source_uri="x")
    assert not (tmp_path / "again").exists()


def test_a_failed_export_leaves_nothing_and_keeps_what_was_there(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = export_bundle(bundles["vae"], tmp_path / "vae", "onnx", source_uri="x")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr("models.export.export_onnx", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_bundle(bundles["vae"], out, "onnx", source_uri="x")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no staging folder left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    monkeypatch.undo()
    with pytest.raises(BundleError, match="not a model folder"):
        export_bundle(bundles["vae"], other, "onnx", source_uri="x")
    assert (other / "mine.txt").read_text() == "keep"
