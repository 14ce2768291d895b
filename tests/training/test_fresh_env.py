"""The logged MLflow model is self-contained: a fresh environment loads, scores and serves it.

A PatchCore is exported to ONNX and registered by ``loomwatch export --register``. A new virtual
environment (``python -m venv``) gets exactly the model's own ``requirements.txt`` (MLflow,
pandas, NumPy, Pillow, pydantic, OpenCV, ONNX Runtime: no PyTorch, no ``loomwatch``), and runs
from a folder outside this repository with no PYTHONPATH, so the project's code can only come
from the model's ``code/``. In it ``mlflow.pyfunc.load_model("models:/NAME@champion")`` scores
strips as PyTorch does here, and ``mlflow models serve --env-manager local`` answers
``/invocations``.

The wheels are downloaded once into a wheelhouse in pytest's cache (``LOOMWATCH_WHEELHOUSE``
moves it) and installed from it without an index (this machine's pip keeps no HTTP cache: the
package index's answers carry no caching headers). With neither the wheels nor the package index
the test is skipped, saying why. The environment is built in the background while the model is
fitted, exported and registered, and removed afterwards (about 850 MB, 14,000 files).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from loomwatch.cli import main
from models.bundle import Manifest, PipelineConfig, save_bundle
from models.calibration import Calibration
from models.pipeline import Detector
from models.preprocessing import ValidAreaSettings
from tests.helpers import (
    fitted_patchcore,
    free_port,
    png_bytes,
    stop_group,
    tracking_client,
    wait_until,
    with_stain,
    woven,
)
from tracking.registry import TAG
from training import pyfunc

ROOT = Path(__file__).resolve().parents[2]  # this repository
NAME = "fabric-fresh-env"
WHEELHOUSE_VARIABLE = "LOOMWATCH_WHEELHOUSE"
STARTUP_SECONDS = 180  # mlflow models serve on a busy 2-core machine, imports not yet compiled
CAL = Calibration(image_threshold=2.0, image_min=0.0, image_max=4.0, pixel_threshold=2.0,
                  pixel_min=0.0, pixel_max=4.0, method="test")  # fmt: skip

# Run by the fresh environment's Python: load through the registry, score, say where code came from.
LOAD_AND_SCORE = """
import json, sys
from importlib import metadata
import mlflow, pandas as pd
uri, *paths = sys.argv[1:]
model = mlflow.pyfunc.load_model(uri)
result = model.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in paths]}))
import models, training.pyfunc
try:
    metadata.version("loomwatch")
    installed = True
except metadata.PackageNotFoundError:
    installed = False
print(json.dumps({
    "raw_score": result["raw_score"].tolist(),
    "decision": result["decision"].tolist(),
    "code": [models.__file__, training.pyfunc.__file__],
    "torch": "torch" in sys.modules,
    "loomwatch_installed": installed,
}))
"""


class PackagesUnavailableError(Exception):
    """The packages cannot be had: neither in the wheelhouse nor from the package index."""


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def build_venv(target: Path, requirements: list[str], wheelhouse: Path) -> Path:
    """A new virtual environment at ``target`` with ``requirements`` and nothing else; its
    Python. Installs from ``wheelhouse``, filling it from the package index when it lacks one."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    python = target / "bin" / "python"
    install = ["--python", str(python), "install", "--quiet", "--no-compile", "--no-index"]
    install += ["--find-links", str(wheelhouse), *requirements]
    if _pip(*install).returncode != 0:
        download = _pip("download", "--quiet", "--dest", str(wheelhouse), *requirements)
        if download.returncode != 0:
            lines = [line for line in download.stderr.splitlines() if line.strip()]
            raise PackagesUnavailableError(
                lines[-1] if lines else f"pip download exited {download.returncode}"
            )
        installed = _pip(*install)
        if installed.returncode != 0:
            raise AssertionError(f"pip install failed: {installed.stderr[-2000:]}")
    return python


@pytest.fixture(scope="module")
def venv_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[Path]]:
    """Starts building the environment an exported ONNX model asks for, in the background."""
    configured = os.environ.get(WHEELHOUSE_VARIABLE, "").strip()
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    if configured:
        wheelhouse = Path(configured)
    elif cache is not None:
        wheelhouse = cache.mkdir("fresh-env-wheelhouse")
    else:
        wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    wheelhouse.mkdir(parents=True, exist_ok=True)
    target = tmp_path_factory.mktemp("fresh") / "venv"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(build_venv, target, pyfunc.requirements_for("onnx"), wheelhouse)
        yield future
    # ~14,000 files take this disk 10-30 s to delete: a detached `rm` does it after the tests.
    subprocess.run(
        ["sh", "-c", f"rm -rf {shlex.quote(str(target))} >/dev/null 2>&1 &"], check=False
    )


