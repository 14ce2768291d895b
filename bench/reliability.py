"""The full reliability run: load, fuzzing, hostile uploads and faults, with one summary table.

    make reliability                 # = python -m bench.reliability
    python -m bench.reliability [--workdir DIR] [--bundle DIR] [--workers 2] [--queue 2]
        [--leak-requests 2000] [--level-requests 150] [--max-seconds 1800]
        [--fuzz-examples 100] [--no-tests]

1. Model: a bundle (``--bundle``), or a tiny VAE trained in about half a minute on synthetic
   fabric (``loomwatch synth`` + ``loomwatch train``). It is a stand-in chosen for speed, so
   that thousands of requests fit in minutes: a PatchCore strip costs about 2 s on a laptop CPU.
2. Load: ``loomwatch serve`` as a separate process on loopback, driven from this process with
   1, 4 and 4 x INFERENCE_WORKERS clients posting real AITEX-sized strips (4096 x 256: the
   real AITEX images when the folder ``bench.aitex_dir()`` names exists, else synthetic ones). The
   4-client level runs ``--leak-requests`` requests and is the leak check (server VmRSS before
   and after). Targets: no answer but 200 and 503, every 503 with Retry-After, memory growth
   under 10 %, p99 at 4 x workers within REQUEST_TIMEOUT_S.
3. Hostile corpus (``bench/hostile.py``) against the same live server, /predict and
   /predict/batch; then the server must still be ready and score a strip, and stop with exit
   status 0 on SIGTERM.
4. Fuzzing (``bench/fuzz.py``): ``--fuzz-examples`` cases per operation, in-process.
5. Faults and security: the pytest files that test them, with the slow ones enabled.

Exits 1 when a target is missed. Timings move with the load on the machine: compare within a run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import torch
from pydantic import SecretStr

from app.main import create_app
from app.settings import Settings
from bench import aitex_dir
from bench.fuzz import FuzzReport, fuzz
from bench.hostile import ROUTES, Hostile, build_corpus, post, problem
from bench.live_server import LiveServer, live_server, loomwatch_command
from bench.serve_load import LevelResult, run_level
from models.bundle import read_manifest
from models.preprocessing import decode_image

ROOT = Path(__file__).resolve().parents[1]

TINY_VAE = [
    "model.base_channels=4", "model.max_channels=8", "model.depth=2",
    "model.latent_channels=4", "model.max_epochs=1", "model.ssim_weight=0",
    "model.smoothing_sigma=0",
]  # fmt: skip
FAULT_TESTS = [
    "tests/app/test_faults.py",
    "tests/app/test_security.py",
    "tests/reliability",
]
FUZZ_KEY = "reliability-fuzz-key"
MEMORY_GROWTH_LIMIT = 0.10
LOAD_COLUMNS = ["level", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "by status",
                "503 w/o Retry-After", "other errors", "RSS before -> after (MiB)"]  # fmt: skip


@dataclass
class Outcome:
    """Every figure of the run, and the targets met or missed."""

    model: str = ""
    images: str = ""
    server: dict[str, str] = field(default_factory=dict)
    levels: list[tuple[str, LevelResult, int, int]] = field(default_factory=list)  # RSS KiB
    rss_ready_kib: int = 0
    leak: tuple[int, int, int] | None = None  # requests, RSS before, after
    corpus: list[tuple[Hostile, str, int, str | None]] = field(default_factory=list)
    healthy_after_corpus: bool = False
    sigterm_exit: int | None = None
    fuzz: FuzzReport | None = None
    tests: list[tuple[str, str, float]] = field(default_factory=list)
    targets: list[tuple[str, bool, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run(command: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        list(command), cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def tracked_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{(workdir / 'mlflow.db').as_posix()}",
        MLFLOW_DISABLE_TELEMETRY="true",
        OMP_NUM_THREADS="1",
    )
    return env


def prepare_model(workdir: Path, bundle: Path | None) -> tuple[Path, str]:
    if bundle is not None:
        manifest = read_manifest(bundle)
        return bundle, f"{manifest.model_type} bundle {bundle}"
    started = time.monotonic()
    loomwatch = loomwatch_command()
    data, out = workdir / "synth", workdir / "tiny-vae"
    synth = ["synth", "--out", str(data), "--fabrics", "1", "--normal", "6", "--defective", "3"]
    run([*loomwatch, "--quiet", *synth, "--width", "4096", "--height", "256"], workdir)
    overrides = [arg for value in TINY_VAE for arg in ("--set", value)]
    train = ["train", "--model", "vae", "--data", str(data), *overrides, "--out", str(out)]
    run([*loomwatch, "--quiet", *train], workdir, tracked_env(workdir))
    seconds = time.monotonic() - started
    return out, (
        f"tiny VAE (4-8 channels, 1 epoch), trained in {seconds:.0f} s on synthetic fabric: "
        "a stand-in for speed, not for accuracy"
    )


def strips(workdir: Path, count: int = 8) -> tuple[list[tuple[str, bytes]], str]:
    """Real AITEX strips (defect-free and defective) when the data is here, else synthetic."""
    real_data = aitex_dir()
    if real_data.is_dir():
        clean = sorted(real_data.glob("NoDefect_images/*/*.png"))[: count // 2]
        defective = sorted(real_data.glob("Defect_images/*.png"))[: count // 2]
        paths, source = clean + defective, f"real AITEX strips from {real_data}"
    else:
        paths = sorted((workdir / "synth").rglob("*.png"))
        paths = [p for p in paths if "mask" not in p.parts[-2].lower()][:count]
        source = "synthetic strips (no AITEX data here)"
    images = [(path.name, path.read_bytes()) for path in paths]
    shapes = {decode_image(data).shape for _, data in images}
    sizes = ", ".join(f"{w}x{h}" for h, w in sorted(shapes))
    return images, f"{len(images)} {source} ({sizes})"


def load_and_corpus(
    bundle: Path, workdir: Path, images: list[tuple[str, bytes]], args: argparse.Namespace
) -> Outcome:
    outcome = Outcome()
    timeout_s = 10
    env = {
        "INFERENCE_WORKERS": str(args.workers),
        "INFERENCE_THREADS": "1",
        "MAX_QUEUE_DEPTH": str(args.queue),
        "REQUEST_TIMEOUT_S": str(timeout_s),
    }
    outcome.server = env
    levels = sorted({1, 4, 4 * args.workers})
    with live_server(bundle, workdir, env) as server:
        outcome.rss_ready_kib = server.rss_kib()
        # at the leak level's concurrency, so that its threads and allocator arenas exist
        # before its "before" is measured
        run_level(server.url, images, 4, 4 * len(images), args.max_seconds)
        for clients in levels:
            leak = clients == 4
            count = args.leak_requests if leak else args.level_requests
            before = server.rss_kib()
            started = time.monotonic()
            result = run_level(server.url, images, clients, count, args.max_seconds)
            after = server.rss_kib()
            name = f"{clients} client{'s' if clients > 1 else ''}"
            if clients == 4 * args.workers:
                name += " (4 x workers)"
            outcome.levels.append((name, result, before, after))
            if leak:
                outcome.leak = (result.requests, before, after)
            print(f"  {name}: {result.line()} ({time.monotonic() - started:.0f} s)", flush=True)
        corpus_against(server, bundle, outcome, images)
        outcome.sigterm_exit = server.stop(signal.SIGTERM)
    overload = outcome.levels[-1][1]
    others = sum(sum(r.transport_errors.values()) for _, r, _, _ in outcome.levels)
    for _, r, _, _ in outcome.levels:
        others += sum(n for code, n in r.statuses.items() if code not in (200, 503))
    missing = sum(r.retry_after_missing for _, r, _, _ in outcome.levels)
    outcome.targets += [
        ("load: no answer but 200 or 503", others == 0, f"{others} other answers or errors"),
        ("load: every 503 carries Retry-After", missing == 0, f"{missing} without"),
        (
            f"load: p99 at {levels[-1]} clients within REQUEST_TIMEOUT_S",
            overload.percentile(99) <= timeout_s * 1000,
            f"p99 {overload.percentile(99):.0f} ms vs {timeout_s * 1000} ms",
        ),
    ]
    if outcome.leak is not None:
        requests, before, after = outcome.leak
        growth = (after - before) / before
        outcome.targets.append(
            (
                f"memory: growth under {MEMORY_GROWTH_LIMIT:.0%} over {requests} requests",
                growth < MEMORY_GROWTH_LIMIT and requests >= args.leak_requests,
                f"{before / 1024:.0f} -> {after / 1024:.0f} MiB ({growth:+.1%})",
            )
        )
    return outcome


def corpus_for(bundle: Path, images: list[tuple[str, bytes]]) -> list[Hostile]:
    """The hostile corpus for a service with the default limits, from the first strip."""
    settings = Settings(_env_file=None, model_uri=str(bundle))  # type: ignore[call-arg]
    return build_corpus(
        decode_image(images[0][1]),
        max_pixels=settings.max_pixels,
        max_upload_bytes=settings.max_upload_bytes,
        tile_size=read_manifest(bundle).pipeline.tile_size,
    )


def corpus_against(
    server: LiveServer, bundle: Path, outcome: Outcome, images: list[tuple[str, bytes]]
) -> None:
    corpus = corpus_for(bundle, images)
    with httpx2.Client(base_url=server.url, timeout=120) as client:
        for item in corpus:
            for route in ROUTES:
                try:
                    response = post(client, item, route)
                    wrong = problem(item, route, response, hidden=(str(bundle.resolve()),))
                    status = response.status_code
                    if route.endswith("/batch") and status == 200:
                        status = response.json()["items"][0]["status"]
                except httpx2.TransportError as exc:
                    wrong, status = f"{type(exc).__name__}: {exc}", 0
                outcome.corpus.append((item, route, status, wrong))
        ready = client.get("/ready").status_code == 200
        name, data = images[0]
        scored = client.post("/predict", files={"file": (name, data)}).status_code == 200
    outcome.healthy_after_corpus = ready and scored
    wrong_answers = [entry for entry in outcome.corpus if entry[3] is not None]
    outcome.targets += [
        (
            "hostile corpus: documented answer to every file on both routes",
            not wrong_answers,
            f"{len(outcome.corpus) - len(wrong_answers)}/{len(outcome.corpus)}",
        ),
        ("hostile corpus: ready and scoring afterwards", outcome.healthy_after_corpus, ""),
    ]


def fuzz_run(bundle: Path, workdir: Path, images: list[tuple[str, bytes]], examples: int) -> Any:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        model_uri=str(bundle),
        api_key=SecretStr(FUZZ_KEY),
        cors_origins=[],
        inference_log_path=workdir / "fuzz-inference.jsonl",
        database_url=f"sqlite:///{workdir / 'fuzz-feedback.db'}",
        inference_threads=1,
    )
    corpus = corpus_for(bundle, images)
    uploads = [data for _, data in images] + [item.data for item in corpus if not item.streamed]
    return fuzz(create_app(settings), examples, uploads, headers={"X-API-Key": FUZZ_KEY})


def fault_tests(workdir: Path) -> list[tuple[str, str, float]]:
    report = workdir / "faults.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAULT_TESTS,
               f"--junitxml={report}"]  # fmt: skip
    subprocess.run(command, cwd=ROOT, capture_output=True, check=False)
    results = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        module = case.get("classname", "").rsplit(".", 1)[-1]
        results.append((f"{module}::{case.get('name')}", outcome, float(case.get("time", 0))))
    return results


# ---- the summary --------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line.rstrip() for line in lines)


def summary(outcome: Outcome) -> str:
    mib = 1024
    parts = [
        "RELIABILITY SUMMARY",
        f"model:  {outcome.model}",
        f"images: {outcome.images}",
        "server: " + " ".join(f"{k}={v}" for k, v in outcome.server.items()),
        f"timings are wall clock on a shared machine; compare within a run. "
        f"Server RSS when ready: {outcome.rss_ready_kib / mib:.0f} MiB",
        "",
        "Load (POST /predict, mask=none; clients honour Retry-After)",
        table(
            LOAD_COLUMNS,
            [
                [
                    name,
                    r.requests,
                    f"{r.per_second:.2f}",
                    f"{r.percentile(50):.0f}",
                    f"{r.percentile(95):.0f}",
                    f"{r.percentile(99):.0f}",
                    f"{max(r.latencies_ms, default=0):.0f}",
                    " ".join(f"{code}:{n}" for code, n in sorted(r.statuses.items())),
                    r.retry_after_missing,
                    sum(r.transport_errors.values()),
                    f"{before / mib:.0f} -> {after / mib:.0f}",
                ]
                for name, r, before, after in outcome.levels
            ],
        ),
    ]
    if outcome.fuzz is not None:
        f = outcome.fuzz
        parts += ["", f"Fuzzing (schemathesis, in-process): {f.line()}"]
        parts += [f"  failure: {line}" for line in f.failures]
    if outcome.corpus:
        by_item: dict[str, list[str]] = {}
        for item, _route, status, wrong in outcome.corpus:
            mark = "ok" if wrong is None else f"WRONG ({wrong})"
            by_item.setdefault(item.name, [str(item.status), item.code]).append(f"{status} {mark}")
        parts += [
            "",
            "Hostile corpus (live server; /predict/batch: the item's status)",
            table(
                ["file", "expected", "code", "/predict", "/predict/batch"],
                [[name, *cells] for name, cells in by_item.items()],
            ),
            f"  afterwards: ready and scoring = {outcome.healthy_after_corpus}; "
            f"exit status after SIGTERM = {outcome.sigterm_exit}",
        ]
    if outcome.tests:
        parts += [
            "",
            "Faults and security (pytest, slow ones included)",
            table(["test", "result", "s"], [[n, o, f"{s:.1f}"] for n, o, s in outcome.tests]),
        ]
    parts += [
        "",
        "Targets",
        table(
            ["target", "met", "figure"],
            [[name, "yes" if met else "NO", figure] for name, met, figure in outcome.targets],
        ),
        "",
        "stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in outcome.seconds.items()),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--bundle", type=Path, help="serve this bundle instead of a tiny VAE")
    parser.add_argument("--workers", type=int, default=2, help="INFERENCE_WORKERS")
    parser.add_argument("--queue", type=int, default=2, help="MAX_QUEUE_DEPTH")
    parser.add_argument("--leak-requests", type=int, default=2000, help="at 4 clients")
    parser.add_argument("--level-requests", type=int, default=150, help="at the other levels")
    parser.add_argument("--max-seconds", type=float, default=1800, help="per load level")
    parser.add_argument("--fuzz-examples", type=int, default=100, help="per operation")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest fault tests")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loomwatch-reliability-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        stage = time.monotonic()
        print("model ...", flush=True)
        bundle, model = prepare_model(workdir, args.bundle)
        images, described = strips(workdir)
        seconds = {"model": time.monotonic() - stage}
        print(f"{model}\n{described}\nload and hostile corpus ...", flush=True)
        stage = time.monotonic()
        outcome = load_and_corpus(bundle, workdir, images, args)
        outcome.model, outcome.images = model, described
        outcome.seconds = seconds
        outcome.seconds["load+corpus"] = time.monotonic() - stage
        outcome.targets.append(
            ("SIGTERM after the load: exit status 0", outcome.sigterm_exit == 0, "")
        )
        print("fuzzing ...", flush=True)
        stage = time.monotonic()
        outcome.fuzz = fuzz_run(bundle, workdir, images, args.fuzz_examples)
        outcome.seconds["fuzz"] = time.monotonic() - stage
        enough = outcome.fuzz.cases >= 500 or args.fuzz_examples < 100
        outcome.targets.append(
            (
                "fuzz: no failure (no 5xx, answers match the schema)",
                not outcome.fuzz.failures and enough,
                f"{outcome.fuzz.cases} cases, {len(outcome.fuzz.failures)} failures",
            )
        )
        if not args.no_tests:
            print("fault and security tests ...", flush=True)
            stage = time.monotonic()
            outcome.tests = fault_tests(workdir)
            outcome.seconds["tests"] = time.monotonic() - stage
            bad = [name for name, result, _ in outcome.tests if result != "passed"]
            outcome.targets.append(
                ("faults and security tests pass", not bad and bool(outcome.tests), " ".join(bad))
            )
        outcome.seconds["total"] = time.monotonic() - started
    print()
    print(summary(outcome))
    return 0 if all(met for _, met, _ in outcome.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
