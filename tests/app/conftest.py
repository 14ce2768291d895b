"""A tiny real bundle, trained once per test run on synthetic woven fabric, and images to post."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import (
    DEFECT_CENTRE,
    HEIGHT,
    TINY_SET,
    WIDTH,
    make_settings,
    png_bytes,
    with_stain,
    woven,
)
from training.config import load_config
from training.train import train


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The CPUs are shared: two threads contending with other work run ~10x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fabric_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain-folder layout: clean woven strips, and two faintly stained ones (with masks) so that
    calibration sets its thresholds between clean fabric and a faint stain."""
    root = tmp_path_factory.mktemp("fabric")
    for folder in ("normal", "anomalous", "masks"):
        (root / folder).mkdir()
    for seed in range(10):  # 3 held back for the operating point
        cv2.imwrite(str(root / "normal" / f"clean_{seed}.png"), woven(HEIGHT, 256, seed))
    for seed, (x, y) in enumerate([(96, 32), (160, 96)], start=20):
        stained, mask = with_stain(woven(HEIGHT, 256, seed), x, y, radius=6, level=70)
        cv2.imwrite(str(root / "anomalous" / f"stain_{seed}.png"), stained)
        cv2.imwrite(str(root / "masks" / f"stain_{seed}.png"), mask)
    return root


@pytest.fixture(scope="session")
def bundle(fabric_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained as `loomwatch train` does (TINY_SET overrides), minus the MLflow logging."""
    out = tmp_path_factory.mktemp("served") / "tiny-patchcore"
    config, _ = load_config("patchcore", None, TINY_SET[1::2])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("patchcore", fabric_folder, config, out=out, max_minutes=2, progress=False)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="session")
def defect_strip() -> np.ndarray:
    """A strong defect: a large, dark stain."""
    return with_stain(woven(HEIGHT, WIDTH, seed=100), *DEFECT_CENTRE, radius=12, level=20)[0]


@pytest.fixture(scope="session")
def clean_strip() -> np.ndarray:
    return woven(HEIGHT, WIDTH, seed=101)


@pytest.fixture(scope="session")
def defect_png(defect_strip: np.ndarray) -> bytes:
    return png_bytes(defect_strip)


@pytest.fixture(scope="session")
def clean_png(clean_strip: np.ndarray) -> bytes:
    return png_bytes(clean_strip)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inference-log") / "inference.jsonl"


@pytest.fixture(scope="module")
def client(bundle: Path, log_path: Path) -> Iterator[TestClient]:
    """One running service (lifespan included) shared by a test module."""
    with TestClient(create_app(make_settings(bundle, log_path))) as client:
        yield client
