"""The slim install: serving an exported model needs none of torch, torchvision, MLflow, pandas,
scikit-learn, matplotlib (pyproject's core dependencies and the `onnxruntime` extra), and every
command that needs more says in one line which extra to install.

Both are checked in fresh interpreters: one serves an exported ONNX model (the app under
TestClient: start-up, /predict, /predict/overlay) and reports what it imported; the other has
those packages made unimportable, as in a slim install, and runs the CLI."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from models.export import export_bundle
from models.pipeline import Detector
from tests.helpers import png_bytes, woven

pytestmark = pytest.mark.slow  # exporting (torch.export) takes 10-15 s

ROOT = Path(__file__).resolve().parents[2]
# what the slim install leaves out (pyproject.toml: the torch, tracking, train and export extras)
NOT_IN_SLIM = ("torch", "torchvision", "safetensors", "mlflow", "pandas", "sklearn", "scipy",
               "matplotlib", "onnx", "onnxscript", "nncf", "openvino")  # fmt: skip


def run_python(code: str) -> Any:
    """Run `code` in a fresh interpreter (from the project folder); its last line is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app tests' tiny PatchCore, exported to ONNX (fp32)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("slim") / "tiny-patchcore-onnx"
    return export_bundle(bundle, out, "onnx", source_uri=str(bundle))


@pytest.fixture(scope="module")
def strip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("strip") / "strip.png"
    path.write_bytes(png_bytes(woven(128, 512, seed=5)))
    return path


SERVE_EXPORTED = """
import json, sys
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings

settings = Settings(_env_file=None, model_uri={model!r}, backend="auto", api_key=None,
                    cors_origins=[], inference_log_path=None, inference_threads=1)
image = open({strip!r}, "rb").read()
with TestClient(create_app(settings)) as client:
    ready = client.get("/ready").status_code
    answer = client.post("/predict", files={{"file": ("strip.png", image, "image/png")}})
    overlay = client.post("/predict/overlay", files={{"file": ("strip.png", image, "image/png")}})
body = answer.json()
print(json.dumps({{
    "ready": ready, "predict": answer.status_code, "overlay": overlay.status_code,
    "decision": body.get("decision"), "model": body.get("model"),
    "loaded": [name for name in {heavy!r} if name in sys.modules],
    "runtime": "onnxruntime" in sys.modules,
}}))
"""


def test_serving_an_exported_model_imports_no_torch_mlflow_pandas_sklearn_or_matplotlib(
    exported: Path, strip: Path
) -> None:
    code = SERVE_EXPORTED.format(model=str(exported), strip=str(strip), heavy=NOT_IN_SLIM)
    result = run_python(code)
    assert (result["ready"], result["predict"], result["overlay"]) == (200, 200, 200), result
    assert result["decision"] in ("normal", "anomalous")
    assert result["loaded"] == [] and result["runtime"] is True


SLIM_CLI = """
import contextlib, io, json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` raises ModuleNotFoundError, find_spec says None
from loomwatch.cli import main

answers = []
for argv in {runs!r}:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    answers.append([code, err.getvalue().strip().splitlines(), out.getvalue()])
print(json.dumps(answers))
"""


def test_auto_runs_an_onnx_export_on_openvino_where_only_openvino_is_installed(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "onnxruntime" else real(name, *args),
    )
    assert Detector.from_bundle(exported).backend == "openvino"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_without_the_extras_the_cli_serves_exported_models_and_names_the_extra_for_the_rest(
    bundle: Path, exported: Path, strip: Path, tmp_path: Path
) -> None:
    torch_bundle, onnx_model = str(bundle), str(exported)
    runs = {
        "help": ["--help"],
        "synth": ["--quiet", "synth", "--out", str(tmp_path / "synth"), "--fabrics", "1",
                  "--normal", "1", "--defective", "1", "--width", "512", "--height", "128"],
        "predict exported": ["predict", "--model-uri", onnx_model, str(strip),
                             "--out", str(tmp_path / "predictions")],
        "train": ["train", "--model", "vae", "--data", str(tmp_path / "synth")],
        "evaluate": ["evaluate", "--model-uri", onnx_model, "--data", str(tmp_path / "synth")],
        "export": ["export", "--model-uri", torch_bundle, "--format", "onnx",
                   "--out", str(tmp_path / "x")],
        "promote": ["promote", "fabric"],
        "demo": ["demo", "--no-serve", "--workdir", str(tmp_path / "demo")],
        "predict bundle": ["predict", "--model-uri", torch_bundle, str(strip)],
        "predict registry": ["predict", "--model-uri", "models:/fabric@champion", str(strip)],
        "serve bundle": ["serve", "--model-uri", torch_bundle, "--host", "127.0.0.1",
                         "--port", str(free_port())],
    }  # fmt: skip
    code = SLIM_CLI.format(blocked=NOT_IN_SLIM, runs=list(runs.values()))
    answers = dict(zip(runs, run_python(code), strict=True))

    assert answers["help"][0] == 0 and "serve" in answers["help"][2]
    assert answers["synth"][0] == 0
    assert answers["predict exported"][0] == 0, answers["predict exported"]
    assert (tmp_path / "predictions" / "strip.json").is_file()
    assert not (tmp_path / "x").exists() and not (tmp_path / "demo").exists()
    expected = {
        "train": "loomwatch train needs torch, which is not installed: pip install "
        "'loomwatch[train]'",
        "evaluate": "'loomwatch[train]'",
        "export": "loomwatch export needs torch, which is not installed: pip install "
        "'loomwatch[export]'",
        "promote": "'loomwatch[train]'",
        "demo": "loomwatch demo needs torch, which is not installed: pip install "
        "'loomwatch[train]'",
        "predict bundle": "the torch backend needs torch, which is not installed: pip install "
        "'loomwatch[torch]'",
        "predict registry": "MLflow is not installed (the tracking store and models:/, runs:/ "
        "URIs need it): pip install 'loomwatch[tracking]'",
        "serve bundle": "'loomwatch[torch]'",
    }
    for name, words in expected.items():
        status, errors, _ = answers[name]
        assert status == 2, (name, answers[name])
        line = errors[-1]  # serve logs its start-up above the error
        assert line.startswith("loomwatch: error: ") and words in line, (name, errors)
        if name != "serve bundle":
            assert len(errors) == 1, (name, errors)
