"""The output folder: Parquet partitioned by fabric, checkpoints, resuming and the atomic swap.

``OUT.parquet`` is a folder (as Spark writes it): ``fabric=<code>/part-*.parquet``, images
without a fabric under ``fabric=__HIVE_DEFAULT_PARTITION__``, and ``_loomwatch_batch.json``
(what wrote it; the marker that lets a later run replace it). It is only ever replaced whole:
the new output is written beside it and renamed into place, so a reader, or a run killed at any
moment, never sees a half-written one.

While a job runs, every finished checkpoint (a few hundred rows) is written to
``OUT.parquet.work/`` beside the output, each file (or Spark folder) renamed into place when
complete. A run killed half-way leaves those; the next run with the same output and model reads
them, and the previous output, and scores only the images neither holds a row for (rows with an
error are tried again). When the job ends, the kept rows and the new ones become the new output
and the work folder is removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from models.manifest import move_into_place
from training.batch.schema import PARTITION_COLUMN, SCHEMA

MARKER = "_loomwatch_batch.json"
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"  # what Spark and Arrow name a null fabric


class OutputError(ValueError):
    """The output cannot be used: the message says which path and why, in one line."""


def work_folder(out: Path) -> Path:
    return out.parent / f"{out.name}.work"


def check_output(out: Path) -> None:
    """Refuse an output that would overwrite something that is not a batch output."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out}: exists and is a file, not a batch output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(
            f"--output {out}: exists and is not a loomwatch batch output ({MARKER} missing); "
            "choose another path"
        )
    ancestor = next(folder for folder in out.absolute().parents if folder.exists())
    if not os.access(ancestor, os.W_OK):  # the new output is written beside the old one
        raise OutputError(f"--output {out}: cannot write in {ancestor}")


def partitioning() -> ds.Partitioning:
    """fabric=<code> folders, read as text ("02" stays "02"; Arrow would guess a number)."""
    schema = pa.schema([pa.field(PARTITION_COLUMN, pa.string())])
    return ds.HivePartitioning(schema, null_fallback=NULL_PARTITION)


def read_output(out: Path, columns: list[str] | None = None) -> pa.Table:
    """A batch output (or an empty table when there is none), with :data:`SCHEMA`'s types."""
    if not (out / MARKER).is_file():
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    dataset = ds.dataset(out, schema=SCHEMA, format="parquet", partitioning=partitioning())
    return dataset.to_table(columns=columns)


def read_checkpoints(work: Path, columns: list[str] | None = None) -> pa.Table:
    """Every complete checkpoint in the work folder (names starting with '.' or '_', such as
    unfinished files and Spark's markers, are left out)."""
    if not work.is_dir():
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    dataset = ds.dataset(work, schema=SCHEMA, format="parquet")
    return dataset.to_table(columns=columns)


def _same(table: pa.Table, identity: dict[str, str]) -> pa.ChunkedArray | pa.Array:
    """Rows made by the job's model on the job's runtime (:data:`IDENTITY`)."""
    match = pa.array([True] * table.num_rows, pa.bool_())
    for column, value in identity.items():
        match = pc.and_(match, pc.fill_null(pc.equal(table[column], value), False))
    return match


def done_paths(out: Path, identity: dict[str, str]) -> set[str]:
    """Paths already scored, without error, by the same model on the same backend and precision
    (``identity``: :data:`IDENTITY`'s columns and values): in the output or in a checkpoint of an
    unfinished run."""
    columns = ["path", "error", *identity]
    done: set[str] = set()
    for table in (read_output(out, columns), read_checkpoints(work_folder(out), columns)):
        kept = table.filter(pc.and_(_same(table, identity), pc.is_null(table["error"])))
        done.update(kept["path"].to_pylist())
    return done


def write_checkpoint(work: Path, rows: pa.Table) -> Path:
    """One checkpoint file, written under a hidden name and renamed when complete."""
    work.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    final = work / f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    temporary = work / f".{final.name}.tmp"
    pq.write_table(rows, temporary)
    os.replace(temporary, final)
    return final


def final_rows(out: Path, identity: dict[str, str], paths: Collection[str]) -> pa.Table:
    """The rows of the finished job: per input path, the newest row of this model, from the
    previous output (scored rows only: its errors were tried again) and the checkpoints."""
    wanted = pa.array(sorted(set(paths)), pa.string())
    previous = read_output(out)
    previous = previous.filter(pc.and_(_same(previous, identity), pc.is_null(previous["error"])))
    current = read_checkpoints(work_folder(out))
    current = current.filter(_same(current, identity))
    rows = pa.concat_tables([previous, current])
    rows = rows.filter(pc.is_in(rows["path"], value_set=wanted))
    rows = rows.sort_by([("path", "ascending"), ("scored_at", "ascending")])
    ordered = rows["path"].to_pylist()
    newest = [
        i for i, path in enumerate(ordered) if i + 1 == len(ordered) or ordered[i + 1] != path
    ]
    return rows.take(pa.array(newest, pa.int64()))


def staging_folder(out: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=2, default=str) + "\n")


def publish(staging: Path, out: Path, info: dict[str, Any]) -> None:
    """Check that the finished staging folder holds one row per input image, mark it, and swap
    it in for ``out``; drop the checkpoints. ``info["images"]`` is the number of input images."""
    found = ds.dataset(staging, format="parquet").count_rows() if any(staging.iterdir()) else 0
    if found != info["images"]:
        raise RuntimeError(f"{out}: {found} rows for {info['images']} images; output not replaced")
    write_marker(staging, info)
    move_into_place(staging, out)
    shutil.rmtree(work_folder(out), ignore_errors=True)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One job at a time per output: an exclusive lock on ``.OUT.lock`` beside it (the file
    stays; the lock goes with the process, even when it is killed)."""
    path = out.parent / f".{out.name}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"--output {out}: another loomwatch batch is writing it (lock {path})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_output_local(rows: pa.Table, out: Path, info: dict[str, Any]) -> None:
    """The output from ``rows``, written by Arrow (the local engine)."""
    staging = staging_folder(out)
    try:
        if rows.num_rows:
            pq.write_to_dataset(
                rows.sort_by("path"),
                staging,
                partitioning=partitioning(),
                basename_template="part-{i}.parquet",
            )
        publish(staging, out, info)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
