"""Security: response headers, nothing internal in error bodies (500 included), CORS closed
unless configured, the API key compared in constant time, and a checkpoint carrying a pickle
payload refused without running it."""

from __future__ import annotations

import hmac
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.middleware import DOCS_CSP
from app.model import StartupError
from models.bundle import WEIGHTS
from models.patchcore import PatchCoreConfig, WeightsError, build_backbone
from tests.helpers import make_settings, post_image

EXPECTED_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


def assert_secured(response: object, csp: str | None = None) -> None:
    headers = response.headers  # type: ignore[attr-defined]
    for name, value in EXPECTED_HEADERS.items():
        expected = csp if (csp and name == "content-security-policy") else value
        assert headers.get(name) == expected, (name, dict(headers))
    assert "server" not in headers or "uvicorn" not in headers["server"].lower()


def test_security_headers_on_answers_errors_and_docs(client: TestClient, clean_png: bytes) -> None:
    assert_secured(client.get("/health"))
    assert_secured(post_image(client, clean_png))
    assert_secured(post_image(client, b"junk"))  # 422
    assert_secured(client.get("/nowhere"))  # 404
    assert_secured(client.get("/openapi.json"))
    # Swagger UI and ReDoc run from the app's own files (tests/app/test_pages.py)
    assert_secured(client.get("/docs"), csp=DOCS_CSP)
    assert_secured(client.get("/redoc"), csp=DOCS_CSP)


class Marker:
    """Unpickling this creates `path`: harmless proof that a payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.path,))


def pickle_payload(target: Path, marker: Path) -> Path:
    torch.save({"conv1.weight": Marker(marker)}, target)
    assert not marker.exists()
    return target


def test_a_500_has_no_trace_nor_path_and_keeps_id_and_headers(bundle: Path, tmp_path: Path) -> None:
    app = create_app(make_settings(bundle, None))

    @app.get("/explode")
    def explode() -> None:
        raise RuntimeError(f"cannot open {tmp_path}/secret.db")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/explode", headers={"X-Request-ID": "trace-me"})
        assert response.status_code == 500
        body = response.json()
        assert body == {
            "detail": "internal error; see the server log",
            "code": "internal_error",
            "request_id": "trace-me",
        }
        assert response.headers["X-Request-ID"] == "trace-me"
        assert_secured(response)
        assert client.get("/ready").status_code == 200


def test_cors_stays_closed_to_origins_not_configured(bundle: Path) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    for origins in ([], ["https://line.example"]):
        with TestClient(create_app(make_settings(bundle, None, cors_origins=origins))) as client:
            answer = client.options("/predict", headers=preflight)
            assert "access-control-allow-origin" not in answer.headers, origins
            simple = client.get("/health", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in simple.headers, origins


def test_the_api_key_is_compared_in_constant_time(
    bundle: Path, clean_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("app.deps.hmac.compare_digest", spy)
    with TestClient(create_app(make_settings(bundle, None, api_key="k3y-of-the-line"))) as client:
        wrong = client.get("/model", headers={"X-API-Key": "k3y-of-the-lime"})
        right = client.get("/model", headers={"Authorization": "Bearer k3y-of-the-line"})
    assert (wrong.status_code, right.status_code) == (401, 200)
    assert compared == [
        (b"k3y-of-the-lime", b"k3y-of-the-line"),
        (b"k3y-of-the-line", b"k3y-of-the-line"),
    ]


def test_a_bundle_whose_weights_are_a_pickle_is_refused_unrun(bundle: Path, tmp_path: Path) -> None:
    poisoned = tmp_path / "poisoned"
    shutil.copytree(bundle, poisoned)
    marker = tmp_path / "payload-ran"
    pickle_payload(poisoned / WEIGHTS, marker)
    app = create_app(make_settings(poisoned, None))
    with pytest.raises(StartupError) as caught, TestClient(app):
        pass
    assert WEIGHTS in str(caught.value) and "safetensors" in str(caught.value)
    assert not marker.exists()


def test_backbone_weights_carrying_a_pickle_payload_are_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    weights = pickle_payload(tmp_path / "backbone.pt", marker)
    config = PatchCoreConfig(backbone="resnet18", pretrained=False, weights_file=str(weights))
    with pytest.raises(WeightsError, match=r"backbone\.pt"):
        build_backbone(config)
    assert not marker.exists()
    # the same file loaded the unsafe way does run the payload: the marker is a real witness
    torch.load(weights, weights_only=False)
    assert marker.exists()
