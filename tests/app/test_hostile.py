"""The hostile corpus (bench/hostile.py), posted to /predict and /predict/batch in-process: each
file gets its documented answer, no body shows a trace or a path, and the service keeps
scoring afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from bench.hostile import ROUTES, Hostile, post, problem
from tests.helpers import HOSTILE_MAX_PIXELS as MAX_PIXELS
from tests.helpers import HOSTILE_MAX_UPLOAD as MAX_UPLOAD
from tests.helpers import hostile_corpus, hostile_strip, make_settings, png_bytes

CORPUS = hostile_corpus()


@pytest.fixture(scope="module")
def guarded(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    log = tmp_path_factory.mktemp("hostile") / "inference.jsonl"
    settings = make_settings(bundle, log, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_corpus_covers_what_the_issue_lists() -> None:
    names = " | ".join(item.name for item in CORPUS)
    for kind in ("zero bytes", "random bytes", "truncated PNG", "truncated JPEG", "bomb",
                 "16-bit PNG", "palette PNG", "CMYK JPEG", "EXIF-rotated", "animated GIF",
                 "multi-page TIFF", "TIFF header 100000", "SVG", "HTML", "chunked"):  # fmt: skip
        assert kind in names, kind
    assert {item.status for item in CORPUS} == {200, 413, 415, 422}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("item", CORPUS, ids=lambda item: item.name)
def test_each_hostile_upload_gets_its_documented_answer(
    guarded: TestClient, item: Hostile, route: str, bundle: Path
) -> None:
    response = post(guarded, item, route)
    assert problem(item, route, response, hidden=(str(bundle),)) is None, response.text
    assert guarded.get("/ready").status_code == 200
    follow_up = guarded.post("/predict", files={"file": ("ok.png", png_bytes(hostile_strip()))})
    assert follow_up.status_code == 200, follow_up.text


def test_the_checker_sees_a_wrong_answer(guarded: TestClient) -> None:
    """The corpus check itself can fail: a refused file expected to be scored is reported."""
    refused = next(item for item in CORPUS if item.status == 422)
    wrongly_expected = Hostile(refused.name, refused.filename, refused.content_type,
                               refused.data, 200, "ok")  # fmt: skip
    response = post(guarded, wrongly_expected, "/predict")
    assert "status 422, expected 200" in (problem(wrongly_expected, "/predict", response) or "")
