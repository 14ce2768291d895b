"""A tiny PatchCore bundle and a small archive of AITEX-named strips (two rolls, defect images,
masks that must not be scored), made by the tests themselves."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_SET
from training.config import load_config
from training.train import train


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The CPUs are shared: one thread per process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def bundle(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TINY_SET PatchCore trained on the synthetic fabric (no MLflow run)."""
    out = tmp_path_factory.mktemp("batch-model") / "tiny-patchcore"
    config, _ = load_config("patchcore", None, TINY_SET[1::2])
    train("patchcore", synth_data, config, out=out, max_minutes=2, progress=False)
    return out


@pytest.fixture(scope="package")
def archive(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six strips in the AITEX layout: two defective, four defect-free over two rolls, and the
    ground-truth masks (labels: never scored)."""
    root = tmp_path_factory.mktemp("archive")
    defects = sorted((synth_data / "Defect_images").glob("*.png"))[:2]
    normal = sorted((synth_data / "NoDefect_images").rglob("*.png"))[:4]
    (root / "Defect_images").mkdir()
    (root / "Mask_images").mkdir()
    for path in defects:
        shutil.copy(path, root / "Defect_images" / path.name)
        for mask in (synth_data / "Mask_images").glob(f"{path.stem}_mask*.png"):
            shutil.copy(mask, root / "Mask_images" / mask.name)
    for index, path in enumerate(normal):
        roll = root / "NoDefect_images" / ("roll-a" if index < 2 else "roll-b")
        roll.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, roll / path.name)
    return root
