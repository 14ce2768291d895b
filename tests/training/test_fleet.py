"""Fleets (issue 16): `train --fabric all`, `evaluate` of a fleet, its manifest and its runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loomwatch.cli import main
from tests.helpers import FAST_TRAIN, tracking_client
from tracking.fleet import FLEET_MANIFEST, resolve_fleet


def two_fabrics(out: Path) -> Path:
    """Synthetic AITEX layout with fabrics 00 (defective strips too) and 01 (defect-free only,
    like AITEX fabric 05 in the dev data)."""
    from training.synth import generate_dataset

    generate_dataset(out, fabrics=2, normal=10, defective=4, seed=3, width=512, height=128,
                     progress=False)  # fmt: skip
    for path in [*out.glob("Defect_images/*_01.png"), *out.glob("Mask_images/*_01_mask*.png")]:
        path.unlink()
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
    assert first == pytest.approx(60.0, abs=5.0) and second >= first
    # fabric 01 has no defective strip: it still calibrated, and says how
    calibration = manifest["fabrics"]["01"]["calibration"]
    assert "no defective validation strip" in calibration
    assert "pixel:p" in calibration and "regions not fitted" in calibration
    assert manifest["fabrics"]["01"]["validation_defective"] == 0
    # the fleet is addressable by its parent run too, and names the same models
    logged = resolve_fleet(f"runs:/{parent}/fleet")
    assert {f: m.uri for f, m in logged.members.items()} == {
        f: e["uri"] for f, e in manifest["fabrics"].items()
    }
    assert all(m.bundle is None for m in logged.members.values())
    local = resolve_fleet(str(out))
    assert local.member("1") is local.members["01"]
    assert local.members["00"].source == str(out / "00")


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
    # a fabric with too few defect-free strips to train and calibrate: named, before any run
    for path in sorted(data.glob("NoDefect_images/*/*_01.png"))[2:]:
        path.unlink()
    assert train_fleet(data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("loomwatch: error: fabric 01:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # a layout without fabric codes
    plain = tmp_path / "plain"
    (plain / "normal").mkdir(parents=True)
    (data / "NoDefect_images").rename(plain / "normal" / "x")
    assert train_fleet(plain, tmp_path / "out2") == 2
    assert "needs fabric codes" in capsys.readouterr().err
    assert run_count() == before
