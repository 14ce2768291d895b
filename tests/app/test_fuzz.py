"""Schemathesis against the service's own OpenAPI schema (a small number of cases here; the
full run, `make reliability`, generates over 500): no 5xx, and every answer matches the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.main import create_app
from bench.fuzz import fuzz
from tests.helpers import HOSTILE_MAX_PIXELS as MAX_PIXELS
from tests.helpers import HOSTILE_MAX_UPLOAD as MAX_UPLOAD
from tests.helpers import hostile_corpus, make_settings

pytestmark = pytest.mark.slow  # fuzzing

KEY = "fuzz-key-0123"
UPLOADS = [item.data for item in hostile_corpus() if not item.streamed]


def test_generated_requests_get_documented_answers_and_never_a_5xx(
    bundle: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        bundle,
        None,
        api_key=KEY,
        max_pixels=MAX_PIXELS,
        max_upload_bytes=MAX_UPLOAD,
        database_url=f"sqlite:///{tmp_path / 'feedback.db'}",  # the feedback routes too
    )
    report = fuzz(create_app(settings), 6, UPLOADS, headers={"X-API-Key": KEY})
    assert report.failures == [], "\n\n".join(report.details.values())
    assert report.cases >= 30 and len(report.by_operation) == 13, report.line()  # with /models
    assert report.statuses[200] > 0 and report.statuses[422] > 0, report.line()
    assert not any(status >= 500 for status in report.statuses)


def test_the_fuzzer_reports_a_server_error(bundle: Path) -> None:
    app = create_app(make_settings(bundle, None))

    @app.get("/broken", summary="Always fails", description="A route with a bug.")
    def broken() -> dict[str, str]:
        raise RuntimeError("a bug")

    report = fuzz(app, 3, UPLOADS)
    assert any(line.startswith("GET /broken: 500") for line in report.failures), report.failures
