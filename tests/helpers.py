"""Helpers shared by test modules: synthetic fabric, tiny model settings, request shortcuts and
where the real AITEX data lives. Fixtures stay in the conftest.py files; test modules import
helpers from here only, never from one another."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.settings import Settings
from bench import AITEX_DIR_VARIABLE, aitex_dir
from bench.hostile import Hostile, build_corpus
from loomwatch.cli import main
from models.base import FitContext
from models.patchcore import PatchCore, PatchCoreConfig
from models.tile_dataset import TileDataset
from tracking.store import use_tracking_store

# --- synthetic fabric -------------------------------------------------------------------------


def woven(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A plain-weave-like grey texture with noise (uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pattern = 110 + 18 * np.sin(x * 2 * np.pi / 6) * np.sin(y * 2 * np.pi / 6)
    return np.clip(pattern + rng.normal(0, 4, (height, width)), 0, 255).astype(np.uint8)


def woven_tile_set(count: int, size: int = 64) -> TileDataset:
    """`count` defect-free woven strips of size x 4*size, cut into size x size tiles."""
    images = [woven(size, 4 * size, seed=s) for s in range(count)]
    return TileDataset(images, [np.ones_like(i, bool) for i in images], size, size)


def woven_tile(seed: int = 9, size: int = 64) -> torch.Tensor:
    """One defect-free tile as a [1,1,size,size] float tensor in [0, 1]."""
    return torch.from_numpy(woven(size, size, seed=seed)).float()[None, None] / 255


def with_stain(
    image: np.ndarray, x: int, y: int, radius: int, level: int
) -> tuple[np.ndarray, np.ndarray]:
    """A round stain of grey `level` (the fabric averages 110) and its mask."""
    mask = np.zeros(image.shape, np.uint8)
    cv2.circle(mask, (x, y), radius, 255, -1)
    stained = image.copy()
    stained[mask > 0] = level
    return stained, mask


def png_bytes(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


# --- tiny models ------------------------------------------------------------------------------

# `loomwatch train` overrides for a PatchCore that trains in seconds on 64 px tiles.
TINY_SET = [
    "--set", "model.backbone=resnet18", "--set", "model.pretrained=false",
    "--set", "model.layer_dim=64", "--set", "model.embed_dim=32",
    "--set", "model.coreset_ratio=0.05", "--set", "pipeline.tile_size=64",
    "--set", "pipeline.stride=64",
]  # fmt: skip

# TINY_SET with batch-norm statistics from one batch: the quickest tracked training.
FAST_TRAIN = [*TINY_SET, "--set", "model.batchnorm_tiles=8"]

# The same kind of PatchCore as a model config, for tests that fit it directly.
TINY_PATCHCORE: dict[str, object] = {
    "backbone": "resnet18",
    "pretrained": False,
    "layer_dim": 64,
    "embed_dim": 32,
    "coreset_ratio": 0.1,
}


def fitted_patchcore(seed: int = 0) -> PatchCore:
    """A TINY_PATCHCORE fitted on three woven strips (64 px tiles)."""
    torch.manual_seed(seed)
    model = PatchCore(PatchCoreConfig.model_validate(TINY_PATCHCORE))
    images = [woven(64, 256, seed=s) for s in range(3)]
    tiles = TileDataset(images, [np.ones_like(i, bool) for i in images], 64, 64)
    model.fit(tiles, FitContext(progress=False, seed=seed))
    return model


def same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    current = model.state_dict()
    return current.keys() == state.keys() and all(torch.equal(current[k], state[k]) for k in state)


# --- tracking ---------------------------------------------------------------------------------


def train_cli(data: Path, out: Path, *extra: str) -> int:
    """`loomwatch train` of a FAST_TRAIN PatchCore (2-minute budget); the exit status."""
    args = ["--quiet", "train", "--model", "patchcore", "--data", str(data), *FAST_TRAIN]
    return main([*args, "--out", str(out), "--max-minutes", "2", *extra])


def tracking_client() -> mlflow.MlflowClient:
    """A client of the store the environment names (as the CLI would use it)."""
    use_tracking_store()
    return mlflow.MlflowClient()


def aliases(name: str) -> dict[str, str]:
    """Alias -> version as text (the SQLite store gives numbers, a server gives strings)."""
    model = tracking_client().get_registered_model(name)
    return {alias: str(v) for alias, v in model.aliases.items()}


def artifact_paths(run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run under `path`, recursively."""
    found: set[str] = set()
    for item in tracking_client().list_artifacts(run_id, path):
        found |= artifact_paths(run_id, item.path) if item.is_dir else {item.path}
    return found


