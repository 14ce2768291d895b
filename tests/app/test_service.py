"""Probes, model metadata, metrics, documentation, CORS, the inference log's failure mode, and
`loomwatch serve`: in-process for a start-up failure, as a real process on a loopback port."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.model import name_and_version
from bench.live_server import live_server
from loomwatch.cli import main
from tests.helpers import make_settings, metric, post_image


def test_health_ready_and_root(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["reason"] is None
    assert ready["model"]["type"] == "patchcore" and ready["warmup_ms"] > 0
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/docs"


def test_model_describes_itself(client: TestClient, bundle: Path) -> None:
    body = client.get("/model").json()
    assert body["name"] == bundle.name and body["type"] == "patchcore"
    assert body["uri"] == str(bundle) and body["version"] == body["digest"]
    assert body["config"]["backbone"] == "resnet18"
    assert body["pipeline"]["tile_size"] == 64
    assert {"image_threshold", "pixel_threshold", "method"} <= set(body["calibration"])
    assert "image_auroc" in body["metrics"] and body["training"]["train_images"] > 0
    accepted = body["accepted_input"]
    assert accepted["formats"] == ["PNG", "JPEG", "BMP", "TIFF"]
    assert accepted["max_pixels"] == 16_777_216 and "I;16" in accepted["modes"]
    assert body["suppression"]["min_region_area"] >= 0


def test_metrics_count_requests_predictions_and_regions(
    client: TestClient, defect_png: bytes, clean_png: bytes
) -> None:
    post_image(client, defect_png)
    post_image(client, clean_png)
    post_image(client, b"nope", ctype="text/plain")
    # a suppressed region (within the veto margin, so not kept as the score's evidence)
    post_image(client, defect_png, min_region_area=100_000, veto_margin=1.0)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/")
    text = response.text
    ok = 'loomwatch_http_requests_total{method="POST",route="/predict",status="200"}'
    assert metric(text, ok) >= 3
    assert metric(
        text, 'loomwatch_http_requests_total{method="POST",route="/predict",status="415"}'
    )
    latency = 'loomwatch_http_request_duration_seconds_count{method="POST",route="/predict",status'
    assert metric(text, latency) >= 1
    assert metric(text, 'loomwatch_predictions_total{decision="anomalous"}') >= 1
    assert metric(text, 'loomwatch_predictions_total{decision="normal"}') >= 1
    assert 0 < metric(text, "loomwatch_anomaly_rate ") < 1
    assert metric(text, 'loomwatch_regions_suppressed_total{reason="area_below_min"}') >= 1
    assert metric(text, "loomwatch_regions_kept_total") >= 1
    assert metric(text, 'loomwatch_inference_duration_seconds_count{stage="model"}') >= 3
    assert metric(text, "loomwatch_inference_queue_depth") == 0
    assert metric(text, "loomwatch_inference_log_failures_total") == 0
    assert metric(text, "loomwatch_ready") == 1
    assert 'loomwatch_model_info{name="tiny-patchcore"' in text


def test_model_name_and_version_come_from_the_uri() -> None:
    folder, digest = Path("/srv/bundles/fabric-02"), "sha256:0123456789ab"
    assert name_and_version("models:/fabric/3", folder, digest) == ("fabric", "3")
    assert name_and_version("models:/fabric@champion", folder, digest) == ("fabric", digest)
    assert name_and_version("runs:/abc123/model", folder, digest) == ("run-abc123", digest)
    assert name_and_version(str(folder), folder, digest) == ("fabric-02", digest)


def test_docs_cover_every_route_parameter_and_error(client: TestClient) -> None:
    assert "swagger-ui" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/predict",
        "/predict/batch",
        "/predict/overlay",
        "/health",
        "/ready",
        "/model",
        "/models",
        "/metrics",
        "/predictions",
        "/predictions/{prediction_id}",
        "/predictions/{prediction_id}/thumbnail",
        "/predictions/{prediction_id}/image",
        "/predictions/{prediction_id}/feedback",
    }
    assert set(paths) == expected
    predict = paths["/predict"]["post"]
    params = {p["name"]: p for p in predict["parameters"]}
    assert set(params) == {
        "threshold", "min_region_area", "min_region_peak", "veto_margin", "heatmap", "mask",
        "fabric",
    }  # fmt: skip
    assert all(p.get("description") and p.get("examples") for p in params.values()), params
    assert {"200", "401", "413", "415", "422", "503"} <= set(predict["responses"])
    assert "image/png" in paths["/predict/overlay"]["post"]["responses"]["200"]["content"]
    schemas = spec["components"]["schemas"]
    assert schemas["PredictionResponse"]["example"]["decision"] == "anomalous"
    assert "example" in schemas["ErrorResponse"] and "example" in schemas["BatchResponse"]
    for path, operations in paths.items():
        for operation in operations.values():
            assert operation.get("summary") and operation.get("description"), path


def test_cors_is_off_by_default_and_follows_the_setting(
    client: TestClient, bundle: Path, tmp_path: Path
) -> None:
    preflight = {"Origin": "https://line.example", "Access-Control-Request-Method": "POST"}
    assert (
        "access-control-allow-origin" not in client.options("/predict", headers=preflight).headers
    )
    settings = make_settings(bundle, None, cors_origins="https://line.example, https://x.example")
    assert settings.cors_origins == ["https://line.example", "https://x.example"]
    with TestClient(create_app(settings)) as open_client:
        answer = open_client.options("/predict", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://line.example"


def test_serve_exits_non_zero_with_one_line_when_the_model_cannot_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() points logging at captured stderr
    try:
        assert main(["serve", "--model-uri", str(tmp_path / "no-bundle"), "--port", "1"]) == 2
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("loomwatch: error:")]
    assert len(errors) == 1 and "no such bundle folder" in errors[0]


@pytest.mark.slow
def test_loomwatch_serve_answers_on_a_loopback_port(
    bundle: Path, defect_png: bytes, tmp_path: Path
) -> None:
    with live_server(bundle, tmp_path, {"INFERENCE_THREADS": "1"}) as server:
        files = {"file": ("strip.png", defect_png, "image/png")}
        response = httpx2.post(f"{server.url}/predict", files=files, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["decision"] == "anomalous"
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert "server" not in response.headers  # uvicorn's banner is switched off
        assert response.headers["x-content-type-options"] == "nosniff"
        assert server.stop() == 0, server.output
    assert (tmp_path / "inference.jsonl").read_text().count("\n") == 1
