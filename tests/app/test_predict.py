"""Happy paths of the scoring routes, on a real tiny model and synthetic fabric."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.imaging import rle_decode
from models.preprocessing import ValidAreaSettings
from tests.helpers import DEFECT_CENTRE, HEIGHT, WIDTH, make_settings, png_bytes, post_image

STAGES = {"queue", "decode", "preprocess", "model", "postprocess", "encode", "inference", "total"}


def decode_png_b64(text: str) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels is not None
    return np.asarray(pixels)


def contains(bbox: dict[str, int], x: int, y: int) -> bool:
    inside_x = bbox["x"] <= x < bbox["x"] + bbox["width"]
    return inside_x and bbox["y"] <= y < bbox["y"] + bbox["height"]


def test_predict_finds_the_stain(client: TestClient, defect_png: bytes) -> None:
    response = post_image(client, defect_png)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert body["model"]["name"] == "tiny-patchcore" and body["model"]["type"] == "patchcore"
    assert body["model"]["version"].startswith("sha256:")
    image = body["image"]
    assert (image["width"], image["height"], image["format"], image["mode"]) == (
        WIDTH,
        HEIGHT,
        "PNG",
        "L",
    )
    # the ends of a strip (end_margin, at most a sixteenth of the width) are not tiled
    ends = min(ValidAreaSettings().end_margin, WIDTH // 16)
    assert image["filename"] == "strip.png"
    assert (
        image["tiles"]
        == ((WIDTH - 2 * ends) // 64) * (HEIGHT // 64)
        < (WIDTH // 64) * (HEIGHT // 64)
    )
    # all of the strip but its ends is fabric; the bundle learned no field of view
    assert image["fabric_fraction"] == pytest.approx((WIDTH - 2 * ends) / WIDTH, abs=1e-4)
    assert image["field_of_view"] is None
    assert isinstance(image["map_level"], float)  # the strip's level subtracted (image_level)
    assert image["isolated_peak"] is None  # PatchCore learns none
    assert body["decision"] == "anomalous" and body["is_anomalous"] is True
    assert body["score"] >= body["threshold"] == 0.5
    assert isinstance(body["raw_score"], float) and isinstance(body["raw_threshold"], float)
    assert body["regions"], "the stain must be kept as a region"
    top = body["regions"][0]
    assert contains(top["bbox"], *DEFECT_CENTRE)
    assert top["area"] > 0 and 0.5 <= top["mean"] <= top["peak"] <= 1.0
    log = body["suppression"]
    assert set(log["settings"]) == {
        "min_region_area",
        "min_region_peak",
        "smoothing_sigma",
        "min_valid_fraction",
        "veto_margin",
        "evidence_region",
    }
    assert log["vetoed_decision"] is False
    assert body["decision_reason"].endswith("region(s) kept")
    mask = body["mask"]
    assert (mask["format"], mask["width"], mask["height"]) == ("png", WIDTH, HEIGHT)
    pixels = decode_png_b64(mask["png_base64"])
    assert pixels.shape == (HEIGHT, WIDTH) and pixels[DEFECT_CENTRE[1], DEFECT_CENTRE[0]] == 255
    assert body["heatmap"] is None
    assert set(body["timings_ms"]) >= STAGES and body["timings_ms"]["model"] > 0


def test_a_clean_strip_is_not_flagged(client: TestClient, clean_png: bytes) -> None:
    body = post_image(client, clean_png).json()
    assert body["decision"] == "normal" and body["is_anomalous"] is False
    assert body["score"] < 0.5 and body["regions"] == []
    assert not decode_png_b64(body["mask"]["png_base64"]).any()


def test_rle_mask_matches_png_and_heatmap_on_request(client: TestClient, defect_png: bytes) -> None:
    as_png = post_image(client, defect_png).json()["mask"]
    body = post_image(client, defect_png, mask="rle", heatmap="true").json()
    rle = body["mask"]
    assert rle["format"] == "rle" and rle["png_base64"] is None
    assert sum(rle["counts"]) == WIDTH * HEIGHT
    decoded = rle_decode(rle["counts"], rle["height"], rle["width"])
    assert np.array_equal(decoded, decode_png_b64(as_png["png_base64"]))
    heat = decode_png_b64(body["heatmap"]["png_base64"])
    assert heat.shape == (HEIGHT, WIDTH, 3)
    assert post_image(client, defect_png, mask="none").json()["mask"] is None


def test_query_overrides_change_threshold_and_suppression(
    client: TestClient, defect_png: bytes
) -> None:
    # within the veto margin, suppressing every region turns the alarm off, and the log says so
    vetoed = post_image(
        client, defect_png, min_region_area=100_000, threshold=0.25, veto_margin=1.0
    ).json()
    assert vetoed["threshold"] == 0.25
    log = vetoed["suppression"]
    assert log["settings"]["min_region_area"] == 100_000 and log["settings"]["veto_margin"] == 1.0
    assert vetoed["regions"] == [] and log["regions"]
    assert {region["reason"] for region in log["regions"]} == {"area_below_min"}
    suppressed = log["regions"][0]
    assert contains(suppressed["bbox"], *DEFECT_CENTRE)
    assert {"bbox", "area", "peak", "mean"} <= set(suppressed)
    assert log["vetoed_decision"] is True and vetoed["decision"] == "normal"
    assert vetoed["decision_reason"].startswith("vetoed")
    # the score far above the threshold (beyond the default margin): still an alarm, and the
    # region the score came from is its evidence, kept whatever its area
    body = post_image(client, defect_png, min_region_area=100_000, threshold=0.25).json()
    assert body["suppression"]["vetoed_decision"] is False and body["decision"] == "anomalous"
    assert body["score"] >= 0.25 + body["suppression"]["settings"]["veto_margin"]
    assert len(body["regions"]) == 1 and contains(body["regions"][0]["bbox"], *DEFECT_CENTRE)
    assert body["regions"][0]["area"] < 100_000
    assert all(r["reason"] == "area_below_min" for r in body["suppression"]["regions"])


def test_every_accepted_format_and_mode(client: TestClient, defect_strip: np.ndarray) -> None:
    rgb = np.repeat(defect_strip[..., None], 3, axis=2)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_png = io.BytesIO()
    palette.save(palette_png, format="PNG")
    rgba = np.dstack([rgb, np.full(defect_strip.shape, 255, np.uint8)])
    sixteen = (defect_strip.astype(np.uint16) * 257).astype(np.uint16)
    cases = {
        ("PNG", "RGB"): png_bytes(rgb),
        ("PNG", "RGBA"): png_bytes(rgba),
        ("PNG", "P"): palette_png.getvalue(),
        ("PNG", "I;16"): png_bytes(sixteen),
        ("JPEG", "L"): png_bytes(defect_strip, fmt="JPEG"),
        ("BMP", "L"): png_bytes(defect_strip, fmt="BMP"),
        ("TIFF", "L"): png_bytes(defect_strip, fmt="TIFF"),
    }
    for (fmt, mode), data in cases.items():
        body = post_image(client, data, ctype="application/octet-stream").json()
        assert (body["image"]["format"], body["image"]["mode"]) == (fmt, mode), body
        assert (body["image"]["width"], body["image"]["height"]) == (WIDTH, HEIGHT)
        assert body["decision"] == "anomalous", (fmt, mode, body["score"])


def test_batch_scores_each_image_and_isolates_a_bad_one(
    client: TestClient, defect_png: bytes, clean_png: bytes
) -> None:
    files = [
        ("files", ("stained.png", defect_png, "image/png")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
        ("files", ("clean.png", clean_png, "image/png")),
        ("files", ("broken.png", defect_png[:200], "image/png")),
    ]
    response = client.post("/predict/batch", files=files, params={"mask": "rle"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["count"], body["failed"]) == (4, 2)
    assert body["model"]["type"] == "patchcore"
    items = body["items"]
    assert [item["index"] for item in items] == [0, 1, 2, 3]
    assert [item["status"] for item in items] == [200, 415, 200, 422]
    assert items[0]["result"]["decision"] == "anomalous"
    assert items[0]["result"]["mask"]["format"] == "rle"
    assert items[2]["result"]["decision"] == "normal"
    assert items[1]["error"]["code"] == "unsupported_media_type" and items[1]["result"] is None
    assert items[3]["error"]["code"] == "undecodable_image"
    assert items[0]["result"]["request_id"] == body["request_id"]


def test_overlay_is_a_png_with_the_decision_in_headers(
    client: TestClient, defect_png: bytes
) -> None:
    response = post_image(client, defect_png, route="/predict/overlay")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["X-Loomwatch-Decision"] == "anomalous"
    assert float(response.headers["X-Loomwatch-Score"]) >= 0.5
    assert int(response.headers["X-Loomwatch-Regions"]) >= 1
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == (WIDTH, HEIGHT)
    # the kept region is outlined in red around the stain
    pixels = np.asarray(picture)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.any()


def test_inference_log_has_one_line_per_prediction(
    bundle: Path, defect_png: bytes, tmp_path: Path
) -> None:
    from app.main import create_app

    log_path = tmp_path / "logs" / "inference.jsonl"
    with TestClient(create_app(make_settings(bundle, log_path))) as client:
        single = post_image(client, defect_png).json()
        files = [("files", ("a.png", defect_png, "image/png"))] * 2
        batch = client.post("/predict/batch", files=files).json()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["request_id"] == single["request_id"] and first["route"] == "/predict"
    assert first["model"]["version"] == single["model"]["version"] and first["model"]["digest"]
    assert first["decision"] == "anomalous" and first["score"] == single["score"]
    assert first["regions"] == single["regions"]
    assert first["suppressed"]["settings"] == single["suppression"]["settings"]
    assert len(first["image"]["sha256"]) == 64 and first["time"].endswith("+00:00")
    assert [line["index"] for line in lines[1:]] == [0, 1]
    assert {line["request_id"] for line in lines[1:]} == {batch["request_id"]}


def test_no_column_baseline_is_learned_by_default(bundle: Path) -> None:
    """Measured worse on two AITEX fabrics (docs/fleets.md, "The column baseline")."""
    from models.manifest import read_manifest

    pipeline = read_manifest(bundle).pipeline
    assert pipeline.learn_column_baseline is False and pipeline.column_baseline is None
    # PatchCore remembers its training patches: figures learned on its own training strips
    # would not hold for new ones, so it learns no isolated-peak reference either
    assert pipeline.learn_isolated_peak is True and pipeline.isolated_peak is None
