"""Latency of a running service under N concurrent clients (prints figures; asserts nothing).

    loomwatch serve --model-uri BUNDLE &
    python bench/serve_load.py --image STRIP.png [--image OTHER.png ...] [--url http://127.0.0.1:8000]
                               [--clients 1 4] [--requests 20] [--max-seconds 600]

Each client posts the images in turn to /predict (mask=none: the figure is the service, not the
PNG transfer), one request after another; `--requests` is the total per concurrency level, and
a level stops early once `--max-seconds` have passed. A 503 is back-pressure: the client waits
for its Retry-After (at most 5 s) before its next request, as a well-behaved client does.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

MAX_RETRY_WAIT_S = 5.0


@dataclass
class LevelResult:
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after_missing: int = 0  # 503s without a Retry-After header
    transport_errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_second(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile of latency (nearest rank), in ms."""
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]

    def line(self) -> str:
        statuses = " ".join(f"{code}:{n}" for code, n in sorted(self.statuses.items()))
        errors = " ".join(f"{kind}:{n}" for kind, n in sorted(self.transport_errors.items()))
        return (
            f"clients={self.clients} requests={self.requests} {self.per_second:.2f} req/s "
            f"p50={self.percentile(50):.0f} p95={self.percentile(95):.0f} "
            f"p99={self.percentile(99):.0f} max={max(self.latencies_ms, default=0):.0f} ms "
            f"statuses {statuses}{' transport errors ' + errors if errors else ''}"
        )


def _retry_after(response: httpx2.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def run_level(
    url: str,
    images: list[tuple[str, bytes]],
    clients: int,
    requests: int,
    max_seconds: float,
    timeout_s: float = 120,
) -> LevelResult:
    """`clients` threads post `images` in turn until `requests` answers or `max_seconds`."""
    result = LevelResult(clients)
    lock = threading.Lock()
    issued = 0
    deadline = time.monotonic() + max_seconds

    def take_turn() -> int | None:
        nonlocal issued
        with lock:
            if issued >= requests or time.monotonic() > deadline:
                return None
            issued += 1
            return issued

    def client_loop(offset: int) -> None:
        with httpx2.Client(timeout=timeout_s) as session:
            while (turn := take_turn()) is not None:
                name, data = images[(turn + offset) % len(images)]
                started = time.perf_counter()
                try:
                    response = session.post(
                        f"{url}/predict", files={"file": (name, data)}, params={"mask": "none"}
                    )
                except httpx2.TransportError as exc:
                    with lock:
                        result.transport_errors[type(exc).__name__] += 1
                    continue
                elapsed = (time.perf_counter() - started) * 1000.0
                wait = _retry_after(response) if response.status_code == 503 else None
                with lock:
                    result.latencies_ms.append(elapsed)
                    result.statuses[response.status_code] += 1
                    if response.status_code == 503 and wait is None:
                        result.retry_after_missing += 1
                if wait is not None:
                    time.sleep(min(wait, MAX_RETRY_WAIT_S))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    result.wall_s = time.perf_counter() - started
    return result


def warm_up(url: str, images: list[tuple[str, bytes]], count: int) -> None:
    with httpx2.Client(timeout=120) as session:
        for index in range(count):
            name, data = images[index % len(images)]
            session.post(f"{url}/predict", files={"file": (name, data)}, params={"mask": "none"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", type=Path, action="append", required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=20, help="per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=600, help="per concurrency level")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    images = [(path.name, path.read_bytes()) for path in args.image]
    warm_up(args.url, images, args.warmup)
    for clients in args.clients:
        print(run_level(args.url, images, clients, args.requests, args.max_seconds).line())


if __name__ == "__main__":
    main()
