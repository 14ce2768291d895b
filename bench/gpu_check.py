"""DRAEM on one GPU, end to end, in one table (issue 14): training speed in fp32 and bf16, what a
short training budget reaches, one strip's latency, and the HTTP service under concurrent clients.

    python -m bench.gpu_check DATA [--fabric 02] [--device cuda] [--budget-minutes 3]
        [--speed-seconds 12] [--precision bf16] [--clients 16] [--requests 160]
        [--workdir DIR] [--json FILE] [--smoke]

DATA is a data folder in any layout ``loomwatch train`` reads (the AITEX development subset:
fabric 02). Needs only this checkout installed with its ``train`` extra (torch, and what
``pip install '.[train]'`` brings); nothing is downloaded. Rows: DRAEM with the default config
(16 / 16 base channels) and with the paper's widths (128 / 64, the rest as the default). For
each row, on ``--device``:

- epochs per minute in fp32 and in bf16: a fresh model fitted for ``--speed-seconds`` on the
  training tiles of the split (no validation; the epoch cut short counts by its share), with the
  mean split of a step into data (the wait for the next prepared batch), forward and backward;
- validation figures after a ``--budget-minutes`` budget: ``training.train.train`` as
  ``loomwatch train --max-minutes`` runs it (fit, calibrate, evaluate the validation split), in
  ``--precision``: tile AUROC, strip AUROC, pixel AUROC, AUPRO, and the epochs it trained;
- per-strip latency at batch 1: ``Detector.predict`` of validation strips one at a time, p50;
- strips per second through ``POST /predict`` of a ``loomwatch serve`` process with
  ``--clients`` concurrent clients (dynamic batching on: BATCH_MAX_TILES 64, 2 ms);
- peak GPU memory of this process (training and scoring; the server's is its own).

With the defaults it takes about 8 minutes on one H200-class GPU (2 rows x (2 x 12 s + 3 min
+ the service)). ``--smoke`` runs the same steps on the CPU with tiny budgets and narrower
"wide" widths (32 / 16): a check that the script works, not a measurement. Figures only:
nothing is asserted. A device that is not there is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import EpochLog, FitContext
from models.device import DeviceError, Runtime, device_label
from models.pipeline import Detector
from models.preprocessing import valid_area
from models.registry import model_class
from models.tile_dataset import TileDataset
from training.config import TrainConfig, load_config
from training.data import Split, load_dataset, load_image, split_dataset
from training.train import train

ROWS = {"default 16/16": {}, "paper widths 128/64": {"recon_channels": 128, "disc_channels": 64}}
SMOKE_ROWS = {
    "default 16/16": {},
    "wide 32/16 (smoke)": {"recon_channels": 32, "disc_channels": 16},
}


@dataclass
class Row:
    name: str
    speed: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> figures
    validation: dict[str, float] = field(default_factory=dict)
    latency_ms: float = math.nan
    strips_per_s: float = math.nan
    http_p50_ms: float = math.nan
    http_failed: int = 0
    peak_mib: float = math.nan
    notes: list[str] = field(default_factory=list)


def row_config(changes: dict[str, Any]) -> TrainConfig:
    sets = [f"model.{key}={value}" for key, value in changes.items()]
    config, _ = load_config("draem", None, sets)
    return config


def training_tiles(split: Split, config: TrainConfig) -> TileDataset:
    images = [load_image(sample) for sample in split.train]
    valids = [valid_area(image, config.pipeline.valid_area) for image in images]
    pipeline = config.pipeline
    return TileDataset(
        images, valids, pipeline.tile_size, pipeline.stride, pipeline.train_min_valid_fraction
    )


def reset_peak(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)


def larger(a: float, b: float) -> float:
    """The larger of two figures, either of which may be NaN (not measured)."""
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def peak_mib(runtime: Runtime) -> float:
    if runtime.device.type != "cuda":
        return math.nan
    return torch.cuda.max_memory_allocated(runtime.device) / 2**20


def measure_speed(
    config: TrainConfig, tiles: TileDataset, runtime: Runtime, seconds: float, seed: int
) -> dict[str, float]:
    """Epochs per minute of a fresh model fitted for ``seconds`` (no validation), and the mean
    step split."""
    torch.manual_seed(seed)
    cls = model_class("draem")
    model = cls(cls.config_class.model_validate(config.model))
    logs: list[EpochLog] = []
    context = FitContext(
        deadline=time.monotonic() + seconds,
        budget_seconds=seconds,
        callback=logs.append,
        progress=False,
        seed=seed,
        batch_size=config.pipeline.batch_size,
        runtime=runtime,
        profile=True,
    )
    summary = model.fit(tiles, context)
    epochs = sum(log.metrics.get("epoch_fraction", 1.0) for log in logs)
    fitted = sum(log.seconds for log in logs)
    figures = {"epochs": epochs, "epochs_per_min": 60.0 * epochs / max(fitted, 1e-9)}
    for part in ("data", "forward", "backward"):
        figures[f"{part}_ms"] = float(summary.get(f"step_{part}_ms", math.nan))
    return figures


def strip_latency(bundle: Path, runtime: Runtime, strips: list[np.ndarray]) -> float:
    detector = Detector.from_bundle(bundle, device=str(runtime.device), precision=runtime.precision)
    detector.predict(strips[0])  # warm-up: kernels chosen, memory allocated
    times = []
    for strip in strips * 2:
        started = time.perf_counter()
        detector.predict(strip)
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


# ---- the HTTP service ---------------------------------------------------------------------------
def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def post(url: str, body: bytes, content_type: str, timeout: float = 120) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_load(
    bundle: Path, runtime: Runtime, pngs: list[bytes], clients: int, requests: int, workdir: Path
) -> tuple[float, float, int]:
    """Strips per second and p50 latency (ms) through POST /predict of a `loomwatch serve`
    process under ``clients`` concurrent clients; and the number of answers that were not 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_URI", "API_KEY", "PORT")}
    env.update(
        DEVICE=str(runtime.device), PRECISION=runtime.precision,
        INFERENCE_WORKERS=str(clients), MAX_QUEUE_DEPTH=str(4 * clients),
        BATCH_MAX_TILES="64", BATCH_MAX_WAIT_MS="2", INFERENCE_LOG_PATH="",
        DATABASE_URL=f"sqlite:///{workdir / 'feedback.db'}", REQUEST_TIMEOUT_S="120",
    )  # fmt: skip
    log = workdir / "server.log"
    argv = [sys.executable, "-m", "loomwatch", "--quiet", "serve", "--model-uri", str(bundle)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=workdir, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server was not ready within 180 s")
            time.sleep(0.3)
        bodies = [multipart(f"strip{i}.png", png) for i, png in enumerate(pngs)]
        for body, kind in bodies[:2]:  # warm-up
            post(f"{url}/predict?mask=none", body, kind)
        lock = threading.Lock()
        issued, latencies, failed = 0, [], 0

        def client(offset: int) -> None:
            nonlocal issued, failed
            while True:
                with lock:
                    if issued >= requests:
                        return
                    issued += 1
                    turn = issued
                body, kind = bodies[(turn + offset) % len(bodies)]
                started = time.perf_counter()
                status = post(f"{url}/predict?mask=none", body, kind)
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000.0)
                    failed += status != 200

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        wall = time.perf_counter() - started
        return (len(latencies) - failed) / wall, statistics.median(latencies), failed
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


