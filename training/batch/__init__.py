"""Batch scoring of an archive: every image below a folder (or matching a glob) through the
registered model, one row per image in Parquet, on a local process pool or on Apache Spark.

* :mod:`training.batch.schema` — the output's columns and how a row is made (mask as RLE).
* :mod:`training.batch.scoring` — what a worker runs on each file (the one Detector pipeline).
* :mod:`training.batch.files` — which files an input names, and their fabric and roll.
* :mod:`training.batch.output` — checkpoints, resuming, the atomic swap of the output folder.
* :mod:`training.batch.local` and :mod:`training.batch.spark` — the two engines.
* :mod:`training.batch.job` — one job from start to end; :mod:`training.batch.report` — the
  per-fabric, per-roll report.

``docs/batch.md`` describes the command, the schema and how to run it on a cluster.
"""
