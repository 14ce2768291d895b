"""The Spark engine: the same scoring, spread over a Spark cluster (``local[N]`` by default).

The driver lists the files and ships the model folder to every executor
(``SparkContext.addFile``); a DataFrame of file paths is scored with ``mapInArrow``: each Python
worker loads the model once through the same :class:`~models.pipeline.Detector` as
``loomwatch predict`` (kept between tasks: Spark reuses its Python workers), reads each image by
path, and yields the rows as Arrow record batches of :data:`~training.batch.schema.SCHEMA` —
the very batches the local engine writes. Each checkpoint is a Spark job that writes Parquet
into the work folder; the last job writes the output partitioned by fabric.

Input, output and work folders are paths on a file system that the driver and every executor
mount at the same place (``file://`` URIs are used, never the cluster's default file system).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from training.batch.output import MARKER, publish, staging_folder, work_folder
from training.batch.schema import PARTITION_COLUMN, SCHEMA, ImageFile, to_batch
from training.batch.scoring import WorkerSettings, score_files

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

INPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("fabric", pa.string()),
        ("roll", pa.string()),
        ("defect_code", pa.string()),
        ("file_bytes", pa.int64()),
    ]
)
HADOOP_GLOB = frozenset("[]{}*?\\")
TASKS_PER_CORE = 4  # smaller tasks balance uneven strips; each costs little once the model is in


class SparkUnavailableError(RuntimeError):
    """Spark cannot start here (no Java, no pyspark); the message says what to install."""


def java_problem() -> str | None:
    """Why Spark's JVM cannot start here, or None."""
    home = os.environ.get("JAVA_HOME", "").strip()
    if home and (Path(home) / "bin" / "java").is_file():
        return None
    if shutil.which("java"):
        return None
    return "the Spark engine needs Java 17 or newer: 'java' is not on PATH and JAVA_HOME is unset"


def under_spark_submit() -> bool:
    """Started by spark-submit (or pyspark): the JVM and its master are already chosen."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_session(master: str | None, workers: int, progress: bool) -> SparkSession:
    problem = java_problem()
    if problem:
        raise SparkUnavailableError(problem)
    from pyspark.sql import SparkSession

    # pandas is not on the data path (Arrow batches are), so its version does not matter here
    warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas", FutureWarning)
    logging.getLogger("py4j").setLevel(logging.WARNING)  # its INFO lines at every shutdown
    builder = SparkSession.builder.appName("loomwatch-batch")
    if master is None and not under_spark_submit():
        master = f"local[{workers}]"
    if master is not None:
        builder = builder.master(master)
        if master.startswith("local"):
            # local workers run this interpreter (the one with loomwatch and its packages)
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            builder = builder.config("spark.ui.enabled", "false")
    settings = {
        "spark.ui.showConsoleProgress": str(progress).lower(),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",  # "02" stays text
        "spark.python.worker.reuse": "true",  # the model stays loaded between tasks
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


def spark_schema(schema: pa.Schema) -> StructType:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def _score_partition(
    settings: WorkerSettings, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """In a Spark Python worker: rows for the paths of one partition, one batch per image."""
    from pyspark import SparkFiles

    local = replace(settings, folder=SparkFiles.get(settings.folder))
    for batch in batches:
        for record in batch.to_pylist():
            yield to_batch(list(score_files([ImageFile(**record)], local)))


def _paths_frame(spark: SparkSession, images: Sequence[ImageFile]) -> DataFrame:
    table = pa.Table.from_pylist([asdict(image) for image in images], schema=INPUT_SCHEMA)
    return spark.createDataFrame(table)  # Arrow straight in: no pandas on the way


def _uri(path: Path) -> str:
    """A local path as Hadoop reads it: ``file://`` and the path unescaped (Hadoop's ``Path``
    quotes it itself; a percent-encoded URI would name another folder)."""
    return "file://" + str(path.resolve())


def _read_uri(path: Path) -> str:
    """:func:`_uri` for reading, where Hadoop expands globs: ``[``, ``*``... taken literally."""
    return "".join(f"\\{c}" if c in HADOOP_GLOB else c for c in _uri(path))


def run_spark(
    spark: SparkSession,
    images: Sequence[ImageFile],
    settings: WorkerSettings,
    work: Path,
    checkpoint_every: int,
    on_rows: Callable[[int], None] = lambda n: None,
) -> int:
    """Score ``images`` on the cluster, one Spark job per checkpoint; the row count."""
    if not images:
        return 0
    folder = Path(settings.folder)
    spark.sparkContext.addFile(str(folder.resolve()), recursive=True)
    task_cpus = int(spark.conf.get("spark.task.cpus", "1") or 1)
    shipped = replace(settings, folder=folder.resolve().name, engine="spark", threads=task_cpus)
    output_schema = spark_schema(SCHEMA)
    cores = max(1, spark.sparkContext.defaultParallelism)
    work.mkdir(parents=True, exist_ok=True)
    written = 0
    for start in range(0, len(images), checkpoint_every):
        part = images[start : start + checkpoint_every]
        frame = _paths_frame(spark, part).repartition(min(len(part), cores * TASKS_PER_CORE))
        scored = frame.mapInArrow(partial(_score_partition, shipped), output_schema)
        name = f"batch-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}"
        temporary, final = work / f".{name}.tmp", work / name
        scored.write.mode("overwrite").parquet(_uri(temporary))
        os.replace(temporary, final)
        written += len(part)
        on_rows(len(part))
    return written


def write_output_spark(
    spark: SparkSession,
    out: Path,
    identity: dict[str, str],
    paths: Collection[str],
    info: dict[str, Any],
) -> None:
    """The output, written by Spark: per input path the newest row of this model, from the
    previous output (its scored rows) and the checkpoints, partitioned by fabric."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    schema = spark_schema(SCHEMA)
    this_model = F.lit(True)
    for column, value in identity.items():  # the same model, backend and precision
        this_model = this_model & (F.col(column) == F.lit(value))
    parts = []
    if (out / MARKER).is_file():
        previous = spark.read.schema(schema).parquet(_read_uri(out))
        parts.append(previous.where(this_model & F.col("error").isNull()).select(*SCHEMA.names))
    work = work_folder(out)
    if work.is_dir():
        current = spark.read.schema(schema).option("recursiveFileLookup", "true")
        parts.append(current.parquet(_read_uri(work)).where(this_model).select(*SCHEMA.names))
    wanted = spark.createDataFrame([(p,) for p in sorted(set(paths))], "path string")
    staging = staging_folder(out)
    try:
        if parts:
            rows = parts[0]
            for other in parts[1:]:
                rows = rows.unionByName(other)
            newest = Window.partitionBy("path").orderBy(F.col("scored_at").desc())
            rows = (
                rows.join(wanted, "path", "left_semi")
                .withColumn("_rank", F.row_number().over(newest))
                .where(F.col("_rank") == 1)
                .drop("_rank")
            )
            (
                rows.repartition(PARTITION_COLUMN)
                .sortWithinPartitions("path")
                .write.mode("overwrite")
                .partitionBy(PARTITION_COLUMN)
                .parquet(_uri(staging))
            )
        publish(staging, out, info)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
