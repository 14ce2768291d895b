"""--device and --precision on the command line: a device this machine lacks, a GPU preset on a
CPU machine, a precision the device cannot run: one line, exit 2, before any MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loomwatch.cli import main
from tests.helpers import one_line_error

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusals on a machine without CUDA"
)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device", "cuda"], "device cuda asked for"),
        (["--device", "cuda:2"], "device cuda:2 asked for"),
        (["--config", "draem-gpu"], "device cuda asked for"),
        (["--config", "draem-paper"], "device cuda asked for"),
        (["--device", "cpu", "--precision", "16-mixed"], "16-mixed needs a CUDA GPU"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--set", "runtime.device=tpu"], "runtime.device"),
    ],
)
def test_train_refuses_what_this_machine_cannot_run(
    synth_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    needle: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # an MLflow store would be made here
    args = ["--quiet", "train", "--model", "draem", "--data", str(synth_data)]
    assert main([*args, "--out", str(tmp_path / "out"), *extra]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_gpu_preset_runs_on_the_cpu_only_when_asked() -> None:
    """--device cpu overrides the preset's cuda: the config then resolves (no training here)."""
    from training.config import load_config

    config, _ = load_config("draem", Path("draem-gpu"), ["runtime.device=cpu"])
    assert config.runtime.device == "cpu" and config.runtime.precision == "bf16"
    assert config.runtime.channels_last


def test_demo_refuses_a_missing_gpu_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--device", "cuda"]) == 2
    one_line_error(capsys, "device cuda asked for")
    assert not (tmp_path / "demo").exists()
