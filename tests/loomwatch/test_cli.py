"""The CLI on top: a light `--help`, a light serving start-up, and mistakes caught before any work
(a taken port before the model loads, a wrong data folder before an MLflow run opens)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loomwatch.cli import BUILTIN_USER_ERRORS, MODEL_NAMES, USER_ERRORS, is_user_error, main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "mlflow", "pandas", "training.data", "fastapi")


def loaded_after(code: str) -> list[str]:
    """The modules of HEAVY that a fresh interpreter has loaded after running `code`."""
    report = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    probe = f"{code}\nimport json, sys\n{report}"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_help_and_the_port_check_import_neither_torch_nor_mlflow_nor_the_data_loaders() -> None:
    code = (
        "import contextlib, io\nfrom loomwatch.cli import main\nimport app.listen\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "    main(['train', '--help'])"
    )
    assert loaded_after(code) == []


def test_serving_start_up_imports_no_torch_data_loaders_pandas_or_mlflow() -> None:
    # app.server brings the app, the model loader and model-URI resolution (tracking.uris);
    # torch comes only with a PyTorch bundle (tests/app/test_slim.py serves an exported one)
    loaded = loaded_after("import app.server, app.main, tracking.uris")
    assert set(loaded) == {"fastapi"}


def test_the_model_names_of_the_help_are_the_registry_s() -> None:
    from models.registry import MODEL_TYPES

    assert sorted(MODEL_NAMES) == sorted(MODEL_TYPES)


def test_every_user_error_type_named_exists() -> None:
    for module_name, names in USER_ERRORS.items():
        module = importlib.import_module(module_name)
        for name in names:
            error = getattr(module, name)
            assert issubclass(error, Exception) and error.__module__ == module_name
            assert is_user_error(error("x"))
    assert all(is_user_error(kind("x")) for kind in BUILTIN_USER_ERRORS)
    assert not is_user_error(RuntimeError("a bug"))


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def test_serve_on_a_taken_port_fails_before_loading_the_model(
    taken_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The model URI names nothing: had the model been loaded first, that would be the error.
    missing = str(tmp_path / "no-bundle")
    code = main(["serve", "--model-uri", missing, "--host", "127.0.0.1", "--port", str(taken_port)])
    assert code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"loomwatch: error: port {taken_port} on 127.0.0.1 is already in use; choose another "
        "with --port N (or PORT=N)"
    ]


def test_demo_on_a_taken_port_fails_before_doing_anything(
    taken_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "demo"
    code = main(["demo", "--workdir", str(work), "--host", "127.0.0.1", "--port", str(taken_port)])
    assert code == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "already in use" in error and "--port" in error and "--no-serve" in error
    assert not work.exists()


@pytest.fixture
def own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default store (./mlflow.db) in an empty working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "mlflow.db"


@pytest.mark.parametrize(
    ("data", "fabric", "message"),
    [
        ("missing", None, "does not exist"),
        ("empty", None, "data layout not recognised"),
        ("synth", "99", "fabric"),
        ("only-defects", None, "no defect-free images"),
        ("few-clean", None, "needs at least 3 defect-free images held back"),
    ],
)
def test_train_checks_its_data_before_any_mlflow_run(
    data: str,
    fabric: str | None,
    message: str,
    own_store: Path,
    synth_data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = {"missing": own_store.parent / "missing", "synth": synth_data}.get(data)
    if folder is None:
        folder = own_store.parent / data
        folder.mkdir()
        if data in ("only-defects", "few-clean"):
            (folder / "anomalous").mkdir()
            for path in sorted((synth_data / "Defect_images").glob("*.png"))[:2]:
                (folder / "anomalous" / path.name).write_bytes(path.read_bytes())
        if data == "few-clean":  # 5 defect-free images: 2 held back for the operating point
            (folder / "normal").mkdir()
            for path in sorted((synth_data / "NoDefect_images").rglob("*.png"))[:5]:
                (folder / "normal" / path.name).write_bytes(path.read_bytes())
    args = ["train", "--model", "patchcore", "--data", str(folder), "--config", "patchcore-cpu"]
    code = main([*args, *(["--fabric", fabric] if fabric else [])])
    assert code == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("loomwatch: error:") and message in error
    assert not own_store.exists(), "no MLflow store opened, so no FAILED run left in it"


def test_patchcore_without_torchvision_names_the_extra_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CPU-only torch without torchvision trains DRAEM and the VAE; PatchCore says what to
    install before an MLflow run (or anything else) is made."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torchvision" else real(name, *args),
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "patchcore", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "loomwatch: error: loomwatch train needs torchvision, which is not installed: "
        "pip install 'loomwatch[train]'"
    )
    assert list(tmp_path.iterdir()) == []
