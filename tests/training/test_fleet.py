"""Fleets (issue 16): `train --fabric all`, `evaluate` of a fleet, its manifest and its runs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from loomwatch.cli import main
from tests.helpers import FAST_TRAIN, tracking_client
from tracking.fleet import FLEET_MANIFEST, resolve_fleet
from training.evaluate import Analysed


def two_fabrics(out: Path) -> Path:
    """Synthetic AITEX layout with fabrics 00 (defective strips too), 01 (defect-free only,
    like AITEX fabric 05 in the dev data) and 02 (one defective strip: cannot be trained)."""
    from training.synth import generate_dataset

    generate_dataset(out, fabrics=2, normal=10, defective=4, seed=3, width=512, height=128,
                     progress=False)  # fmt: skip
    for path in [*out.glob("Defect_images/*_01.png"), *out.glob("Mask_images/*_01_mask*.png")]:
        path.unlink()
    # fabric 02: one defective strip and nothing else (AITEX fabric 08 in the dev data)
    first = sorted(out.glob("Defect_images/*_00.png"))[0]
    (out / "Defect_images" / "0099_002_02.png").write_bytes(first.read_bytes())
    return out


def train_fleet(data: Path, out: Path, *extra: str) -> int:
    args = ["--quiet", "train", "--model", "patchcore", "--data", str(data), *FAST_TRAIN]
    return main([*args, "--fabric", "all", "--out", str(out), "--max-minutes", "2", *extra])


def run_count() -> int:
    client = tracking_client()
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(data, fleet folder, its stdout): trained once for the module, registered as tf-FF."""
    data = two_fabrics(tmp_path_factory.mktemp("fleet-data"))
    out = tmp_path_factory.mktemp("fleet") / "fleet"
    code = train_fleet(data, out, "--register", "tf", "--alias", "champion")
    assert code == 0
    return data, out, (out / FLEET_MANIFEST).read_text()


