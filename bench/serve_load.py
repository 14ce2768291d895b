"""Latency of a running service under N concurrent clients (prints figures; asserts nothing).

    loomwatch serve --model-uri BUNDLE &
    python bench/serve_load.py --image STRIP.png [--url http://127.0.0.1:8000]
                               [--clients 1 4] [--requests 20]

Each client posts the same image to /predict (mask=none: the figure is the service, not the
PNG transfer) one request after another; `--requests` is the total per concurrency level.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2


def one_level(url: str, image: bytes, name: str, clients: int, requests: int) -> None:
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    def client_loop(count: int) -> None:
        with httpx2.Client(timeout=120) as session:
            for _ in range(count):
                started = time.perf_counter()
                response = session.post(
                    f"{url}/predict", files={"file": (name, image)}, params={"mask": "none"}
                )
                latencies.append((time.perf_counter() - started) * 1000.0)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, shares))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    print(
        f"clients={clients} requests={len(latencies)} statuses={statuses} "
        f"p50={statistics.median(ordered):.0f} ms p90={p90:.0f} ms "
        f"max={ordered[-1]:.0f} ms throughput={len(latencies) / wall:.2f} img/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=20, help="per concurrency level")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    image = args.image.read_bytes()
    with httpx2.Client(timeout=120) as session:
        for _ in range(args.warmup):
            session.post(f"{args.url}/predict", files={"file": (args.image.name, image)})
    for clients in args.clients:
        one_level(args.url, image, args.image.name, clients, args.requests)


if __name__ == "__main__":
    main()
