from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from models.bundle import (
    MANIFEST,
    WEIGHTS,
    BundleError,
    Manifest,
    PipelineConfig,
    load_bundle,
    save_bundle,
)
from models.calibration import Calibration
from models.pipeline import Detector
from tests.helpers import TINY_PATCHCORE, fitted_patchcore, woven

CAL = Calibration(image_threshold=2.0, image_min=1.0, image_max=4.0, pixel_threshold=2.0,
                  pixel_min=0.0, pixel_max=5.0, method="test")  # fmt: skip


def saved(tmp_path: Path) -> tuple[Path, Detector]:
    model = fitted_patchcore()
    manifest = Manifest(model_type="patchcore", config=dict(TINY_PATCHCORE), calibration=CAL,
                        pipeline=PipelineConfig(tile_size=64, stride=64))  # fmt: skip
    path = save_bundle(tmp_path / "bundle", model, manifest)
    return path, Detector(model, manifest)


def test_round_trip_gives_identical_maps(tmp_path: Path) -> None:
    path, original = saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, WEIGHTS]
    loaded = Detector.from_bundle(path)
    image = woven(64, 200, seed=11)
    a, b = original.predict(image), loaded.predict(image)
    assert np.array_equal(a.analysis.anomaly_map, b.analysis.anomaly_map)
    assert a.raw_score == b.raw_score and a.decision == b.decision
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["calibration"]["image_threshold"] == 2.0 and "torch" in manifest["versions"]


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    saved(tmp_path)
    saved(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / MANIFEST).unlink(), "manifest.json: missing"),
        (lambda p: (p / MANIFEST).write_text("{not json"), "manifest.json: unreadable"),
        (lambda p: (p / WEIGHTS).unlink(), "weights.safetensors: missing"),
        (lambda p: (p / WEIGHTS).write_bytes(b"\x00" * 20), "weights.safetensors: not a valid"),
        (lambda p: (p / WEIGHTS).write_bytes(pickle.dumps({"a": 1})), "weights.safetensors"),
    ],
)
def test_broken_bundle_names_the_file(tmp_path: Path, damage: object, message: str) -> None:
    path, _ = saved(tmp_path)
    damage(path)  # type: ignore[operator]
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_wrong_model_type_and_version_are_refused(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "model_type": "nope"}))
    with pytest.raises(BundleError, match="unknown model 'nope'"):
        load_bundle(path)
    (path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a bundle folder"):
        load_bundle(tmp_path / "missing")


def test_a_saved_field_of_view_is_applied_and_reported_at_its_width_only(tmp_path: Path) -> None:
    from models.preprocessing import FieldOfView, ValidAreaSettings

    view = FieldOfView(width=256, start=64, stop=192, images=3)
    area = ValidAreaSettings(end_margin=0, field_of_view=view)
    pipeline = PipelineConfig(tile_size=64, stride=64, valid_area=area)
    manifest = Manifest(model_type="patchcore", config=dict(TINY_PATCHCORE), calibration=CAL,
                        pipeline=pipeline)  # fmt: skip
    path = save_bundle(tmp_path / "bundle", fitted_patchcore(), manifest)
    detector = Detector.from_bundle(path)  # read back from the manifest
    summary = detector.predict(woven(64, 256, seed=5)).summary()
    assert summary["field_of_view"] == {"start": 64, "stop": 192}
    assert summary["fabric_fraction"] == 0.5 and summary["tiles"] == 2
    other = detector.predict(woven(64, 320, seed=5)).summary()  # another width: not applied
    assert other["field_of_view"] is None and other["fabric_fraction"] == 1.0
