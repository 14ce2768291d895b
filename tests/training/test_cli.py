"""End to end through the command line, on tiny synthetic fabric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loomwatch.cli import main
from tests.helpers import TINY_SET, one_line_error


@pytest.fixture(scope="module")
def bundle(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "patchcore"
    args = ["--quiet", "train", "--model", "patchcore", "--data", str(synth_data)]
    assert main([*args, *TINY_SET, "--out", str(out), "--max-minutes", "2"]) == 0
    return out


@pytest.mark.slow
def test_train_writes_a_calibrated_bundle(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model_type"] == "patchcore"
    assert manifest["config"]["backbone"] == "resnet18"
    calibration = manifest["calibration"]
    assert calibration["method"].startswith("image:false-alarm-0.1")
    operating_point = calibration["evidence"]["operating_point"]
    assert operating_point["held_back_defect_free"] >= 3  # held back from fitting
    assert calibration["evidence"]["regions"]["fitted"] is True  # the synthetic defects have masks
    suppression = manifest["suppression"]
    assert suppression["min_region_area"] == calibration["evidence"]["regions"]["min_region_area"]
    assert manifest["training"]["fingerprint"] and manifest["training"]["train_images"] > 0
    assert "image_auroc" in manifest["metrics"]


@pytest.mark.slow
def test_evaluate_writes_json_and_report(bundle: Path, synth_data: Path, tmp_path: Path) -> None:
    out_json, report = tmp_path / "m.json", tmp_path / "report"
    args = ["--quiet", "evaluate", "--model-uri", str(bundle), "--data", str(synth_data)]
    assert main([*args, "--json", str(out_json), "--report", str(report)]) == 0
    metrics = json.loads(out_json.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "f1_max", "strip_auroc",
                "n_images", "n_anomalous", "threshold", "model_uri", "detection_rate",
                "false_alarm_rate", "region_recall", "region_precision",
                "detection_rate_ci95_low", "detection_rate_ci95_high"):  # fmt: skip
        assert key in metrics, key
    assert 0.0 <= metrics["detection_rate_ci95_low"] <= metrics["detection_rate"] <= 1.0
    by_defect = {row["defect"]: row for row in metrics["decisions_by_defect"]}
    assert by_defect["defect-free"]["rate"] == metrics["false_alarm_rate"]
    assert sum(row["n"] for row in by_defect.values()) == metrics["n_images"]
    page = (report / "report.html").read_text()
    assert page.index("Decisions at the operating point") < page.index("Tile AUROC")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert metrics["n_images"] == manifest["training"]["validation_images"]
    assert (report / "report.html").exists() and (report / "roc.png").exists()
    assert main([*args, "--split", "all", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["n_images"] > metrics["n_images"]


@pytest.mark.slow
def test_predict_writes_overlay_mask_and_json(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = sorted((synth_data / "Defect_images").glob("*.png"))[0]
    assert main(["predict", "--model-uri", str(bundle), str(image), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert result["decision"] in ("anomalous", "normal")
    assert {"settings", "regions"} <= set(result["suppressed"])
    assert (tmp_path / f"{image.stem}.overlay.png").stat().st_size > 0
    assert (tmp_path / f"{image.stem}.mask.png").stat().st_size > 0
    assert "score" in capsys.readouterr().out


def test_bad_input_gives_one_line_and_nonzero_exit(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = ["train", "--model", "patchcore", "--out", str(tmp_path / "b")]
    assert main([*train, "--data", str(tmp_path / "missing")]) == 2
    one_line_error(capsys, "missing")
    (tmp_path / "empty").mkdir()
    assert main([*train, "--data", str(tmp_path / "empty")]) == 2
    one_line_error(capsys, "empty")
    assert main(["train", "--model", "resnet", "--data", str(tmp_path)]) == 2
    one_line_error(capsys, "unknown model 'resnet'")
    assert main([*train, "--data", str(tmp_path), "--set", "model.nope=1"]) == 2
    one_line_error(capsys, "model.nope")
    for rate in ("0", "1", "1.5", "-0.1"):  # a false-alarm rate must lie in (0, 1)
        bad_rate = ["--set", f"calibration.target_false_alarm={rate}"]
        assert main([*train, "--data", str(tmp_path), *bad_rate]) == 2
        one_line_error(capsys, "calibration.target_false_alarm")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    assert main(["predict", "--model-uri", str(bundle), str(broken)]) == 1
    one_line_error(capsys, "broken.png")
    assert main(["evaluate", "--model-uri", str(tmp_path), "--data", str(tmp_path)]) == 2
    one_line_error(capsys, "manifest.json")