@pytest.fixture(scope="module")
def exported(venv_build: Future[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PatchCore bundle, exported to ONNX and registered as NAME@champion by the CLI."""
    root = tmp_path_factory.mktemp("exported")
    pipeline = PipelineConfig(tile_size=64, stride=64, valid_area=ValidAreaSettings(end_margin=0))
    model = fitted_patchcore()
    manifest = Manifest(model_type=model.model_type, config=model.config.model_dump(),
                        calibration=CAL, pipeline=pipeline)  # fmt: skip
    bundle = save_bundle(root / "bundle", model, manifest)
    args = ["--quiet", "export", "--model-uri", str(bundle), "--format", "onnx",
            "--out", str(root / "onnx"), "--register", NAME, "--alias", "champion"]  # fmt: skip
    assert main(args) == 0
    return bundle


@pytest.fixture(scope="module")
def fresh_python(venv_build: Future[Path]) -> Path:
    try:
        return venv_build.result()
    except PackagesUnavailableError as exc:
        pytest.skip(f"no fresh environment: the packages are neither in the wheelhouse nor on "
                    f"the package index ({exc})")  # fmt: skip


def strips(folder: Path) -> list[Path]:
    """A strip with a dark stain and a defect-free one, as PNG files."""
    stained, _ = with_stain(woven(128, 256, seed=31), 150, 60, radius=8, level=40)
    paths = [folder / "stained.png", folder / "plain.png"]
    for path, pixels in zip(paths, [stained, woven(128, 256, seed=32)], strict=True):
        path.write_bytes(png_bytes(pixels))
    return paths


def fresh_env(python: Path, home: Path) -> dict[str, str]:
    """Nothing of this repository or its environment: the venv's bin on PATH, the store."""
    home.mkdir(exist_ok=True)
    return {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def invocations(port: int, paths: list[Path], threshold: float) -> list[dict[str, object]]:
    images = [[base64.b64encode(path.read_bytes()).decode()] for path in paths]
    body = {"dataframe_split": {"columns": ["image"], "data": images},
            "params": {"threshold": threshold}}  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        predictions: list[dict[str, object]] = json.loads(answer.read())["predictions"]
        return predictions


@pytest.mark.slow
def test_registered_export_carries_its_code_and_only_its_runtime(
    exported: Path, tmp_path: Path
) -> None:
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion",
                                                      dst_path=str(tmp_path)))  # fmt: skip
    requirements = (folder / "requirements.txt").read_text().split()
    assert requirements == pyfunc.requirements_for("onnx")
    names = {line.partition("==")[0] for line in requirements}
    assert {"mlflow", "onnxruntime", "pandas"} <= names
    assert not names & {"torch", "torchvision", "loomwatch"}
    assert (folder / "code/models/pipeline.py").is_file()
    assert (folder / "code/training/pyfunc.py").is_file()
    assert not list(folder.rglob("__pycache__"))
    version = tracking_client().get_model_version(NAME, "1")
    assert version.tags[f"{TAG}export.format"] == "onnx"
    assert version.tags[f"{TAG}export.precision"] == "fp32"
    assert version.tags[f"{TAG}model_type"] == "patchcore"
    torch_pins = pyfunc.requirements_for("torch")  # a PyTorch bundle's, installable from PyPI
    assert any(pin.startswith("torch==") for pin in torch_pins)
    assert not any("+" in pin for pin in torch_pins)


@pytest.mark.slow
def test_fresh_environment_loads_scores_and_serves_the_registered_model(
    exported: Path, fresh_python: Path, tmp_path: Path
) -> None:
    work = tmp_path / "elsewhere"  # the fresh processes' working folder: not this repository
    work.mkdir()
    paths = strips(tmp_path)
    env = fresh_env(fresh_python, tmp_path / "home")
    port = free_port()
    log = tmp_path / "serve.log"
    serve = [str(fresh_python.parent / "mlflow"), "models", "serve", "-m",
             f"models:/{NAME}@champion", "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(port)]  # fmt: skip
    with log.open("wb") as sink:
        server = subprocess.Popen(
            serve, cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        script = [str(fresh_python), "-c", LOAD_AND_SCORE, f"models:/{NAME}@champion"]
        loaded = subprocess.run(
            [*script, *map(str, paths)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        result = json.loads(loaded.stdout.strip().splitlines()[-1])
        reference = Detector.from_bundle(exported)  # PyTorch, in this process
        expected = [reference.predict(path.read_bytes()).raw_score for path in paths]
        assert result["raw_score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert result["raw_score"][0] > result["raw_score"][1]  # the stain scores higher
        assert not result["torch"] and not result["loomwatch_installed"]
        assert all("/code/" in path and str(ROOT) not in path for path in result["code"])

        def ready() -> bool:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({server.returncode}): "
                            f"{log.read_text()[-3000:]}")  # fmt: skip
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until(ready, STARTUP_SECONDS, "mlflow models serve's /ping", interval=0.5)
        predictions = invocations(port, paths, threshold=0.7)
        assert [p["raw_score"] for p in predictions] == pytest.approx(result["raw_score"])
        assert all(p["threshold"] == 0.7 for p in predictions)
    finally:
        stop_group(server)


def test_export_alias_needs_register(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["export", "--model-uri", str(tmp_path), "--format", "onnx", "--out",
            str(tmp_path / "out"), "--alias", "champion"]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "loomwatch: error: --alias needs --register NAME"
    assert not (tmp_path / "out").exists()
