"""`loomwatch calibrate`: new thresholds without retraining, from labelled data or from the
feedback database the service fills; a new model folder with the same weights, registered as a
new version with the evidence in its description."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from app.feedback.store import FeedbackStore, NewPrediction
from app.feedback.tables import Verdict
from loomwatch.cli import main
from models.manifest import file_sha256, read_manifest, weights_digest
from models.pipeline import Detector
from tests.helpers import TINY_SET, one_line_error
from training.calibrate import false_alarm_threshold
from training.recalibrate import calibration_config

pytestmark = pytest.mark.slow  # a trained model (one per module)


NAME = "recalibrated-fabric"


@pytest.fixture(scope="module")
def bundle(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained and registered as version 1 of NAME, alias champion; the bundle folder too."""
    out = tmp_path_factory.mktemp("bundle") / "patchcore"
    args = ["--quiet", "train", "--model", "patchcore", "--data", str(synth_data), *TINY_SET]
    registered = ["--register", NAME, "--alias", "champion"]
    assert main([*args, "--out", str(out), "--max-minutes", "2", *registered]) == 0
    return out


def test_training_keeps_the_field_of_view_it_learned_in_the_bundle(bundle: Path) -> None:
    view = read_manifest(bundle).pipeline.valid_area.field_of_view
    assert view is not None and view.width == 512  # the synthetic strips' width
    assert 0 <= view.start < view.stop <= 512 and view.images >= 1


def record(store: FeedbackStore, weights: str, raw: float, decision: str, n: int) -> str:
    prediction_id = f"{weights[-6:]}{n:026d}"
    store.record(
        [
            NewPrediction(
                id=prediction_id, request_id=f"r{n}", filename=f"strip-{n}.png",
                image_sha256=f"{n:064d}", image_format="PNG", width=512, height=128,
                model_name="m", model_version="1", model_digest="d", weights_digest=weights,
                fabric="00", decision=decision, score=0.5, raw_score=raw, threshold=0.5,
                raw_threshold=1.0, regions={"kept": []},
            )
        ]
    )  # fmt: skip
    return prediction_id


@pytest.fixture()
def feedback(bundle: Path, tmp_path: Path) -> tuple[str, dict[str, list[float]]]:
    """A feedback database as the service leaves it: 40 strips decided normal (one reported
    missed), 6 false alarms, 5 real defects, 3 alarms nobody reviewed, and strips of other
    weights that must not count."""
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    weights = weights_digest(bundle)
    threshold = read_manifest(bundle).calibration.image_threshold
    rng = np.random.default_rng(0)
    scores: dict[str, list[float]] = {"clean": [], "defective": []}
    n = 0
    for raw in threshold * rng.uniform(0.5, 0.95, 40):
        n += 1
        prediction_id = record(store, weights, float(raw), "normal", n)
        if n == 1:  # a defect the model called normal
            store.add_feedback(prediction_id, Verdict.missed_defect, "thin crack", "qa")
            scores["defective"].append(float(raw))
        else:
            scores["clean"].append(float(raw))
    for raw in threshold * rng.uniform(1.0, 1.3, 6):
        n += 1
        prediction_id = record(store, weights, float(raw), "anomalous", n)
        store.add_feedback(prediction_id, Verdict.real_defect, None, "qa")  # changed their mind:
        store.add_feedback(prediction_id, Verdict.false_alarm, "selvage", "qa")  # newest counts
        scores["clean"].append(float(raw))
    for raw in threshold * rng.uniform(1.5, 3.0, 5):
        n += 1
        store.add_feedback(
            record(store, weights, float(raw), "anomalous", n), Verdict.real_defect, None, None
        )
        scores["defective"].append(float(raw))
    for raw in threshold * rng.uniform(1.0, 3.0, 3):
        n += 1
        record(store, weights, float(raw), "anomalous", n)  # unreviewed alarm: left out
    for n in range(100, 120):
        record(store, "sha256:other", threshold * 50.0, "normal", n)  # another model's
    store.close()
    return url, scores