# ---- the run ------------------------------------------------------------------------------------
def check_row(
    name: str, changes: dict[str, Any], args: argparse.Namespace, runtime_names: tuple[str, str]
) -> Row:
    device, precision = runtime_names
    row = Row(name)
    config = row_config(changes)
    dataset = load_dataset(args.data, fabric=args.fabric)
    split = split_dataset(dataset, config.data.val_fraction, args.seed)
    tiles = training_tiles(split, config)
    peak = math.nan
    for speed_precision in ("32", "bf16"):
        runtime = Runtime.resolve(device, speed_precision)
        reset_peak(runtime)
        row.speed[speed_precision] = measure_speed(
            config, tiles, runtime, args.speed_seconds, args.seed
        )
        peak = larger(peak, peak_mib(runtime))
        rate = row.speed[speed_precision]["epochs_per_min"]
        say(f"{name}: {speed_precision}: {rate:.1f} epochs/min")
    del tiles
    runtime = Runtime.resolve(device, precision)
    reset_peak(runtime)
    out = args.workdir / name.split()[0] / "bundle"
    result = train("draem", args.data, config, out=out, fabric=args.fabric,
                   max_minutes=args.budget_minutes, seed=args.seed, progress=False,
                   runtime=runtime)  # fmt: skip
    metrics = result.evaluation.metrics
    for key in ("image_auroc", "strip_auroc", "pixel_auroc", "aupro"):
        row.validation[key] = float(metrics.get(key, math.nan))
    row.validation["epochs"] = float(result.manifest.training["fit_summary"].get("epochs") or 0)
    say(f"{name}: {args.budget_minutes:g}-minute budget: {row.validation}")
    strips = [load_image(sample) for sample in split.validation][: args.strips]
    row.latency_ms = strip_latency(out, runtime, strips)
    peak = larger(peak, peak_mib(runtime))
    row.peak_mib = peak
    import cv2

    pngs = [cv2.imencode(".png", strip)[1].tobytes() for strip in strips]
    row.strips_per_s, row.http_p50_ms, row.http_failed = serve_load(
        out, runtime, pngs, args.clients, args.requests, out.parent
    )
    say(f"{name}: {row.latency_ms:.0f} ms a strip, {row.strips_per_s:.1f} strips/s over HTTP")
    return row


