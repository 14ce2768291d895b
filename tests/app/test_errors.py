"""Every refusal: the right status, a JSON body without traces or paths, and the service still
answering afterwards."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.model import StartupError
from bench.hostile import png_header_only
from tests.helpers import make_settings, png_bytes, post_image


def assert_error(response: Any, status: int, code: str, *hidden: Path) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["detail"], body
    assert body["request_id"] == response.headers["X-Request-ID"]
    for leak in ("Traceback", 'File "', ".py", "site-packages", *map(str, hidden)):
        assert leak not in response.text, leak
    return body


def assert_still_serving(client: TestClient, image: bytes) -> None:
    assert client.get("/ready").status_code == 200
    assert post_image(client, image).status_code == 200


@pytest.fixture(scope="module")
def small(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A service with small limits: 30 kB per request body, 40,000 pixels per image."""
    log = tmp_path_factory.mktemp("small") / "inference.jsonl"
    settings = make_settings(bundle, log, max_upload_bytes=30_000, max_pixels=40_000)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def tiny_png(clean_strip: Any) -> bytes:
    return png_bytes(clean_strip[:, :256])  # 128 x 256: within the small service's limits


def test_415_for_types_that_are_not_accepted_images(
    client: TestClient, clean_png: bytes, bundle: Path
) -> None:
    body = assert_error(
        post_image(client, b"plain words", ctype="text/plain"),
        415,
        "unsupported_media_type",
        bundle,
    )
    assert "text/plain" in body["detail"]
    gif = png_bytes(np.zeros((8, 8), np.uint8), fmt="GIF")
    assert_error(post_image(client, gif, ctype="image/gif"), 415, "unsupported_media_type")
    raw = client.post("/predict", content=clean_png, headers={"Content-Type": "image/png"})
    assert "multipart/form-data" in assert_error(raw, 415, "unsupported_media_type")["detail"]
    # declared as anything, the bytes decide: a GIF is still refused
    body = assert_error(
        post_image(client, gif, ctype="application/octet-stream"), 415, "unsupported_media_type"
    )
    assert "GIF" in body["detail"]
    assert_still_serving(client, clean_png)


