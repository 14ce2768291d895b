"""`loomwatch export` as a user runs it: the exported folder is a model URI like any bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loomwatch.cli import main
from tests.helpers import TINY_SET, free_port, one_line_error

pytestmark = pytest.mark.slow  # each test needs a trained model (one per module)


@pytest.fixture(scope="module")
def bundle(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "patchcore"
    args = ["--quiet", "train", "--model", "patchcore", "--data", str(synth_data)]
    assert main([*args, *TINY_SET, "--out", str(out), "--max-minutes", "2"]) == 0
    return out


def test_export_int8_then_predict_and_evaluate_through_it(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    export = ["--quiet", "export", "--model-uri", str(bundle), "--format", "openvino"]
    calibration = ["--calibration-data", str(synth_data), "--calibration-tiles", "24"]
    assert main([*export, "--int8", *calibration, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"model URI: {out}" in said and "openvino int8" in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["precision"] == "int8"
    assert manifest["export"]["calibration_tiles"] == 24
    assert 0 < manifest["export"]["calibration_synthetic"] <= 12  # half of them, by default
    image = sorted((synth_data / "Defect_images").glob("*.png"))[0]
    predictions = tmp_path / "predictions"
    assert main(["predict", "--model-uri", str(out), str(image), "--out", str(predictions)]) == 0
    assert json.loads((predictions / f"{image.stem}.json").read_text())["decision"]
    metrics = tmp_path / "metrics.json"
    evaluate = ["--quiet", "evaluate", "--model-uri", str(out), "--data", str(synth_data)]
    assert main([*evaluate, "--json", str(metrics), "--report", str(tmp_path / "r")]) == 0
    figures = json.loads(metrics.read_text())
    assert 0.0 <= figures["image_auroc"] <= 1.0 and figures["n_images"] > 0


def test_export_refuses_bad_requests_in_one_line(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = ["export", "--model-uri", str(bundle), "--out", str(tmp_path / "x")]
    assert main([*export, "--format", "tflite"]) == 2
    one_line_error(capsys, "unknown --format 'tflite'")
    assert main([*export, "--format", "onnx", "--int8"]) == 2
    one_line_error(capsys, "--int8 needs --calibration-data")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*export, "--format", "onnx", "--int8", "--calibration-data", str(empty)]) == 2
    one_line_error(capsys, "empty")
    assert not (tmp_path / "x").exists()
    missing = ["export", "--model-uri", str(tmp_path / "nope"), "--format", "onnx"]
    assert main([*missing, "--out", str(tmp_path / "y")]) == 2
    one_line_error(capsys, "nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing half-written


def test_predict_and_serve_refuse_a_corrupt_export(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    assert main(["--quiet", "export", "--model-uri", str(bundle), "--format", "onnx",
                 "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    image = sorted((synth_data / "Defect_images").glob("*.png"))[0]
    predict = ["predict", "--model-uri", str(out), str(image), "--out", str(tmp_path / "p")]
    assert main([*predict, "--backend", "onnxruntime"]) == 0
    capsys.readouterr()
    assert main([*predict, "--backend", "tensorrt"]) == 2
    one_line_error(capsys, "unknown backend 'tensorrt'")
    assert main(["predict", "--model-uri", str(bundle), str(image), "--backend", "openvino"]) == 2
    one_line_error(capsys, "loomwatch export")
    network = out / "model.onnx"
    network.write_bytes(network.read_bytes()[:1000])
    assert main(predict) == 2
    one_line_error(capsys, "corrupt or truncated")
    assert main(["serve", "--model-uri", str(out), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err
