"""The service on a device (DEVICE, PRECISION) and with dynamic batching (BATCH_MAX_TILES):
refusals in one line, what /ready and /model report, batched answers equal to unbatched ones."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from loomwatch.cli import main
from models.batching import BatchingNetwork
from tests.helpers import free_port, make_settings, post_image

NO_CUDA = not torch.cuda.is_available()


def run_serve(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() points logging at captured stderr
    try:
        code = main(["serve", *argv, "--port", str(free_port())])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("loomwatch: error:")]


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_serve_on_a_missing_gpu_stops_with_one_line(
    bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, errors = run_serve(["--model-uri", str(bundle), "--device", "cuda"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "cannot load model" in errors[0] and "device cuda asked for" in errors[0]
    monkeypatch.setenv("DEVICE", "cuda:1")  # the setting, as a container would pass it
    code, errors = run_serve(["--model-uri", str(bundle)], capsys)
    assert code == 2 and len(errors) == 1 and "device cuda:1 asked for" in errors[0]


def test_a_bad_device_or_precision_setting_is_one_line(
    bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICE", "gpu")
    code, errors = run_serve(["--model-uri", str(bundle)], capsys)
    assert code == 2 and errors == [errors[0]] and "setting DEVICE" in errors[0]
    monkeypatch.setenv("DEVICE", "cpu")
    code, errors = run_serve(["--model-uri", str(bundle), "--precision", "fp8"], capsys)
    assert code == 2 and len(errors) == 1 and "PRECISION" in errors[0]


def test_the_service_refuses_to_become_ready_on_a_missing_device(bundle: Path) -> None:
    if not NO_CUDA:
        pytest.skip("checks the refusal on a machine without CUDA")
    app = create_app(make_settings(bundle, None, device="cuda"))
    with pytest.raises(Exception, match="device cuda asked for"), TestClient(app):
        pass
    assert "device cuda asked for" in app.state.not_ready_reason


@pytest.fixture(scope="module")
def batched(bundle: Path) -> Iterator[TestClient]:
    settings = make_settings(
        bundle, None, inference_workers=4, batch_max_tiles=64, batch_max_wait_ms=50.0
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_ready_and_model_report_device_precision_and_batching(
    client: TestClient, batched: TestClient
) -> None:
    ready = client.get("/ready").json()
    assert (ready["backend"], ready["device"], ready["precision"]) == ("torch", "cpu", "32")
    runtime = client.get("/model").json()["runtime"]
    assert runtime["batch_max_tiles"] == 0  # off by default on the CPU
    runtime = batched.get("/model").json()["runtime"]
    assert runtime["batch_max_tiles"] == 64 and runtime["batch_max_wait_ms"] == 50.0


def test_batched_service_answers_as_the_unbatched_one(
    client: TestClient, batched: TestClient, defect_png: bytes, clean_png: bytes
) -> None:
    """Concurrent /predict requests and a /predict/batch share forward passes (fewer passes
    than images) and get the scores the unbatched service gives."""
    network = batched.app.state.scorer.model.detector.network  # type: ignore[attr-defined]
    assert isinstance(network, BatchingNetwork)
    images = [defect_png, clean_png] * 3
    expected = [post_image(client, image).json()["raw_score"] for image in images]
    before = network.passes
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda image: post_image(batched, image), images))
    assert [a.status_code for a in answers] == [200] * 6
    assert [a.json()["raw_score"] for a in answers] == pytest.approx(expected, abs=1e-5)
    assert network.passes - before < len(images)
    before = network.passes
    files = [("files", (f"s{i}.png", image, "image/png")) for i, image in enumerate(images)]
    body = batched.post("/predict/batch", files=files).json()
    scores = [item["result"]["raw_score"] for item in body["items"]]
    assert scores == pytest.approx(expected, abs=1e-5)
    tiles = sum(item["result"]["image"]["tiles"] for item in body["items"])
    assert tiles > 64 and network.passes - before == math.ceil(tiles / 64)  # full passes


def test_bf16_serving_on_the_cpu(bundle: Path, defect_png: bytes) -> None:
    with TestClient(create_app(make_settings(bundle, None, precision="bf16"))) as client:
        assert client.get("/ready").json()["precision"] == "bf16"
        answer = post_image(client, defect_png)
        assert answer.status_code == 200 and answer.json()["decision"] in ("anomalous", "normal")


@pytest.mark.cuda
def test_cuda_serving_batches_by_default(bundle: Path, defect_png: bytes) -> None:
    with TestClient(create_app(make_settings(bundle, None, device="cuda"))) as client:
        ready = client.get("/ready").json()
        assert ready["device"].startswith("cuda")
        assert client.get("/model").json()["runtime"]["batch_max_tiles"] == 64
        assert post_image(client, defect_png).status_code == 200
