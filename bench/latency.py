"""Latency and memory of a bundle through the serving pipeline (prints figures; asserts nothing).

    python bench/latency.py --bundle runs/demo/bundle [--image STRIP.png] [--batch-size 8]
                            [--threads 2] [--repeats 10]

Per tile: the model alone on one tile-sized input (batch of --batch-size, divided by its size).
Per strip: the whole Detector.predict path (decode excluded) on a 4096x256 strip (synthetic
fabric unless --image is given). Peak memory: the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from models.pipeline import Detector
from models.preprocessing import decode_image


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_strip(width: int = 4096, height: int = 256, seed: int = 0) -> np.ndarray:
    from training.synth import make_fabric, sample_fabric_params

    rng = np.random.default_rng(seed)
    return make_fabric(rng, sample_fabric_params(rng), height, width)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(call: object, repeats: int) -> list[float]:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        timings.append((time.perf_counter() - started) * 1000.0)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--image", type=Path, help="a strip to score (default: synthetic)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    before = rss_mib()
    detector = Detector.from_bundle(args.bundle, batch_size=args.batch_size)
    loaded = rss_mib()
    strip = decode_image(args.image) if args.image else synthetic_strip()
    tile = detector.pipeline.tile_size
    tiles = np.stack([strip[:tile, :tile]] * args.batch_size)[:, None].astype(np.float32) / 255.0
    valid = np.ones_like(tiles, dtype=bool)

    detector.network.run(tiles, valid)  # warm-up
    per_batch = time_calls(lambda: detector.network.run(tiles, valid), args.repeats)
    per_tile = [t / args.batch_size for t in per_batch]
    detector.predict(strip)  # warm-up
    per_strip = time_calls(lambda: detector.predict(strip), args.repeats)
    prediction = detector.predict(strip)

    manifest = detector.manifest
    print(
        f"bundle      {args.bundle} ({manifest.model_type}, {manifest.config.get('backbone', '')})"
    )
    print(f"threads     {args.threads}   batch size {args.batch_size}   repeats {args.repeats}")
    print(f"strip       {strip.shape[1]}x{strip.shape[0]}, {len(prediction.analysis.boxes)} tiles")
    for label, values in (("per tile", per_tile), ("per strip", per_strip)):
        median, p95 = statistics.median(values), percentile(values, 95)
        print(f"{label:<11} median {median:8.1f} ms   p95 {p95:8.1f} ms")
    stages = ", ".join(f"{k} {v:.0f}" for k, v in prediction.summary()["timings_ms"].items())
    print(f"stages (ms) {stages}")
    print(f"memory      RSS before load {before:.0f} MiB, after load {loaded:.0f} MiB, "
          f"peak {peak_mib():.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