@pytest.mark.slow
def test_fleet_trains_one_model_per_fabric_under_one_parent_run(
    fleet: tuple[Path, Path, str],
) -> None:
    _, out, text = fleet
    manifest = json.loads(text)
    assert manifest["kind"] == "loomwatch-fleet"
    assert sorted(manifest["fabrics"]) == ["00", "01"]
    client = tracking_client()
    parent = manifest["parent_run_id"]
    for fabric, entry in manifest["fabrics"].items():
        assert (out / entry["bundle"] / "manifest.json").is_file()
        assert entry["uri"] == f"models:/tf-{fabric}@champion"
        assert entry["pinned"] == f"models:/tf-{fabric}/1"
        child = client.get_run(entry["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert child.data.tags["loomwatch.fabric"] == fabric
        assert child.info.status == "FINISHED"
        assert entry["digest"].startswith("sha256:")
    # the budget: equal shares of what remains, so the second fabric gets at least the first's
    first, second = (manifest["fabrics"][f]["budget_seconds"] for f in ("00", "01"))
    spent = manifest["fabrics"]["00"]["seconds"]
    assert 0 < first <= 60.0  # half of the 2 minutes, less what preparing the runs took
    # the second gets what is left: twice the first's share, less the time the first took
    assert 0 < second <= max(2 * first - spent + 0.5, 1.0)
    # fabric 01 has no defective strip: it still calibrated, and says how
    calibration = manifest["fabrics"]["01"]["calibration"]
    assert "no defective validation strip" in calibration
    assert "pixel:p" in calibration and "regions not fitted" in calibration
    assert manifest["fabrics"]["01"]["validation_defective"] == 0
    # fabric 02 cannot be trained: left out, and the manifest says why
    assert "no defect-free images" in manifest["skipped"]["02"]
    # the fleet is addressable by its parent run too, and names the same models
    logged = resolve_fleet(f"runs:/{parent}/fleet")
    assert {f: m.uri for f, m in logged.members.items()} == {
        f: e["uri"] for f, e in manifest["fabrics"].items()
    }
    assert all(m.bundle is None for m in logged.members.values())
    local = resolve_fleet(str(out))
    assert local.member("1") is local.members["01"]
    assert local.members["00"].bundle == out / "00"
    assert local.members["00"].source == "models:/tf-00@champion"  # an alias is followed


def test_fleet_refusals_are_one_line_and_open_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = two_fabrics(tmp_path / "data")
    before = run_count()

    # a folder that is not empty
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert train_fleet(data, tmp_path / "busy") == 2
    assert "not an empty folder" in capsys.readouterr().err
    # no fabric with enough defect-free strips to train and calibrate: each named, before any run
    for fabric in ("00", "01"):
        for path in sorted(data.glob(f"NoDefect_images/*/*_{fabric}.png"))[2:]:
            path.unlink()
    assert train_fleet(data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("loomwatch: error: no fabric can be trained: fabric 00:")
    assert "fabric 01:" in err and "fabric 02:" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # a layout without fabric codes
    plain = tmp_path / "plain"
    (plain / "normal").mkdir(parents=True)
    (data / "NoDefect_images").rename(plain / "normal" / "x")
    assert train_fleet(plain, tmp_path / "out2") == 2
    assert "needs fabric codes" in capsys.readouterr().err
    assert run_count() == before


@pytest.mark.slow
def test_evaluate_a_fleet_per_fabric_and_pooled_with_intervals(
    fleet: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out, _ = fleet
    target = tmp_path / "fleet.json"
    args = ["--quiet", "evaluate", "--model-uri", str(out), "--data", str(data), "--split", "all"]
    assert main([*args, "--json", str(target), "--report", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("pooled")  # the table
    summary = json.loads(target.read_text())
    keys = ("image_auroc", "strip_auroc", "pixel_auroc", "aupro", "pixel_ap",
            "detection_rate", "false_alarm_rate")  # fmt: skip
    assert sorted(summary["fabrics"]) == ["00", "01"]
    first, clean = summary["fabrics"]["00"], summary["fabrics"]["01"]
    assert (first["n_images"], first["n_anomalous"]) == (14, 4)
    assert (clean["n_images"], clean["n_anomalous"]) == (10, 0)
    for key in keys:
        low, high = first[f"{key}_ci95_low"], first[f"{key}_ci95_high"]
        assert low <= first[key] <= high, key
    assert clean["strip_auroc"] is None and clean["false_alarm_rate"] is not None
    pooled = summary["pooled"]
    assert pooled["n_images"] == 24 and pooled["n_fabrics"] == 2
    for key in keys:
        assert pooled[f"{key}_ci95_low"] <= pooled[key] <= pooled[f"{key}_ci95_high"], key
    # macro averages skip the fabric where a figure is undefined
    assert pooled["pixel_ap"] == pytest.approx(first["pixel_ap"])
    # the same figures as evaluating that fabric's model alone
    single = tmp_path / "single.json"
    one = ["--quiet", "evaluate", "--model-uri", str(out / "00"), "--data", str(data)]
    assert main([*one, "--fabric", "00", "--split", "all", "--json", str(single)]) == 0
    alone = json.loads(single.read_text())
    for key in ("image_auroc", "strip_auroc", "pixel_ap", "detection_rate",
                "detection_rate_ci95_low", "detection_rate_ci95_high"):  # fmt: skip
        assert first[key] == pytest.approx(alone[key]), key
    page = (tmp_path / "report" / "index.html").read_text()
    assert "pooled / macro" in page and "00/miss_01.png" in page and "01/miss_01.png" in page
    assert (tmp_path / "report" / "00" / "report.html").is_file()
    assert (tmp_path / "report" / "01" / "miss_01.png").is_file()


@pytest.mark.slow
def test_a_registered_fleet_is_evaluated_and_promoted_through_the_registry(
    fleet: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _, text = fleet
    parent = json.loads(text)["parent_run_id"]
    target = tmp_path / "logged.json"
    uri = f"runs:/{parent}/fleet"
    args = ["--quiet", "evaluate", "--model-uri", uri, "--data", str(data), "--fabric", "1"]
    assert main([*args, "--split", "all", "--json", str(target)]) == 0
    assert list(json.loads(target.read_text())["fabrics"]) == ["01"]
    capsys.readouterr()
    # a second version of each fabric's model (the same weights): judged fabric by fabric
    import mlflow

    for fabric, entry in json.loads(text)["fabrics"].items():
        mlflow.register_model(f"runs:/{entry['run_id']}/model", f"tf-{fabric}")
    assert main(["--quiet", "promote", "tf", "--data", str(data)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("fabric ")]
    assert [line.split(" ")[1] for line in lines] == ["00", "01"], text
    assert all("not promoted" in line for line in lines), text
    # each judged on its own fabric's strips of the data
    assert "over 14 common strips" in text and "over 10 common strips" in text


@pytest.mark.slow
def test_fleet_evaluation_refusals(
    fleet: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out, text = fleet
    target = tmp_path / "out.json"
    base = ["--quiet", "evaluate", "--data", str(data), "--split", "all", "--json", str(target)]
    # an unknown fabric: one line naming the known ones
    assert main([*base, "--model-uri", str(out), "--fabric", "07"]) == 2
    err = capsys.readouterr().err
    assert "no model for fabric '07'" in err and "00, 01" in err and err.count("\n") == 1
    # a manifest naming a version that does not exist (and no bundle folder beside it)
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads(text)
    manifest["fabrics"]["00"]["uri"] = "models:/tf-00/99"
    (broken / FLEET_MANIFEST).write_text(json.dumps(manifest))
    assert main([*base, "--model-uri", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "tf-00" in err and err.count("\n") == 1
    assert not target.exists()


def tailed_strip(seed: int) -> tuple[Analysed, np.ndarray, np.ndarray]:
    """A 1000 x 1000 defective strip: defect-free scores mostly low with 300 high ones (the tail
    that decides pixel AP), 1000 defect pixels scoring into that tail. Also all scores and the
    defect flags, for the exact figures."""
    from models.pipeline import Analysis
    from training.data import Sample

    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 1.0, (1000, 1000)).astype(np.float32)
    mask = np.zeros(scores.shape, np.uint8)
    mask[400:425, 300:340] = 255
    defect = mask > 0
    scores[defect] = rng.normal(4.0, 1.0, int(defect.sum()))
    tail = rng.choice(np.flatnonzero(~defect), 300, replace=False)
    scores.flat[tail] = rng.normal(5.0, 1.0, tail.size)
    valid = np.ones(scores.shape, bool)
    analysis = Analysis(
        image=np.zeros(scores.shape, np.uint8), valid=valid, anomaly_map=scores,
        boxes=[], tile_scores=[], tile_valid=[], score=float(scores.max()),
    )  # fmt: skip
    sample = Sample(Path("0001_002_00.png"), masks=(), label=1, defect="002", fabric="00")
    return (sample, analysis, mask), scores.ravel(), defect.ravel()


def test_rank_bands_are_geometric_and_cover_every_pixel() -> None:
    from training.fleet_eval import BAND_GROWTH, STRIP_PIXELS, rank_bands

    assert rank_bands(0) == [] and rank_bands(STRIP_PIXELS) == [(0, STRIP_PIXELS)]
    size = 1_000_000
    bands = rank_bands(size)
    assert bands[0] == (0, STRIP_PIXELS) and bands[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))
    assert bands[1] == (STRIP_PIXELS, STRIP_PIXELS * BAND_GROWTH)


def test_pixel_sample_keeps_the_tail_of_defect_free_scores_and_their_totals() -> None:
    from training.fleet_eval import STRIP_PIXELS, strip_pixels

    analysed, scores, defect = tailed_strip(0)
    strip = strip_pixels(analysed, analysed[1].anomaly_map, np.random.default_rng(0))
    assert strip is not None
    negatives = np.sort(scores[~defect])[::-1]
    assert strip.negative_weights.sum() == pytest.approx(negatives.size)
    top = strip.negative_weights == 1.0
    np.testing.assert_array_equal(np.sort(strip.negatives[top])[::-1], negatives[:STRIP_PIXELS])
    assert strip.positives.size == int(defect.sum()) and strip.positive_weight == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_figures_on_the_strip_sample_match_the_exact_figures(seed: int) -> None:
    """Pixel AP hinges on the few defect-free pixels that outscore defects: a uniform 0.1 %
    sample of defect-free pixels misses them (AP far too high); the rank-stratified one keeps
    them, so the sampled figures match those over every pixel."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from training.fleet_eval import pixel_figures, strip_pixels
    from training.metrics import aupro

    analysed, scores, defect = tailed_strip(seed)
    exact_ap = average_precision_score(defect, scores)
    strip = strip_pixels(analysed, analysed[1].anomaly_map, np.random.default_rng(seed))
    assert strip is not None
    figures = pixel_figures([strip])
    assert abs(figures["pixel_ap"] - exact_ap) < 0.01, (figures["pixel_ap"], exact_ap)
    assert figures["pixel_auroc"] == pytest.approx(roc_auc_score(defect, scores), abs=0.002)
    _, analysis, mask = analysed
    assert mask is not None
    exact_aupro = aupro([mask], [analysis.anomaly_map], [analysis.valid])
    assert figures["aupro"] == pytest.approx(exact_aupro, abs=0.005)
    # a resample holding the strip twice weighs both classes alike: the same figures
    twice = pixel_figures([strip, strip])
    assert twice["pixel_ap"] == pytest.approx(figures["pixel_ap"])


@pytest.mark.slow
def test_the_isolated_peak_bench_gives_a_trained_fleet_one_and_takes_it_away(
    fleet: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m bench.isolated_peak`: the same networks with the reference learned from each
    fabric's own training strips (PatchCore learns none in training; the bench is told to),
    re-fitted on the same validation split; --without removes it again."""
    from bench.isolated_peak import main as bench_main
    from models.manifest import read_manifest

    data, out, _ = fleet
    peaked, plain = tmp_path / "peaked", tmp_path / "plain"
    bench_main(["--fleet", str(out), "--data", str(data), "--out", str(peaked)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line[:4] for line in printed] == ["00: ", "01: "]
    assert all("raw image threshold" in line and "images)" in line for line in printed)
    for fabric in ("00", "01"):
        assert read_manifest(out / fabric).pipeline.isolated_peak is None
        peak = read_manifest(peaked / fabric).pipeline.isolated_peak
        assert peak is not None
        assert peak.images == read_manifest(out / fabric).training["train_images"]
    assert sorted(resolve_fleet(str(peaked)).fabrics) == ["00", "01"]
    bench_main(["--fleet", str(peaked), "--data", str(data), "--out", str(plain), "--without"])
    assert "00: none;" in capsys.readouterr().out
    assert read_manifest(plain / "00").pipeline.isolated_peak is None
