"""The runtimes' shared parts that need no exported model: spreading tiles over streams, and
how many cores a runtime takes (parity of the runtimes themselves: test_export.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from models.network import Streams, cores, cpu_quota


def test_streams_return_every_tile_in_order_whatever_thread_ran_it() -> None:
    threads: set[str] = set()

    def run_one(tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        threads.add(threading.current_thread().name)
        assert tiles.shape == (1, 1, 4, 4) and valid.dtype == np.float32
        return tiles[:, 0] * 2.0, tiles.reshape(1, -1).max(axis=1)

    tiles = np.arange(7 * 16, dtype=np.float32).reshape(7, 1, 4, 4)
    valid = np.ones_like(tiles, dtype=bool)
    maps, scores = Streams(2, run_one).run(tiles, valid)
    np.testing.assert_array_equal(maps, tiles[:, 0] * 2.0)
    np.testing.assert_array_equal(scores, tiles.reshape(7, -1).max(axis=1))
    assert maps.dtype == scores.dtype == np.float32
    assert all(name.startswith("loomwatch-stream") for name in threads)
    one_maps, one_scores = Streams(1, run_one).run(tiles, valid)  # no pool: same answer
    np.testing.assert_array_equal(one_maps, maps)
    np.testing.assert_array_equal(one_scores, scores)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cpu_quota_of_cgroup_v1_and_v2(
    tmp_path: Path, files: dict[str, str], expected: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


def test_cores_are_the_threads_asked_else_the_affinity_capped_by_the_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr("models.network.cpu_quota", lambda: 1.5)
    assert cores(None) == 2
    assert cores(3) == 3
    monkeypatch.setattr("models.network.cpu_quota", lambda: None)
    assert cores(None) == 64
