"""`loomwatch train` killed with SIGKILL in the middle of fitting: nothing is registered, no
bundle (half or whole) is left where the next command would load it, and the next run works."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from bench.live_server import loomwatch_command
from loomwatch.cli import main
from tests.helpers import TINY_SET

pytestmark = pytest.mark.slow  # two real trainings in subprocesses (~40 s)

FIT_STARTS = "training images ->"  # logged by training.train just before the model is fitted


def train_command(data: Path, out: Path) -> list[str]:
    args = ["--quiet", "train", "--model", "patchcore", "--data", str(data), *TINY_SET]
    return [*loomwatch_command(), *args, "--out", str(out), "--register", "fabric",
            "--alias", "champion", "--max-minutes", "2"]  # fmt: skip


def test_sigkill_mid_fit_registers_nothing_and_the_next_run_works(
    synth_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=store, MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    env.update(LOOMWATCH_MODEL_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "bundle"
    killed = subprocess.Popen(
        train_command(synth_data, out),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert killed.stdout is not None
    seen = []
    for line in killed.stdout:
        seen.append(line)
        if FIT_STARTS in line:
            killed.send_signal(signal.SIGKILL)
            break
    assert killed.wait(60) == -signal.SIGKILL, "".join(seen)
    killed.stdout.close()

    client = MlflowClient(tracking_uri=store)
    assert not out.exists(), "a bundle was left where the next command would load it"
    assert client.search_model_versions("name = 'fabric'") == []
    experiment = client.get_experiment_by_name("loomwatch")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["RUNNING"]  # SIGKILL cannot be handled

    # the next run, in this process (one interpreter start-up less), on the same store
    for key, value in env.items():
        if key.startswith(("MLFLOW_", "LOOMWATCH_")):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_command(synth_data, out)[len(loomwatch_command()) :]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "model URI: models:/fabric/1" in capsys.readouterr().out
    assert (out / "manifest.json").exists() and (out / "weights.safetensors").exists()
    versions = client.search_model_versions("name = 'fabric'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias("fabric", "champion").version) == "1"