def test_feedback_moves_the_image_threshold_and_keeps_the_weights(
    bundle: Path,
    feedback: tuple[str, dict[str, list[float]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, scores = feedback
    out = tmp_path / "recalibrated"
    assert main(["--quiet", "calibrate", "--model-uri", str(bundle), "--feedback", url,
                 "--out", str(out)]) == 0  # fmt: skip
    said = capsys.readouterr().out
    before, after = read_manifest(bundle), read_manifest(out)
    target = calibration_config(before).target_false_alarm
    expected, _ = false_alarm_threshold(np.array(scores["clean"]), target, seed=0)
    assert after.calibration.image_threshold == pytest.approx(expected, rel=1e-12)
    assert after.calibration.image_threshold > before.calibration.image_threshold  # 6 alarms
    assert after.calibration.pixel_threshold == before.calibration.pixel_threshold
    assert after.suppression == before.suppression and after.config == before.config
    assert file_sha256(out / "weights.safetensors") == file_sha256(bundle / "weights.safetensors")
    evidence = after.calibration.evidence["recalibration"]
    assert evidence["verdicts"] == {"false_alarm": 6, "missed_defect": 1, "none": 42,
                                    "real_defect": 5}  # fmt: skip
    assert evidence["unreviewed_alarms_left_out"] == 3 and evidence["predictions"] == 54
    assert (evidence["defect_free"], evidence["defective"]) == (45, 6)
    above = int((np.array(scores["clean"]) >= expected).sum())  # conformal: 45 reach 10 %
    assert evidence["before"]["false_alarms"] == 6 and evidence["after"]["false_alarms"] == above
    assert above <= target * 46
    assert "Recalibrated from operators' feedback (54 predictions" in said
    assert f"model URI: {out}" in said
    image = np.full((128, 512), 110, np.uint8)
    assert Detector.from_bundle(out).predict(image).threshold == 0.5  # a model like any other


def test_feedback_with_another_false_alarm_target(
    bundle: Path, feedback: tuple[str, dict[str, list[float]]], tmp_path: Path
) -> None:
    """--target-false-alarm 0.2 over 45 defect-free strips: the conformal rank moves down."""
    url, scores = feedback
    out = tmp_path / "target-0.2"
    assert main(["--quiet", "calibrate", "--model-uri", str(bundle), "--feedback", url,
                 "--target-false-alarm", "0.2", "--out", str(out)]) == 0  # fmt: skip
    clean = np.array(scores["clean"])
    expected, _ = false_alarm_threshold(clean, 0.2, seed=0)
    strict, _ = false_alarm_threshold(clean, 0.05, seed=0)
    calibration = read_manifest(out).calibration
    assert calibration.image_threshold == pytest.approx(expected, rel=1e-12) and expected < strict
    assert calibration.evidence["operating_point"]["target_false_alarm"] == 0.2
    assert calibration_config(read_manifest(out)).target_false_alarm == 0.2


def test_labelled_data_reproduces_the_trainings_calibration(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On its own validation split the same operating-point code gives the same thresholds."""
    out = tmp_path / "again"
    assert main(["--quiet", "calibrate", "--model-uri", str(bundle), "--data", str(synth_data),
                 "--out", str(out)]) == 0  # fmt: skip
    assert "validation split" in capsys.readouterr().out
    trained, again = read_manifest(bundle).calibration, read_manifest(out).calibration
    assert again.image_threshold == pytest.approx(trained.image_threshold, rel=1e-5)
    assert again.pixel_threshold == pytest.approx(trained.pixel_threshold, rel=1e-5)
    assert again.method == trained.method
    assert read_manifest(out).suppression == read_manifest(bundle).suppression
    assert again.evidence["recalibration"]["source"] == "data"


def test_another_operating_point_rule_without_retraining(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--image-rule f1 re-fits on the same validation split; the rule is recorded, so the next
    recalibration of the new folder keeps it."""
    out = tmp_path / "f1"
    assert main(["--quiet", "calibrate", "--model-uri", str(bundle), "--data", str(synth_data),
                 "--image-rule", "f1", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    trained, refit = read_manifest(bundle).calibration, read_manifest(out).calibration
    assert trained.method.startswith("image:false-alarm")
    assert refit.method.startswith("image:f1-balanced")
    assert refit.evidence["operating_point"]["rule"] == "f1"
    assert calibration_config(read_manifest(out)).image_rule == "f1"
    assert calibration_config(read_manifest(out)).smoothing_by == "pixel_ap"  # not asked: kept
    again = tmp_path / "again"
    assert main(["--quiet", "calibrate", "--model-uri", str(out), "--data", str(synth_data),
                 "--out", str(again)]) == 0  # fmt: skip
    assert read_manifest(again).calibration.method.startswith("image:f1-balanced")
    assert read_manifest(again).calibration.image_threshold == pytest.approx(
        refit.image_threshold, rel=1e-9
    )


def test_bad_requests_are_one_line_and_write_nothing(
    bundle: Path,
    feedback: tuple[str, dict[str, list[float]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "never"
    calibrate = ["calibrate", "--model-uri", str(bundle), "--out", str(out)]
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    assert main([*calibrate, "--feedback", f"sqlite:///{blocked}/feedback.db"]) == 2
    one_line_error(capsys, "feedback database (sqlite:///")  # and why it is unavailable
    assert main([*calibrate, "--feedback", "nonsense"]) == 2
    one_line_error(capsys, "not a database URL")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main([*calibrate, "--feedback", empty]) == 2
    one_line_error(capsys, "holds no prediction scored by these weights")
    few = FeedbackStore(f"sqlite:///{tmp_path / 'few.db'}")
    record(few, weights_digest(bundle), 0.1, "normal", 1)
    few.close()
    assert main([*calibrate, "--feedback", f"sqlite:///{tmp_path / 'few.db'}"]) == 2
    one_line_error(capsys, "at least 3 defect-free images")
    url, _ = feedback
    assert main(["calibrate", "--model-uri", str(bundle), "--feedback", url,
                 "--out", str(bundle)]) == 2  # fmt: skip
    one_line_error(capsys, "the model's own folder")
    assert main([*calibrate, "--feedback", url, "--target-false-alarm", "1.5"]) == 2
    one_line_error(capsys, "--target-false-alarm must lie strictly between 0 and 1")
    assert main([*calibrate, "--feedback", url, "--split", "test"]) == 2
    one_line_error(capsys, "--fabric and --split go with --data")
    with pytest.raises(SystemExit) as exited:
        main([*calibrate, "--feedback", url, "--data", str(tmp_path)])
    assert exited.value.code == 2  # argparse: one of the two
    assert not out.exists()


def test_registered_with_the_evidence_and_promotable(
    bundle: Path,
    synth_data: Path,
    feedback: tuple[str, dict[str, list[float]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = feedback
    name = NAME
    capsys.readouterr()
    champion = f"models:/{name}@champion"  # version 1: the bundle, trained and registered
    assert main(["--quiet", "calibrate", "--model-uri", champion, "--feedback", url,
                 "--out", str(tmp_path / "v2"), "--register", name]) == 0  # fmt: skip
    assert f"model URI: models:/{name}/2" in capsys.readouterr().out
    version = mlflow.MlflowClient().get_model_version(name, "2")
    assert version.description and version.run_id
    assert version.description.startswith("Recalibrated from operators' feedback")
    assert "Image threshold (raw)" in version.description
    assert version.tags["loomwatch.calibration.evidence"] == "feedback"
    assert version.tags["loomwatch.data_fingerprint"]  # what the weights were trained on
    run = mlflow.get_run(version.run_id)
    assert run.data.tags["mlflow.note.content"] == version.description
    evidence = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(f"runs:/{version.run_id}/calibration/evidence.json")
        ).read_text()
    )
    assert evidence["source"] == "feedback"
    # promotion works as for any version: judged on the validation strips both share
    assert main(["--quiet", "promote", name, "--resamples", "200"]) == 0
    assert "95% CI" in capsys.readouterr().out


def test_the_maps_smoothing_rule_is_chosen_and_recorded(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--smoothing-by region_f1 puts the map's sigma back in the region-F1 grid; recorded."""
    out = tmp_path / "grid"
    assert main(["--quiet", "calibrate", "--model-uri", str(bundle), "--data", str(synth_data),
                 "--smoothing-by", "region_f1", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    manifest = read_manifest(out)
    assert calibration_config(manifest).smoothing_by == "region_f1"
    regions = manifest.calibration.evidence["regions"]
    assert regions["fitted"], regions  # the synthetic data has defect masks
    assert regions["smoothing_by"] == "region_f1" and "pixel_ap_by_sigma" not in regions
    trained = read_manifest(bundle).calibration.evidence["regions"]
    assert trained["smoothing_by"] == "pixel_ap" and "pixel_ap_by_sigma" in trained


def test_the_false_alarm_bound_is_chosen_and_recorded(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--false-alarm-bound conformal sets the threshold just above a held-back image's score
    (the synthetic split holds back too few for 10 %); recorded, and said in the summary."""
    out = tmp_path / "conformal"
    assert main(["calibrate", "--model-uri", str(bundle), "--data", str(synth_data),
                 "--false-alarm-bound", "conformal", "--out", str(out)]) == 0  # fmt: skip
    summary = capsys.readouterr().out
    manifest = read_manifest(out)
    assert calibration_config(manifest).false_alarm_bound == "conformal"
    operating = manifest.calibration.evidence["operating_point"]
    assert operating["bound"] == "conformal" and operating["target_reachable"] is False
    assert "sits just above the highest one" in summary
    trained = read_manifest(bundle).calibration.evidence["operating_point"]  # auto
    reached = trained["defect_free_images"] >= trained["images_needed_for_target"]
    assert trained["bound"] == ("conformal" if reached else "gaussian")
    # the images the model was fitted on are scored again, as training scored them
    assert trained["training_images"]["images"] >= 1
    assert operating["training_images"] == pytest.approx(trained["training_images"])


def test_the_image_level_is_chosen_scored_and_recorded(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--image-level none scores the validation strips again without each strip's median map
    level subtracted and re-fits the thresholds on that scale; the new manifest says so, so the
    served scores are on the scale its thresholds were fitted on. It needs --data."""
    out = tmp_path / "no-level"
    assert read_manifest(bundle).pipeline.image_level == "median"  # trained since it existed
    assert main(["--quiet", "calibrate", "--model-uri", str(bundle), "--data", str(synth_data),
                 "--image-level", "none", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    manifest = read_manifest(out)
    assert manifest.pipeline.image_level == "none"
    recorded = manifest.calibration.evidence["recalibration"]["image_level"]
    assert recorded == {"before": "median", "after": "none"}
    trained = read_manifest(bundle).calibration
    # PatchCore's maps are distances well above 0: the raw scale moves up by the level
    assert manifest.calibration.image_threshold > trained.image_threshold
    image = _first_image(synth_data)
    assert Detector.from_bundle(bundle).analyse(image).level > 0.0
    assert Detector.from_bundle(out).analyse(image).level == 0.0
    # feedback recorded on one scale is not used to calibrate on the other
    assert weights_digest(out) != weights_digest(bundle)
    assert file_sha256(out / "weights.safetensors") == file_sha256(bundle / "weights.safetensors")
    assert main(["calibrate", "--model-uri", str(bundle), "--feedback", "sqlite:///x.db",
                 "--image-level", "none", "--out", str(tmp_path / "never")]) == 2  # fmt: skip
    one_line_error(capsys, "--image-level goes with --data")
    assert not (tmp_path / "never").exists()


def _first_image(data: Path) -> Path:
    return next(path for path in sorted(data.rglob("*.png")) if "mask" not in str(path).lower())


def test_a_new_image_level_learns_the_isolated_peak_again(
    bundle: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The isolated-peak reference holds tile scores measured at the model's image level: a
    model moved to another level learns it again from the strips it was fitted on, or, where
    those are not in the data, is refused in one line."""
    import shutil

    from models.isolation import IsolatedPeak

    peaked = tmp_path / "peaked"
    shutil.copytree(bundle, peaked)
    raw = json.loads((peaked / "manifest.json").read_text())
    stale = IsolatedPeak(
        pool=5, radius=63, rank=20, score_mean=-9.0, score_sd=1.0, gap_mean=0.0, gap_sd=1.0,
        images=3,
    )  # fmt: skip
    raw["pipeline"]["isolated_peak"] = stale.model_dump()
    (peaked / "manifest.json").write_text(json.dumps(raw))
    out = tmp_path / "relearned"
    assert main(["--quiet", "calibrate", "--model-uri", str(peaked), "--data", str(synth_data),
                 "--image-level", "none", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    learned = read_manifest(out).pipeline.isolated_peak
    assert learned is not None and learned != stale
    trained = read_manifest(bundle).training["train_images"]
    assert learned.images == trained and learned.score_mean > 0  # PatchCore distances, level none
    # without the training strips in the data there is nothing to learn it from
    never = tmp_path / "never"
    assert main(["calibrate", "--model-uri", str(peaked), "--data", str(synth_data),
                 "--split", "all", "--image-level", "none", "--out", str(never)]) == 2  # fmt: skip
    one_line_error(capsys, "calibrate on the data it was trained on")
    assert not never.exists()
    # the same level keeps the reference as it is
    same = tmp_path / "same"
    assert main(["--quiet", "calibrate", "--model-uri", str(peaked), "--data", str(synth_data),
                 "--out", str(same)]) == 0  # fmt: skip
    assert read_manifest(same).pipeline.isolated_peak == stale
