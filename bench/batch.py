"""Throughput of ``loomwatch batch`` against ``loomwatch predict`` (prints figures only).

    python -m bench.batch --model-uri BUNDLE [--input DIR|GLOB] [--limit 20] [--workers 1 2]
                          [--spark] [--json FILE]

The same strips (default: the first ``--limit`` AITEX fabric-02 strips of the real-data folder,
``LOOMWATCH_AITEX_DIR``) are scored, each command in a fresh process, as a user runs it:

* ``predict``: ``loomwatch predict`` of every strip (one process; it also writes an overlay, a
  mask PNG and a JSON per strip);
* ``pipeline``: ``Detector.predict`` in a loop in this process, the model loaded beforehand: the
  rate no command can beat on these cores;
* ``batch local xN``: ``loomwatch batch --workers N`` (one worker scores in the command's own
  process; N > 1 starts a pool of N processes, one torch thread each);
* ``batch spark local[2]`` (``--spark``): ``--engine spark --workers 2``.

For each: wall time from start to exit (imports and model loading included), strips per second,
and the overhead against ``predict`` (wall time / predict's wall time - 1).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import aitex_dir

ROOT = Path(__file__).resolve().parents[1]


def default_input() -> str:
    return str(aitex_dir() / "**" / "*_02.png")


def strips(spec: str, limit: int) -> list[Path]:
    found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    return [p for p in found if "mask" not in p.name.lower()][:limit]


def run_command(args: list[str], cwd: Path) -> float:
    """Wall seconds of ``loomwatch ARGS`` in a fresh interpreter; fails loudly on a bad exit."""
    command = [sys.executable, "-m", "loomwatch.cli", "--quiet", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def pipeline_rate(model_uri: str, images: list[Path]) -> float:
    """Seconds to score ``images`` with a detector loaded beforehand (after one warm-up)."""
    from models.pipeline import Detector
    from tracking.uris import resolve_model_uri

    detector = Detector.from_bundle(resolve_model_uri(model_uri))
    detector.predict(images[0])
    started = time.perf_counter()
    for image in images:
        detector.predict(image)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--input", default=default_input(), help="DIR or GLOB of strips")
    parser.add_argument("--limit", type=int, default=20, help="score the first N strips")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--spark", action="store_true", help="also Spark local[2]")
    parser.add_argument("--json", type=Path, dest="json_path")
    args = parser.parse_args()

    images = strips(args.input, args.limit)
    if not images:
        raise SystemExit(f"no strips match {args.input}")
    print(f"{len(images)} strips from {args.input}; {os.cpu_count()} CPUs", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        work = Path(scratch)
        folder = work / "strips"  # one folder of links: batch and predict see the same files
        folder.mkdir()
        for image in images:
            (folder / image.name).symlink_to(image.resolve())
        listed = [str(folder / image.name) for image in images]

        def record(name: str, seconds: float) -> None:
            results[name] = {"seconds": seconds, "strips_per_second": len(images) / seconds}
            print(f"  {name:<24} {seconds:7.1f} s  {len(images) / seconds:6.2f} strips/s",
                  flush=True)  # fmt: skip

        record("predict", run_command(["predict", "--model-uri", args.model_uri, *listed,
                                       "--out", str(work / "predicted")], ROOT))  # fmt: skip
        record("pipeline", pipeline_rate(args.model_uri, [folder / i.name for i in images]))
        runs = [(f"batch local x{n}", ["--workers", str(n)]) for n in args.workers]
        if args.spark:
            runs.append(("batch spark local[2]", ["--engine", "spark", "--workers", "2"]))
        for name, options in runs:
            out = work / f"{name.replace(' ', '-')}.parquet"
            command = ["batch", "--model-uri", args.model_uri, "--input", str(folder),
                       "--output", str(out), *options]  # fmt: skip
            record(name, run_command(command, ROOT))
            shutil.rmtree(out, ignore_errors=True)
    base = results["predict"]["seconds"]
    print("overhead against predict (wall time / predict's - 1):")
    for name, figures in results.items():
        if name != "predict":
            figures["overhead_vs_predict"] = figures["seconds"] / base - 1.0
            print(f"  {name:<24} {figures['overhead_vs_predict']:+7.1%}")
    if args.json_path:
        summary = {"strips": len(images), "input": args.input, "cpus": os.cpu_count(),
                   "model_uri": args.model_uri, "results": results}  # fmt: skip
        args.json_path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
