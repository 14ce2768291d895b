"""loomwatch batch on Apache Spark (local[2], a real JVM): the same rows as the local engine and
as predict, Parquet partitioned by fabric, bad files as rows, resuming. Skipped with a reason
where Java is missing; a machine without Java is also checked to fail in one line."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loomwatch.cli import main
from tests.helpers import one_line_error
from training.batch.job import BatchRequest, run_batch
from training.batch.output import MARKER, read_output, work_folder
from training.batch.spark import java_problem

needs_java = pytest.mark.skipif(
    java_problem() is not None, reason=f"no Java for Spark: {java_problem()}"
)


def rows_by_path(out: Path) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in read_output(out).to_pylist()}


@pytest.mark.spark
@pytest.mark.slow
@needs_java
def test_spark_rows_equal_the_local_engine_s_and_predict_s(
    bundle: Path, archive: Path, tmp_path: Path
) -> None:
    source = tmp_path / "archive"
    shutil.copytree(archive, source)
    strip = next((source / "Defect_images").glob("*.png"))
    (source / "Defect_images" / "0090_002_00.png").write_bytes(strip.read_bytes()[:400])
    (source / "misc").mkdir()
    shutil.copy(strip, source / "misc" / "strip.png")  # a name that is not AITEX: no fabric
    local = tmp_path / "local.parquet"
    spark = tmp_path / "spark out [2].parquet"  # Hadoop reads [...] as a glob, a space as %20
    assert run_batch(BatchRequest(str(bundle), str(source), local, progress=False)).exit_code == 1
    request = BatchRequest(str(bundle), str(source), spark, engine="spark", workers=2)
    summary = run_batch(replace(request, progress=False, checkpoint_every=4))
    assert (summary.exit_code, summary.n_images, summary.n_errors) == (1, 8, 1)
    assert (spark / "fabric=00").is_dir() and (spark / "fabric=__HIVE_DEFAULT_PARTITION__").is_dir()
    assert (spark / MARKER).is_file() and not work_folder(spark).exists()
    a, b = rows_by_path(local), rows_by_path(spark)
    assert a.keys() == b.keys()
    for path, row in b.items():
        assert row["engine"] == "spark"
        for key in ("fabric", "roll", "defect_code", "decision", "regions", "suppressed",
                    "mask_rle", "model_digest", "error"):  # fmt: skip
            assert row[key] == a[path][key], (path, key)
        if row["error"] is None:
            assert abs(row["score"] - a[path]["score"]) <= 1e-6
            assert abs(row["raw_score"] - a[path]["raw_score"]) <= 1e-6
    assert b[str((source / "misc" / "strip.png").resolve())]["fabric"] is None

    images = sorted(p for p, row in b.items() if row["error"] is None)[:3]
    predicted = tmp_path / "predicted"
    assert main(["--quiet", "predict", "--model-uri", str(bundle), *images,
                 "--out", str(predicted)]) == 0  # fmt: skip
    for path in images:
        expected = json.loads((predicted / f"{Path(path).stem}.json").read_text())
        assert abs(b[path]["score"] - expected["score"]) <= 1e-6
        assert b[path]["decision"] == expected["decision"]

    again = run_batch(
        BatchRequest(str(bundle), str(source), spark, engine="spark", workers=2, progress=False)
    )
    assert (again.n_resumed, again.n_scored_now) == (7, 1)  # the truncated file is tried again
    assert {p: r["scored_at"] for p, r in rows_by_path(spark).items() if r["error"] is None} == {
        p: r["scored_at"] for p, r in b.items() if r["error"] is None
    }


def test_without_java_the_spark_engine_says_so_in_one_line(
    bundle: Path,
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    monkeypatch.delenv("JAVA_HOME", raising=False)
    args = ["--quiet", "batch", "--model-uri", str(bundle), "--input", str(archive)]
    out = tmp_path / "out.parquet"
    assert main([*args, "--output", str(out), "--engine", "spark"]) == 2
    one_line_error(capsys, "needs Java 17")
    assert not out.exists()