def say(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def step_split(row: Row, precision: str) -> str:
    speed = row.speed.get(precision, {})
    parts = ("data", "forward", "backward")
    return "/".join(fmt(speed.get(f"{part}_ms", math.nan), 0) for part in parts)


def table(rows: list[Row], args: argparse.Namespace) -> str:
    head = [
        "row", "ep/min fp32", "ep/min bf16", "step fp32 data/fwd/bwd ms",
        "step bf16 data/fwd/bwd ms",
        f"epochs in {args.budget_minutes:g} min", "tile AUROC", "strip AUROC", "pixel AUROC",
        "AUPRO", "strip ms (batch 1)", f"strips/s ({args.clients} clients)", "HTTP p50 ms",
        "peak GPU MiB",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    figures = ("image_auroc", "strip_auroc", "pixel_auroc", "aupro")
    for row in rows:
        cells = [
            row.name,
            fmt(row.speed.get("32", {}).get("epochs_per_min", math.nan)),
            fmt(row.speed.get("bf16", {}).get("epochs_per_min", math.nan)),
            step_split(row, "32"), step_split(row, "bf16"),
            fmt(row.validation.get("epochs", math.nan), 0),
            *(fmt(row.validation.get(key, math.nan), 3) for key in figures),
            fmt(row.latency_ms, 0), fmt(row.strips_per_s), fmt(row.http_p50_ms, 0),
            fmt(row.peak_mib, 0),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="data folder (the AITEX development subset)")
    parser.add_argument("--fabric", default="02")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu, mps, auto")
    parser.add_argument("--precision", default="bf16", help="of the budgeted training and serving")
    parser.add_argument("--budget-minutes", type=float, default=3.0)
    parser.add_argument("--speed-seconds", type=float, default=12.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--strips", type=int, default=8, help="validation strips scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="bundles and server logs (default: temporary)")
    parser.add_argument("--json", type=Path, dest="json_path")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny budgets on the CPU: a check that it runs"
    )
    args = parser.parse_args(argv)
    rows_asked = ROWS
    if args.smoke:
        args.device = "cpu" if args.device == "cuda" else args.device
        args.budget_minutes, args.speed_seconds = 0.5, 4.0
        args.clients, args.requests, args.strips = 4, 8, 2
        rows_asked = SMOKE_ROWS
    try:
        device = str(Runtime.resolve(args.device, args.precision).device)
    except DeviceError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"gpu_check: error: data folder {args.data} does not exist", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        args.workdir = args.workdir or Path(scratch)
        rows = [check_row(name, changes, args, (device, args.precision))
                for name, changes in rows_asked.items()]  # fmt: skip
    minutes = (time.monotonic() - started) / 60.0
    label = device_label(torch.device(device))
    smoke = " (SMOKE: tiny budgets, not a measurement)" if args.smoke else ""
    print(f"gpu_check {time.strftime('%Y-%m-%d')} on {label}; torch {torch.__version__}"
          f" (CUDA {torch.version.cuda}); data {args.data} fabric {args.fabric}; budgeted training"
          f" and serving in {args.precision}; {minutes:.1f} min{smoke}")  # fmt: skip
    print(table(rows, args))
    for row in rows:
        if row.http_failed:
            print(f"{row.name}: {row.http_failed} requests were not answered 200")
    if args.json_path:
        args.json_path.write_text(json.dumps([row.__dict__ for row in rows], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
