"""Latency, throughput and memory of a model on every runtime, side by side in one run.

    python -m bench.latency --bundle BUNDLE [--export onnx,openvino,onnx-int8,openvino-int8]
        [--calibration-data DIR] [--exported FOLDER ...] [--backend torch,onnxruntime,openvino]
        [--image STRIP] [--threads N] [--repeats N] [--batch-size N] [--export-dir DIR]
        [--json FILE]

Each runtime (torch on the bundle; ONNX Runtime and OpenVINO on exports of it) is measured in a
fresh subprocess, so its memory is its own, and each subprocess serves the model the way the
service does: ``app.main.create_app`` with the settings of that folder and backend, started
(lifespan: load and warm-up) under FastAPI's TestClient. The subprocesses are loaded one after
the other and then measured in rounds, one measurement of each in turn, so that a change of
load on a shared machine touches them all alike. In each:

- per tile: the network alone on one batch of the strip's tiles (``--batch-size``, default the
  pipeline's), divided by the batch size;
- per strip: ``Detector.predict`` on the encoded strip (decode to post-processing), p50 / p95,
  and the median time of each pipeline stage;
- per strip end to end: ``POST /predict`` through the app (upload, decode, pipeline, mask PNG,
  JSON) until the JSON is parsed, p50 / p95;
- memory: resident set after loading and the peak (VmHWM) of the whole subprocess.

Achieved GFLOP/s: the FLOPs of one tile (PyTorch's FlopCounterMode on the model's ``predict``:
convolutions and matrix products) times the tiles of a strip over the strip's model stage;
int8 networks are credited with the same work. The machine's fp32 matrix peak is measured in
the same run, every round (2048 x 2048 products by torch/MKL and numpy/OpenBLAS on the same
thread count; the best), so GFLOP/s reads as a share of what these cores can do. Figures only:
nothing is asserted. On a machine shared with other jobs compare ratios within one run.

Exports (``--export``) are made from the bundle into ``--export-dir`` (default: a temporary
folder) and reused there when they come from the same bundle; int8 ones need
``--calibration-data`` (defect-free images of the fabric, as ``loomwatch export --int8``).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXPORTS = {
    "onnx": ("onnx", False),
    "openvino": ("openvino", False),
    "onnx-int8": ("onnx", True),
    "openvino-int8": ("openvino", True),
}
BACKENDS = ("torch", "onnxruntime", "openvino")
STAGES = ("decode", "preprocess", "tile", "model", "stitch", "calibrate", "postprocess")


@dataclass(frozen=True)
class Variant:
    """One thing to measure: a model folder on one backend."""

    label: str  # e.g. "onnx-int8 on openvino"
    folder: Path
    backend: str
    precision: str


# ---- small measurement helpers ---------------------------------------------------------------


def proc_status(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def time_calls(call: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return timings


def p50(values: list[float]) -> float:
    return float(statistics.median(values))


def p95(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 95))


def synthetic_strip(width: int = 4096, height: int = 256, seed: int = 0) -> np.ndarray:
    from training.synth import make_fabric, sample_fabric_params

    rng = np.random.default_rng(seed)
    return make_fabric(rng, sample_fabric_params(rng), height, width)


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 GFLOP/s of a size x size matrix product on ``threads`` threads, best of ``repeats``,
    by torch (MKL) and by numpy (OpenBLAS): on AMD cores the two differ by 20 %."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    x, y = a.numpy(), b.numpy()
    try:
        torch.mm(a, b)  # warm-up
        by_torch = min(time_calls(lambda: torch.mm(a, b), repeats))
    finally:
        torch.set_num_threads(before)
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(threads))
        np.matmul(x, y)
        by_numpy = min(time_calls(lambda: np.matmul(x, y), repeats))
    flop = 2.0 * size**3 / 1e9
    return {"torch": flop / by_torch, "numpy": flop / by_numpy}


def tile_flops(bundle: Path) -> float:
    """FLOPs of the model's predict on one tile (torch's FlopCounterMode: convolutions and
    matrix products; the element-wise rest is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.bundle import load_bundle

    model, manifest = load_bundle(bundle)
    tile = manifest.pipeline.tile_size
    tiles = torch.rand(1, 1, tile, tile)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval().predict(tiles, torch.ones_like(tiles, dtype=torch.bool))
    return float(counter.get_total_flops())


