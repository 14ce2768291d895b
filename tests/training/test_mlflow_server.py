"""Training and registering through a real ``mlflow server`` on a loopback port (HTTP, no mock)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.helpers import (
    aliases,
    artifact_paths,
    free_port,
    sample_images,
    stop_group,
    train_cli,
    wait_until,
)
from tracking.uris import resolve_model_uri

pytestmark = pytest.mark.slow  # a real mlflow server and trainings

STARTUP_SECONDS = 180  # generous: the server imports MLflow twice on a busy 2-core machine


def wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    def healthy() -> bool:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(healthy, STARTUP_SECONDS, "the mlflow server's /health", interval=0.5)
    except AssertionError as error:
        pytest.fail(f"{error}: {log.read_text()[-2000:]}")


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "server-artifacts")]  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_healthy(url, server, log)
        yield url
    finally:
        stop_group(server)


def test_train_and_register_through_a_real_tracking_server(
    mlflow_server: str, synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("LOOMWATCH_MODEL_CACHE", str(tmp_path / "cache"))
    assert train_cli(synth_data, tmp_path / "http-model", "--register", "fabric-http",
                     "--alias", "champion") == 0  # fmt: skip

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("loomwatch")
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and "image_auroc" in run.data.metrics
    paths = artifact_paths(run.info.run_id)
    assert {"evaluation/report.html", "bundle/manifest.json"} <= paths
    assert aliases("fabric-http") == {"champion": "1"}
    # Artifacts went through the server to its own folder, and come back the same way.
    assert list((tmp_path / "server-artifacts").rglob("weights.safetensors"))
    bundle = resolve_model_uri("models:/fabric-http@champion")
    assert bundle.is_relative_to(tmp_path / "cache") and (bundle / "manifest.json").exists()
    model = mlflow.pyfunc.load_model("models:/fabric-http@champion")
    scores = model.predict(pd.DataFrame({"image": sample_images(synth_data)}))["score"]
    assert len(scores) == 2 and scores.between(0.0, 1.0).all()