def test_422_for_undecodable_images_and_bad_parameters(
    client: TestClient, clean_png: bytes, bundle: Path
) -> None:
    assert_error(post_image(client, b"\x00garbage" * 10), 422, "undecodable_image", bundle)
    assert_error(post_image(client, b""), 422, "undecodable_image")
    truncated = assert_error(
        post_image(client, clean_png[: len(clean_png) // 2]), 422, "undecodable_image"
    )
    assert "truncated" in truncated["detail"] or "corrupt" in truncated["detail"]
    body = assert_error(post_image(client, clean_png, threshold=2), 422, "invalid_parameter")
    assert "threshold" in body["detail"] and body["errors"][0]["loc"] == ["query", "threshold"]
    assert_error(post_image(client, clean_png, mask="jpeg"), 422, "invalid_parameter")
    assert_error(post_image(client, clean_png, min_region_area=-1), 422, "invalid_parameter")
    assert_error(post_image(client, clean_png, heatmap="perhaps"), 422, "invalid_parameter")
    body = assert_error(client.post("/predict"), 422, "invalid_parameter")
    assert "file" in body["detail"]
    files = [("files", ("a.png", clean_png, "image/png"))] * 17
    assert_error(client.post("/predict/batch", files=files), 422, "too_many_files")
    assert_still_serving(client, clean_png)


def test_413_for_bodies_over_the_limit_declared_or_streamed(
    small: TestClient, tiny_png: bytes, clean_png: bytes
) -> None:
    assert len(clean_png) > 30_000 > len(tiny_png)
    body = assert_error(post_image(small, clean_png), 413, "too_large")
    assert "30000 bytes" in body["detail"]
    # no Content-Length: the limit is enforced while the stream is read
    boundary = "loomwatch-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(100):  # 1.6 MB in all, far over the limit
            yield b"\x00" * 16_384
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = small.post("/predict", content=chunks(), headers=headers)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_error(response, 413, "too_large")
    assert_still_serving(small, tiny_png)
    refused = 'loomwatch_http_requests_total{method="POST",route="/predict",status="413"} 2.0'
    assert refused in small.get("/metrics").text


def test_413_when_the_header_declares_too_many_pixels(
    small: TestClient, client: TestClient, tiny_png: bytes, clean_png: bytes
) -> None:
    body = assert_error(post_image(small, png_header_only(5000, 5000)), 413, "too_many_pixels")
    assert "5000x5000" in body["detail"] and "40000" in body["detail"]
    # a header beyond Pillow's own bomb guard is refused the same way, before any decoding
    huge = png_header_only(100_000, 100_000)
    assert_error(post_image(client, huge), 413, "too_many_pixels")
    assert_error(post_image(small, clean_png[:25_000]), 413, "too_many_pixels")  # 512 x 128
    assert_still_serving(small, tiny_png)


def test_401_without_a_valid_key_on_every_route_but_health_and_ready(
    bundle: Path, clean_png: bytes, tmp_path: Path
) -> None:
    settings = make_settings(bundle, tmp_path / "log.jsonl", api_key="s3cret-key")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        for method, route in [("get", "/model"), ("get", "/metrics"), ("post", "/predict/batch")]:
            assert_error(client.request(method, route), 401, "unauthorized")
        response = post_image(client, clean_png)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"
        wrong = {"X-API-Key": "s3cret-kez"}
        assert_error(
            client.post("/predict", files={"file": ("a.png", clean_png)}, headers=wrong),
            401,
            "unauthorized",
        )
        assert "s3cret" not in response.text
        for headers in ({"X-API-Key": "s3cret-key"}, {"Authorization": "Bearer s3cret-key"}):
            ok = client.post("/predict", files={"file": ("a.png", clean_png)}, headers=headers)
            assert ok.status_code == 200, ok.text
            assert client.get("/model", headers=headers).status_code == 200


def test_503_with_retry_after_when_the_model_is_not_ready(
    bundle: Path, clean_png: bytes, tmp_path: Path
) -> None:
    app = create_app(make_settings(bundle, tmp_path / "log.jsonl"))
    client = TestClient(app)  # no `with`: start-up has not run, no model is loaded
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert ready.json()["status"] == "not_ready" and "not loaded" in ready.json()["reason"]
    response = post_image(client, clean_png)
    assert_error(response, 503, "not_ready")
    assert int(response.headers["Retry-After"]) >= 1
    assert_error(client.get("/model"), 503, "not_ready")
    assert client.get("/health").status_code == 200
    with client:  # now start-up runs
        assert_still_serving(client, clean_png)


def test_503_with_retry_after_when_the_queue_is_full_or_too_slow(
    bundle: Path, clean_png: bytes, tmp_path: Path
) -> None:
    settings = make_settings(
        bundle, tmp_path / "log.jsonl", max_queue_depth=1, request_timeout_s=0.3
    )
    with TestClient(create_app(settings)) as client:
        pool = client.app.state.scorer.pool  # type: ignore[attr-defined]
        release = threading.Event()
        busy = pool.submit(lambda: release.wait(30))  # the one worker is taken
        # one request may wait (queue depth 1): it times out after 0.3 s
        body = assert_error(post_image(client, clean_png), 503, "timeout")
        assert "0.3 s" in body["detail"]
        waiting = pool.submit(lambda: None)  # fills the queue
        response = post_image(client, clean_png)
        assert_error(response, 503, "busy")
        assert response.headers["Retry-After"] == "1"
        release.set()
        busy.result(timeout=10)
        waiting.result(timeout=10)
        assert_still_serving(client, clean_png)
        metrics = client.get("/metrics").text
        assert 'loomwatch_inference_rejected_total{reason="queue_full"} 1.0' in metrics
        assert 'loomwatch_inference_rejected_total{reason="timeout"} 1.0' in metrics


def test_404_and_405_are_json_too(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")


@pytest.mark.parametrize("problem", ["unset", "missing", "broken"])
def test_start_up_stops_with_one_clear_message(problem: str, bundle: Path, tmp_path: Path) -> None:
    uri: Path | None = tmp_path / "nothing-here"
    if problem == "unset":
        uri = None
    elif problem == "broken":
        uri = tmp_path / "broken"
        uri.mkdir()
        (uri / "manifest.json").write_text("{not json")
    settings = make_settings(bundle, tmp_path / "log.jsonl", model_uri=uri and str(uri))
    app = create_app(settings)
    with pytest.raises(StartupError) as caught, TestClient(app):
        pass
    message = str(caught.value)
    assert "\n" not in message and message == app.state.startup_error
    expected = {"unset": "MODEL_URI", "missing": "no such bundle", "broken": "manifest.json"}
    assert expected[problem] in message