def sample_images(data: Path) -> list[bytes]:
    """The first defective and the first defect-free image of an AITEX-layout folder."""
    defect = sorted((data / "Defect_images").glob("*.png"))[0]
    normal = sorted((data / "NoDefect_images").rglob("*.png"))[0]
    return [defect.read_bytes(), normal.read_bytes()]


# --- the service ------------------------------------------------------------------------------

HEIGHT, WIDTH = 128, 512  # the strips posted; training uses 128 x 256
DEFECT_CENTRE = (288, 32)  # x, y of the stain on the defective strip: the middle of a 64 px tile


def make_settings(bundle: Path, log_path: Path | None, **overrides: Any) -> Settings:
    """Explicit values for everything a developer's environment might set."""
    values: dict[str, Any] = {
        "model_uri": str(bundle),
        "api_key": None,
        "cors_origins": [],
        "inference_log_path": log_path,
        "database_url": None,  # the feedback database: tests that use it name their own
        "inference_threads": 1,
        "inference_workers": 1,
        "max_queue_depth": 8,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def post_image(
    client: TestClient,
    data: bytes,
    *,
    route: str = "/predict",
    ctype: str = "image/png",
    **query: Any,
) -> Any:
    files = {"file": ("strip.png", data, ctype)}
    return client.post(route, files=files, params=query)


def metric(text: str, line_start: str) -> float:
    """The value of the first sample line starting with `line_start` in a /metrics body."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start!r} in /metrics")


# Limits for the hostile corpus: small, so that the over-limit upload stays small too.
HOSTILE_MAX_UPLOAD = 2_000_000
HOSTILE_MAX_PIXELS = 4_000_000


def hostile_strip() -> np.ndarray:
    """The fabric the hostile corpus is made from, and that the service must still score."""
    return woven(128, 512, seed=77)


@cache
def hostile_corpus() -> tuple[Hostile, ...]:
    """bench/hostile.py's corpus, built once, for the limits above and 64 px tiles."""
    corpus = build_corpus(
        hostile_strip(),
        max_pixels=HOSTILE_MAX_PIXELS,
        max_upload_bytes=HOSTILE_MAX_UPLOAD,
        tile_size=64,
    )
    return tuple(corpus)


# --- waiting without sleeping blindly -----------------------------------------------------------


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll `condition` until it holds; fail the test with `what` once `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a process started with ``start_new_session=True`` and its children (a server
    that runs uvicorn as a child), then SIGKILL to whatever is left of the group."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group
        return


# --- real data --------------------------------------------------------------------------------


def real_aitex() -> Path:
    """The real AITEX folder; skips the calling test, saying where it looked, when it is absent."""
    folder = aitex_dir()
    if not folder.is_dir():
        pytest.skip(f"real AITEX data absent: no folder {folder} (set {AITEX_DIR_VARIABLE})")
    return folder


def one_line_error(capsys: pytest.CaptureFixture[str], needle: str) -> None:
    """The CLI's error as a user sees it: one line on stderr, no traceback, naming ``needle``."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("loomwatch: error:"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err


class PixelsAsMap:
    """A network whose anomaly map is the tile itself (an image's brightness is its map); its
    tile score is the map's highest value, or with ``pool`` its highest ``pool`` x ``pool``
    mean."""

    backend = "fake"
    device = "cpu"
    precision = "32"

    def __init__(self, pool: int = 1) -> None:
        self.pool = pool

    def run(self, tiles: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        maps = np.where(valid, tiles, 0.0)[:, 0].astype(np.float32)
        if self.pool == 1:
            return maps, maps.reshape(len(maps), -1).max(axis=1)
        size = (self.pool, self.pool)
        pooled = [cv2.blur(m, size, borderType=cv2.BORDER_REFLECT).max() for m in maps]
        return maps, np.array(pooled, np.float32)
