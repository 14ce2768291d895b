"""loomwatch batch on the local engine: the rows, parity with predict, bad files, resuming, the
atomic output and the report, on a small synthetic archive. Slow: a pool of worker processes,
and a job killed half-way (both start interpreters that import torch)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest

from loomwatch.cli import main, missing_extra
from tests.helpers import one_line_error, real_aitex, train_cli, wait_until
from training.batch.files import BatchInputError, find_images
from training.batch.job import BatchRequest, run_batch
from training.batch.output import (
    MARKER,
    OutputError,
    check_output,
    output_lock,
    read_output,
    work_folder,
)
from training.batch.schema import SCHEMA, describe_file, mask_to_rle, rle_to_mask

ROOT = Path(__file__).resolve().parents[3]


def rows_by_path(out: Path) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in read_output(out).to_pylist()}


def batch(bundle: Path, source: Path | str, out: Path, **options: object) -> int:
    args = ["--quiet", "batch", "--model-uri", str(bundle), "--input", str(source)]
    args += ["--output", str(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return main(args)


# --- without a model --------------------------------------------------------------------------


def test_mask_rle_is_coco_column_major_and_round_trips() -> None:
    mask = np.array([[0, 255, 0], [0, 255, 255]], np.uint8)
    # column by column: 0 0 | 255 255 | 0 255 -> 2 background, 2 set, 1 background, 1 set
    assert mask_to_rle(mask) == {"size": [2, 3], "counts": [2, 2, 1, 1]}
    assert mask_to_rle(np.full((2, 2), 255, np.uint8)) == {"size": [2, 2], "counts": [0, 4]}
    assert mask_to_rle(np.zeros((3, 4), np.uint8)) == {"size": [3, 4], "counts": [12]}
    rng = np.random.default_rng(0)
    for _ in range(20):
        random = (rng.random((7, 11)) > 0.6).astype(np.uint8) * 255
        assert np.array_equal(rle_to_mask(json.dumps(mask_to_rle(random))), random)


def test_the_docs_describe_every_column() -> None:
    page = (ROOT / "docs" / "batch.md").read_text()
    for name in SCHEMA.names:
        assert f"| `{name}`" in page or f"`{name}`, `" in page or f", `{name}` |" in page, name


def test_folders_give_fabric_roll_and_defect_code(tmp_path: Path) -> None:
    root = tmp_path / "mill"
    names = ("NoDefect_images/2311694-2040n7u/0001_000_02.png", "Defect_images/0010_006_02.png",
             "roll-17/strip_0001.png", "loose.png")  # fmt: skip
    for relative in names:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    found = {Path(i.path).name: i for i in find_images(str(root))[1]}
    normal = found["0001_000_02.png"]
    assert (normal.fabric, normal.roll, normal.defect_code) == ("02", "2311694-2040n7u", "000")
    assert (found["0010_006_02.png"].roll, found["0010_006_02.png"].defect_code) == (None, "006")
    assert (found["strip_0001.png"].fabric, found["strip_0001.png"].roll) == (None, "roll-17")
    assert found["loose.png"].roll is None
    image = describe_file(root / "roll-17" / "strip_0001.png", root, 1)
    assert image.file_bytes == 1 and image.defect_code is None


@pytest.mark.realdata
def test_the_real_aitex_folder_gives_fabric_and_roll() -> None:
    _, images = find_images(str(real_aitex()))
    assert images and not any("_mask" in Path(i.path).name for i in images)
    for image in images:
        path = Path(image.path)
        assert image.fabric == path.stem[-2:], path
        if path.parent.parent.name == "NoDefect_images":
            assert (image.roll, image.defect_code) == (path.parent.name, "000"), path
        else:
            assert image.roll is None and image.defect_code not in (None, "000"), path


def test_a_folder_skips_masks_and_non_images_a_glob_takes_what_it_names(archive: Path) -> None:
    root, images = find_images(str(archive))
    assert root == archive.resolve() and len(images) == 6
    assert not any("Mask_images" in i.path for i in images)
    (archive / "notes.txt").write_text("not a strip")
    try:
        assert len(find_images(str(archive))[1]) == 6
        _, globbed = find_images(f"{archive}/*.txt")
        assert [Path(i.path).name for i in globbed] == ["notes.txt"]
        _, recursive = find_images(f"{archive}/**/*_00.png")
        assert len(recursive) == 6 + len(list((archive / "Mask_images").glob("*_00.png")))
    finally:
        (archive / "notes.txt").unlink()


def test_the_job_s_own_folders_inside_the_input_are_not_scored(
    bundle: Path, archive: Path, tmp_path: Path
) -> None:
    source = tmp_path / "archive"
    shutil.copytree(archive, source)
    out, report = source / "results.parquet", source / "report"
    assert batch(bundle, source, out, report=report, worst=1) == 0
    assert batch(bundle, source, out, report=report, worst=1) == 0  # report PNGs are not input
    rows = rows_by_path(out)
    assert len(rows) == 6 and not any("report" in path for path in rows)


def test_inputs_and_outputs_that_cannot_be_used(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="no such file"):
        find_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchInputError, match="no image files"):
        find_images(str(tmp_path / "empty"))
    with pytest.raises(BatchInputError, match="matches no file"):
        find_images(str(tmp_path / "*.png"))
    foreign = tmp_path / "results.parquet"
    foreign.mkdir()
    (foreign / "mine.csv").write_text("a,b\n")
    with pytest.raises(OutputError, match="not a loomwatch batch output"):
        check_output(foreign)
    (tmp_path / "file.parquet").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        check_output(tmp_path / "file.parquet")


def test_cli_mistakes_are_one_line_and_exit_2(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.parquet"
    assert batch(tmp_path / "no-model", archive, out) == 2
    one_line_error(capsys, "no-model")
    assert batch(tmp_path, tmp_path / "missing", out) == 2
    one_line_error(capsys, "no such file or folder")
    assert batch(tmp_path, archive, out, engine="dask") == 2
    one_line_error(capsys, "unknown --engine 'dask'")
    assert batch(tmp_path, archive, out, master="local[2]") == 2
    one_line_error(capsys, "--master needs --engine spark")
    assert not out.exists()


def test_a_missing_package_names_the_batch_extra() -> None:
    for package in ("pyspark", "pyarrow", "torch", "mlflow"):  # [batch] brings all of them
        line = missing_extra("batch", ModuleNotFoundError(name=package))
        assert line == (
            f"loomwatch batch needs {package}, which is not installed: "
            "pip install 'loomwatch[batch]'"
        )


# --- scoring ----------------------------------------------------------------------------------


def test_rows_equal_predict_s_results(bundle: Path, archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    assert batch(bundle, archive, out) == 0
    rows = rows_by_path(out)
    images = sorted(rows)
    assert len(images) == 6
    assert main(["--quiet", "predict", "--model-uri", str(bundle), *images,
                 "--out", str(tmp_path / "predicted")]) == 0  # fmt: skip
    for path, row in rows.items():
        stem = Path(path).stem
        expected = json.loads((tmp_path / "predicted" / f"{stem}.json").read_text())
        assert abs(row["score"] - expected["score"]) <= 1e-6
        assert abs(row["raw_score"] - expected["raw_score"]) <= 1e-6
        assert row["decision"] == expected["decision"]
        assert row["threshold"] == expected["threshold"]
        assert json.loads(row["regions"]) == expected["regions"]
        assert json.loads(row["suppressed"]) == expected["suppressed"]
        mask = cv2.imread(str(tmp_path / "predicted" / f"{stem}.mask.png"), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and np.array_equal(rle_to_mask(row["mask_rle"]), mask)
        assert (row["width"], row["height"]) == (expected["image_size"]["width"],
                                                 expected["image_size"]["height"])  # fmt: skip
        assert row["error"] is None and row["engine"] == "local"
        assert row["model_digest"].startswith("sha256:") and row["model_type"] == "patchcore"
        assert (row["backend"], row["device"], row["precision"]) == ("torch", "cpu", "32")
        assert json.loads(row["timings_ms"])["model"] > 0
    assert {row["roll"] for row in rows.values()} == {None, "roll-a", "roll-b"}
    assert {row["fabric"] for row in rows.values()} == {"00"}
    assert (out / "fabric=00").is_dir() and (out / MARKER).is_file()
    assert not work_folder(out).exists()
    stored = pa.parquet.read_schema(next((out / "fabric=00").glob("*.parquet")))
    assert stored.names == [name for name in SCHEMA.names if name != "fabric"]  # a folder


def test_bad_files_become_error_rows_and_exit_1(
    bundle: Path, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "archive"
    shutil.copytree(archive, source)
    strip = next((source / "Defect_images").glob("*.png"))
    (source / "Defect_images" / "0090_002_00.png").write_bytes(strip.read_bytes()[:400])
    (source / "Defect_images" / "0091_002_00.png").write_text("not an image at all")
    (source / "Defect_images" / "0092_002_00.png").write_bytes(b"\0")
    big = source / "NoDefect_images" / "roll-a" / "0093_000_00.png"
    big.write_bytes(os.urandom(200_000))
    out = tmp_path / "out.parquet"
    assert batch(bundle, source, out, max_bytes=150_000) == 1
    assert "4 errors" in capsys.readouterr().out
    rows = rows_by_path(out)
    errors = {Path(p).name: r["error"] for p, r in rows.items() if r["error"] is not None}
    assert set(errors) == {"0090_002_00.png", "0091_002_00.png", "0092_002_00.png",
                           "0093_000_00.png"}  # fmt: skip
    assert "truncated or corrupt" in errors["0090_002_00.png"]
    assert "not a recognised image format" in errors["0091_002_00.png"]
    assert "200000 bytes, more than the limit of 150000" in errors["0093_000_00.png"]
    failed = rows[str(big.resolve())]
    assert failed["score"] is None and failed["decision"] is None and failed["roll"] == "roll-a"
    assert sum(r["error"] is None for r in rows.values()) == 6

    # repaired files are scored on the next run; the rest is kept, not scored again
    (source / "Defect_images" / "0090_002_00.png").write_bytes(strip.read_bytes())
    before = {p: r["scored_at"] for p, r in rows.items() if r["error"] is None}
    assert batch(bundle, source, out, max_bytes=150_000) == 1
    again = rows_by_path(out)
    assert again[str((source / "Defect_images" / "0090_002_00.png").resolve())]["error"] is None
    assert all(again[p]["scored_at"] == stamp for p, stamp in before.items())


def test_rerun_skips_what_this_model_scored_and_a_new_model_scores_again(
    bundle: Path, archive: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    first = run_batch(BatchRequest(str(bundle), str(archive), out, progress=False))
    assert (first.n_images, first.n_scored_now, first.n_resumed) == (6, 6, 0)
    again = run_batch(BatchRequest(str(bundle), str(archive), out, progress=False))
    assert (again.n_scored_now, again.n_resumed, again.exit_code) == (0, 6, 0)
    assert rows_by_path(out).keys() == {i.path for i in find_images(str(archive))[1]}
    bf16 = run_batch(BatchRequest(str(bundle), str(archive), out, progress=False,
                                  device="cpu", precision="bf16"))  # fmt: skip
    assert (bf16.n_scored_now, bf16.n_resumed) == (6, 0)  # other arithmetic: other results
    assert {row["precision"] for row in rows_by_path(out).values()} == {"bf16"}

    other = tmp_path / "other-model"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["suppression"]["min_region_area"] = manifest["suppression"]["min_region_area"] + 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    changed = run_batch(BatchRequest(str(other), str(archive), out, progress=False))
    assert (changed.n_scored_now, changed.n_resumed) == (6, 0)
    digests = {row["model_digest"] for row in rows_by_path(out).values()}
    assert digests == {changed.model.digest} != {first.model.digest}


@pytest.mark.slow
def test_two_workers_write_the_same_rows_as_one(
    bundle: Path, archive: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert batch(bundle, archive, one) == 0
    assert batch(bundle, archive, two, workers=2, checkpoint_every=2) == 0
    a, b = rows_by_path(one), rows_by_path(two)
    assert a.keys() == b.keys()
    for path in a:
        assert abs(a[path]["score"] - b[path]["score"]) <= 1e-6, path
        assert a[path]["decision"] == b[path]["decision"]
        assert a[path]["mask_rle"] == b[path]["mask_rle"]


def copies(synth_data: Path, source: Path, count: int = 4) -> Path:
    """`count` rolls holding each synthetic strip: enough work that a job can be hit mid-way."""
    for copy in range(count):
        for path in sorted(synth_data.rglob("*.png")):
            if "Mask_images" not in path.parts:
                target = source / f"roll-{copy}" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    return source


def batch_process(bundle: Path, source: Path, out: Path, *options: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "loomwatch.cli", "--quiet", "batch", "--model-uri",
               str(bundle), "--input", str(source), "--output", str(out),
               "--checkpoint-every", "1", *options]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def wait_for_checkpoints(process: subprocess.Popen[str], work: Path, count: int) -> None:
    def checkpointed() -> bool:
        return len(list(work.glob("part-*.parquet"))) >= count or process.poll() is not None

    wait_until(checkpointed, timeout=120, what=f"{count} checkpoints")
    assert process.poll() is None, process.stderr.read() if process.stderr else ""


@pytest.mark.slow
def test_a_killed_job_leaves_the_previous_output_whole_and_resumes(
    bundle: Path, synth_data: Path, tmp_path: Path
) -> None:
    source = copies(synth_data, tmp_path / "archive")
    out = tmp_path / "out.parquet"
    assert batch(bundle, f"{source}/roll-0/*.png", out) == 0
    previous = rows_by_path(out)

    process = batch_process(bundle, source, out)
    work = work_folder(out)
    try:
        wait_for_checkpoints(process, work, 3)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert rows_by_path(out) == previous  # the output of the finished run, untouched
    kept = len(list(work.glob("part-*.parquet")))

    resumed = run_batch(BatchRequest(str(bundle), str(source), out, progress=False))
    assert resumed.n_images == 4 * len(previous)
    assert resumed.n_resumed >= len(previous) + kept
    assert resumed.n_scored_now == resumed.n_images - resumed.n_resumed
    assert len(rows_by_path(out)) == resumed.n_images and not work.exists()
    assert not list(tmp_path.glob(".out.parquet.staging*")), "staging folders left behind"


def test_report_per_fabric_and_roll(bundle: Path, archive: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "out.parquet", tmp_path / "report"
    assert batch(bundle, archive, out, report=report, worst=2) == 0
    figures = json.loads((report / "report.json").read_text())
    rows = rows_by_path(out)
    (fabric,) = figures["fabrics"]
    assert figures["model"]["trained_on_fabric"] is None  # trained on every fabric of its data
    assert fabric["fabric"] == "00" and fabric["images"] == len(rows) == 6
    anomalous = sum(bool(r["is_anomalous"]) for r in rows.values())
    assert fabric["anomalous"] == anomalous and fabric["defect_rate"] == pytest.approx(
        anomalous / 6
    )
    rolls = {roll["roll"]: roll["images"] for roll in fabric["rolls"]}
    assert rolls == {"(none)": 2, "roll-a": 2, "roll-b": 2}
    assert sum(fabric["histogram"]["counts"]) == 6
    scores = sorted((r["score"] for r in rows.values()), reverse=True)
    assert [w["score"] for w in fabric["worst"]] == pytest.approx(scores[:2])
    for strip in fabric["worst"]:
        assert (report / strip["overlay"]).read_bytes().startswith(b"\xff\xd8\xff")  # JPEG
    page = (report / "report.html").read_text()
    assert "Fabric 00" in page and "roll-a" in page and fabric["histogram_png"] in page


@pytest.mark.slow
def test_a_registered_model_is_pinned_to_its_version(
    synth_data: Path, archive: Path, tmp_path: Path
) -> None:
    """models:/NAME@ALIAS through the tracking store: rows name the version behind the alias."""
    assert train_cli(synth_data, tmp_path / "bundle", "--register", "batch-fabric",
                     "--alias", "champion") == 0  # fmt: skip
    out = tmp_path / "out.parquet"
    summary = run_batch(
        BatchRequest("models:/batch-fabric@champion", str(archive), out, progress=False)
    )
    assert summary.exit_code == 0
    rows = read_output(out).to_pylist()
    assert {(r["model_name"], r["model_version"]) for r in rows} == {("batch-fabric", "1")}
    assert {r["model_uri"] for r in rows} == {"models:/batch-fabric@champion"}


def test_one_job_at_a_time_per_output(
    bundle: Path, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.parquet"
    with output_lock(out):  # another job holds it
        assert batch(bundle, archive, out) == 2
        one_line_error(capsys, "another loomwatch batch is writing it")
        assert not out.exists()
    assert batch(bundle, archive, out) == 0


@pytest.mark.slow
def test_a_pool_worker_that_dies_fails_the_job_with_exit_2_and_keeps_its_work(
    bundle: Path, synth_data: Path, tmp_path: Path
) -> None:
    source, out = copies(synth_data, tmp_path / "archive"), tmp_path / "out.parquet"
    process = batch_process(bundle, source, out, "--workers", "2")
    work = work_folder(out)
    try:
        wait_for_checkpoints(process, work, 2)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        workers = [
            int(pid)
            for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 2, children
        os.kill(workers[0], signal.SIGKILL)
        _, errors = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2, errors
    lines = errors.strip().splitlines()
    assert lines[-1].startswith("loomwatch: error: the batch job failed: BrokenProcessPool")
    assert not out.exists()
    kept = len(list(work.glob("part-*.parquet")))
    resumed = run_batch(BatchRequest(str(bundle), str(source), out, progress=False))
    assert resumed.n_resumed >= kept >= 2 and resumed.exit_code == 0