def machine() -> dict[str, Any]:
    flags: set[str] = set()
    name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {
        "cpu": name,
        "cpus": len(os.sched_getaffinity(0)),
        "isa": [flag for flag in wanted if flag in flags],
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("torch", "onnxruntime", "openvino", "nncf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


# ---- the subprocess: one model folder on one backend -----------------------------------------


def serve_measurements(folder: Path, backend: str, image: Path, threads: int, batch: int) -> None:
    """Load one variant as the service does, then measure on request.

    Protocol (one line each way): the worker answers ``{"ready": ...}`` once loaded and warm,
    then reads commands from stdin: ``tile``, ``strip`` or ``http`` (one measurement each,
    answered with its seconds and stages) and ``quit`` (answered with the memory figures). The
    parent interleaves the variants round by round, so a change of load on a shared machine
    touches all of them alike."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks when we hang
    answer_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    rss_start = proc_status("VmRSS")
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from models.preprocessing import decode_image, valid_area
    from models.tiling import pad_to_tile, plan_tiles

    def answer(message: dict[str, Any]) -> None:
        answer_to.write(json.dumps(message) + "\n")

    settings = Settings(  # INFERENCE_THREADS reaches the runtime (torch's threads too)
        _env_file=None,  # type: ignore[call-arg]
        model_uri=str(folder),
        backend=backend,  # type: ignore[arg-type]
        inference_threads=threads,
        inference_workers=1,
        inference_log_path=None,
        api_key=None,
        cors_origins=[],
        max_pixels=64 * 1024 * 1024,
    )
    data = image.read_bytes()
    rss_imported = proc_status("VmRSS")
    started = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        load_s = time.perf_counter() - started
        rss_loaded = proc_status("VmRSS")
        detector = client.app.state.scorer.model.detector  # type: ignore[attr-defined]

        # per tile: the network alone on the strip's first tiles
        pipeline = detector.pipeline
        strip = decode_image(data)
        size = pipeline.tile_size
        padded, padded_valid = pad_to_tile(strip, valid_area(strip, pipeline.valid_area), size)
        height, width = padded.shape
        boxes = plan_tiles(height, width, size, pipeline.stride, padded_valid)[:batch]
        tiles = np.stack([padded[b.y0 : b.y1, b.x0 : b.x1] for b in boxes])[:, None]
        tiles = tiles.astype(np.float32) / 255.0
        valid = np.stack([padded_valid[b.y0 : b.y1, b.x0 : b.x1] for b in boxes])[:, None]

        def tile() -> dict[str, Any]:
            started = time.perf_counter()
            detector.network.run(tiles, valid)
            return {"s": (time.perf_counter() - started) / len(boxes)}

        def strip_once() -> dict[str, Any]:
            started = time.perf_counter()
            prediction = detector.predict(data)
            return {"s": time.perf_counter() - started, "stages": prediction.timings}

        def http() -> dict[str, Any]:
            started = time.perf_counter()
            files = {"file": (image.name, data, "image/png")}
            response = client.post("/predict", files=files)
            response.raise_for_status()
            result = response.json()
            stages = {k: v / 1000.0 for k, v in result["timings_ms"].items()}
            return {"s": time.perf_counter() - started, "stages": stages,
                    "decision": result["decision"], "score": result["score"]}  # fmt: skip

        tile(), strip_once(), http()  # warm-up
        prediction = detector.predict(data)
        answer({
            "ready": True, "backend": detector.backend, "load_s": load_s,
            "tiles_per_strip": len(prediction.analysis.boxes), "batch_size": len(boxes),
            "strip_size": [int(strip.shape[1]), int(strip.shape[0])],
        })  # fmt: skip
        commands = {"tile": tile, "strip": strip_once, "http": http}
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            answer(commands[command]())
    answer({"rss_mib": {"start": rss_start, "imported": rss_imported, "loaded": rss_loaded,
                        "peak": proc_status("VmHWM")}})  # fmt: skip


class Worker:
    """A variant served in a fresh interpreter (its own memory, its own thread pools)."""

    def __init__(self, variant: Variant, args: argparse.Namespace, image: Path, log: Path):
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
        root = Path(__file__).resolve().parents[1]
        command = [
            sys.executable, "-m", "bench.latency", "--worker", str(variant.folder),
            "--worker-backend", variant.backend, "--image", str(image),
            "--threads", str(args.threads), "--batch-size", str(args.batch_size),
        ]  # fmt: skip
        self.variant = variant
        self.log = log
        self.timeout = args.timeout
        self.stderr = log.open("w")
        self.process = subprocess.Popen(
            command, cwd=root, env=env, text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        )  # fmt: skip
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.samples: dict[str, list[dict[str, Any]]] = {"tile": [], "strip": [], "http": []}
        self.info = self._read() or {}

    def _read(self) -> dict[str, Any] | None:
        """The worker's next answer; None (and ``error`` set) when it died or hung."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        if not ready:  # hung: its threads' stacks go to its log, then it is stopped
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(2)
            self.process.kill()
            self.process.wait()
            self.error = f"no answer in {self.timeout:.0f} s (stacks in {self.log})"
            return None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            lines = self.log.read_text().strip().splitlines() or ["no output"]
            self.error = f"exit {self.process.returncode}: {lines[-1][:200]}"
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    def ask(self, command: str) -> None:
        if self.error is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        sample = self._read()
        if sample is not None:
            self.samples[command].append(sample)

    def finish(self) -> dict[str, Any]:
        if self.error is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.info.update(self._read() or {})
            self.process.wait()
        self.stderr.close()
        if self.error is not None:
            return {"error": self.error}
        return {**self.info, **self.samples}


# ---- the parent: exports, peak, FLOPs, the table ---------------------------------------------


def make_exports(args: argparse.Namespace, directory: Path) -> list[Path]:
    """The folders of ``--export``, made from the bundle (or reused when already made from it)."""
    from models.export import export_bundle
    from models.manifest import folder_digest, read_manifest

    wanted = [name for name in args.export.split(",") if name]
    unknown = [name for name in wanted if name not in EXPORTS]
    if unknown:
        raise SystemExit(f"unknown --export {', '.join(unknown)}: choose from {', '.join(EXPORTS)}")
    digest = folder_digest(args.bundle)
    calibration = None
    folders = []
    for name in wanted:
        fmt, int8 = EXPORTS[name]
        out = directory / name
        if (out / "manifest.json").is_file():
            export = read_manifest(out).export
            if export is not None and export.source_digest == digest:
                print(f"reusing {out}", file=sys.stderr)
                folders.append(out)
                continue
        if int8 and calibration is None:
            if args.calibration_data is None:
                raise SystemExit(f"--export {name} needs --calibration-data DIR")
            from training.export import calibration_tiles

            drawn = calibration_tiles(
                args.calibration_data, read_manifest(args.bundle), progress=False
            )
            calibration = (drawn.tiles, drawn.valid)
        started = time.perf_counter()
        export_bundle(
            args.bundle, out, fmt, source_uri=str(args.bundle), int8=int8,
            calibration=calibration if int8 else None, say=lambda text: None,
        )  # fmt: skip
        print(f"exported {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        folders.append(out)
    return folders


def variants(args: argparse.Namespace, exports: list[Path]) -> list[Variant]:
    from models.manifest import read_manifest
    from models.network import RUNTIMES

    wanted = [name for name in args.backend.split(",") if name]
    unknown = [name for name in wanted if name not in BACKENDS]
    if unknown:
        known = ", ".join(BACKENDS)
        raise SystemExit(f"unknown --backend {', '.join(unknown)}: choose from {known}")
    found = []
    if "torch" in wanted:
        found.append(Variant("torch", args.bundle, "torch", "fp32"))
    for folder in exports:
        export = read_manifest(folder).export
        if export is None:
            raise SystemExit(f"{folder} is not an exported model folder")
        name = export.format + ("-int8" if export.precision == "int8" else "")
        for backend in RUNTIMES[export.format]:
            if backend in wanted:
                found.append(Variant(f"{name} on {backend}", folder, backend, export.precision))
    return found


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def summarise(result: dict[str, Any], tile_flops: float, peak: float) -> dict[str, Any]:
    """The table's figures of one variant's samples (seconds; GFLOP/s)."""
    tile = [sample["s"] for sample in result["tile"]]
    strip = [sample["s"] for sample in result["strip"]]
    http = [sample["s"] for sample in result["http"]]
    stages = {
        stage: p50([sample["stages"].get(stage, 0.0) for sample in result["strip"]])
        for stage in STAGES
    }
    stages["encode"] = p50([sample["stages"].get("encode", 0.0) for sample in result["http"]])
    outside = [sample["s"] - sample["stages"].get("model", 0.0) for sample in result["http"]]
    model = [sample["stages"]["model"] for sample in result["strip"]]
    gflops = tile_flops * result["tiles_per_strip"] / p50(model) / 1e9
    return {
        "tile_p50": p50(tile),
        "strip_p50": p50(strip),
        "strip_p95": p95(strip),
        "http_p50": p50(http),
        "http_p95": p95(http),
        "model_p50": p50(model),
        "gflops": gflops,
        "share_of_peak": gflops / peak,
        "tile_gflops": tile_flops / p50(tile) / 1e9,
        "stages": stages,
        "outside_model_p50": p50(outside),
    }


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in pairs]
        lines.append("  ".join(cells))
    return lines


def table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [
        ("runtime", "tile ms", "GFLOP/s", "% peak", "strip p50", "p95", "/predict p50", "p95",
         "x torch", "RSS load", "RSS peak"),
    ]  # fmt: skip
    done = [r for r in report["results"] if "summary" in r]
    torch_http = next((r["summary"]["http_p50"] for r in done if r["label"] == "torch"), None)
    for result in report["results"]:
        if "summary" not in result:
            rows.append((result["label"], result.get("error", "?"), *[""] * 9))
            continue
        figures = result["summary"]
        speedup = f"{torch_http / figures['http_p50']:.1f}" if torch_http else "-"
        rows.append((
            result["label"], f"{figures['tile_p50'] * 1000:.1f}", f"{figures['gflops']:.0f}",
            f"{100 * figures['share_of_peak']:.0f}", ms(figures["strip_p50"]),
            ms(figures["strip_p95"]), ms(figures["http_p50"]), ms(figures["http_p95"]), speedup,
            f"{result['rss_mib']['loaded']:.0f}", f"{result['rss_mib']['peak']:.0f}",
        ))  # fmt: skip
    stage_rows: list[tuple[str, ...]] = [("runtime", *STAGES, "encode", "/predict - model")]
    for result in done:
        figures = result["summary"]
        stage_rows.append((
            result["label"], *(ms(figures["stages"][stage]) for stage in [*STAGES, "encode"]),
            ms(figures["outside_model_p50"]),
        ))  # fmt: skip
    return "\n".join([
        *_aligned(rows), "", "median ms of each stage of a strip (Detector.predict; encode: the "
        "mask PNG of /predict; /predict - model: all of an HTTP request but the network)",
        *_aligned(stage_rows),
    ])  # fmt: skip


def header(report: dict[str, Any]) -> str:
    info = report["machine"]
    peaks = report["peaks"]
    first: dict[str, Any] = next((r for r in report["results"] if "summary" in r), {})
    size = "x".join(str(v) for v in first.get("strip_size", [])) or "?"
    return "\n".join([
        f"bundle   {report['bundle']} ({report['model_type']}); strip {report['image']} ({size}, "
        f"{first.get('tiles_per_strip', '?')} tiles, batch {first.get('batch_size', '?')})",
        f"machine  {info['cpu']}, {info['cpus']} CPUs ({' '.join(info['isa'])}); "
        f"{report['threads']} threads; load average {report['load_before']:.1f} -> "
        f"{report['load_after']:.1f}",
        f"peak     fp32 matmul {report['peak_gflops']:.0f} GFLOP/s (best of {len(peaks)} rounds;"
        f" torch {max(p['torch'] for p in peaks):.0f}, numpy {max(p['numpy'] for p in peaks):.0f}"
        f", median {p50([max(p.values()) for p in peaks]):.0f}); {report['tile_gflop']:.2f} "
        f"GFLOP per tile (FlopCounterMode); {report['repeats']} rounds",
        "versions " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "ms; strip: Detector.predict of the encoded strip; /predict: HTTP end to end to parsed "
        "JSON; x torch: torch's /predict p50 over this one's; GFLOP/s: in the strip's model "
        "stage; RSS MiB",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--bundle", type=Path, help="the PyTorch bundle (torch backend, exports)")
    parser.add_argument(
        "--export", default="onnx,openvino",
        help=f"exports of the bundle to measure, comma-separated: {', '.join(EXPORTS)} "
        "(default onnx,openvino; '' for none)",
    )  # fmt: skip
    parser.add_argument("--exported", type=Path, nargs="*", default=[],
                        help="exported folders made elsewhere to measure too")  # fmt: skip
    parser.add_argument("--calibration-data", type=Path, help="defect-free images for int8")
    parser.add_argument("--export-dir", type=Path, help="where exports are made and reused")
    parser.add_argument(
        "--backend", default=",".join(BACKENDS),
        help="runtimes to measure, comma-separated (default all that can run each folder)",
    )  # fmt: skip
    parser.add_argument("--image", type=Path, help="a strip to score (default: synthetic 4096x256)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=10, help="rounds of measurements")
    parser.add_argument("--batch-size", type=int, default=0, help="per-tile batch (0: pipeline's)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds a runtime may take to answer"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-backend", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        batch = args.batch_size
        if batch <= 0:
            from models.manifest import read_manifest

            batch = read_manifest(args.worker).pipeline.batch_size
        serve_measurements(args.worker, args.worker_backend, args.image, args.threads, batch)
        return
    if args.bundle is None:
        parser.error("--bundle is required")

    from models.manifest import read_manifest

    manifest = read_manifest(args.bundle)
    with tempfile.TemporaryDirectory(prefix="loomwatch-bench-") as scratch:
        image = args.image
        if image is None:
            import cv2

            image = Path(scratch) / "synthetic-strip.png"
            cv2.imwrite(str(image), synthetic_strip())
        export_dir = args.export_dir or Path(scratch) / "exports"
        exports = make_exports(args, export_dir) + list(args.exported)
        chosen = variants(args, exports)
        flops = tile_flops(args.bundle)
        load_before = os.getloadavg()[0]
        workers = []
        for number, variant in enumerate(chosen):
            print(f"loading {variant.label} ...", file=sys.stderr)
            workers.append(Worker(variant, args, image, Path(scratch) / f"worker-{number}.log"))
        peaks = []
        for round_ in range(args.repeats):
            print(f"round {round_ + 1} of {args.repeats}", file=sys.stderr)
            peaks.append(matmul_peak(args.threads))
            for command in ("tile", "strip", "http"):
                for worker in workers:
                    worker.ask(command)
        results = []
        for worker in workers:
            outcome = worker.finish()
            results.append({"label": worker.variant.label, "precision": worker.variant.precision,
                            **outcome})  # fmt: skip
        load_after = os.getloadavg()[0]
    peak = max(max(sample.values()) for sample in peaks)
    for result in results:
        if "error" not in result:
            result["summary"] = summarise(result, flops, peak)
    report = {
        "bundle": str(args.bundle),
        "model_type": manifest.model_type,
        "image": str(args.image or "synthetic"),
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine(),
        "versions": versions(),
        "load_before": load_before,
        "load_after": load_after,
        "peaks": peaks,
        "peak_gflops": peak,
        "tile_gflop": flops / 1e9,
        "results": results,
    }
    print(header(report))
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
