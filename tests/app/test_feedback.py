"""The feedback database: /predict records what it scored, /predictions lists it, feedback lands
in real rows (SQLite through SQLAlchemy, schema by the Alembic migrations), the API key guards
it all, bad feedback is refused, a database that is down answers 503 for feedback while scoring
goes on, and images are kept only when asked, within their retention bound."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import create_engine

from app.feedback.store import (
    FeedbackStore,
    FeedbackUnavailableError,
    NewPrediction,
    alembic_config,
)
from app.feedback.tables import NOTE_MAX_CHARS, Base
from app.main import create_app
from app.model import StartupError
from models.overlay import render_thumbnail
from models.pipeline import Detector
from tests.helpers import make_settings, post_image


def service(bundle: Path, database: Path | str | None, **overrides: Any) -> TestClient:
    url = f"sqlite:///{database}" if isinstance(database, Path) else database
    return TestClient(create_app(make_settings(bundle, None, database_url=url, **overrides)))


def rows(database: Path, query: str) -> list[tuple[Any, ...]]:
    """Straight from the file, with Python's own sqlite3: what is really stored."""
    with sqlite3.connect(database) as connection:
        return connection.execute(query).fetchall()


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback") / "feedback.db"


@pytest.fixture(scope="module")
def recording(bundle: Path, database: Path) -> Iterator[TestClient]:
    with service(bundle, database) as client:
        yield client


def test_a_prediction_is_recorded_and_feedback_lands_in_its_row(
    recording: TestClient, database: Path, defect_png: bytes
) -> None:
    answer = post_image(recording, defect_png).json()
    prediction_id = answer["prediction_id"]
    assert prediction_id and len(prediction_id) == 32

    listed = recording.get("/predictions").json()
    mine = next(item for item in listed["items"] if item["id"] == prediction_id)
    assert mine["image_sha256"] == hashlib.sha256(defect_png).hexdigest()
    assert mine["decision"] == answer["decision"] == "anomalous"
    assert mine["score"] == pytest.approx(answer["score"])
    assert mine["model"]["version"] == answer["model"]["version"]
    assert mine["model"]["weights_digest"].startswith("sha256:")
    assert mine["kept_regions"] == len(answer["regions"]) >= 1
    assert mine["kept_area"] == sum(region["area"] for region in answer["regions"])
    assert mine["regions"]["kept"][0]["bbox"] == answer["regions"][0]["bbox"]
    assert mine["has_thumbnail"] and not mine["has_image"] and mine["verdict"] is None
    thumbnail = recording.get(f"/predictions/{prediction_id}/thumbnail")
    assert thumbnail.headers["content-type"] == "image/png"
    assert thumbnail.content.startswith(b"\x89PNG")

    body = {"verdict": "false_alarm", "note": "selvage fold", "reviewer": "line 3"}
    given = recording.post(f"/predictions/{prediction_id}/feedback", json=body)
    assert given.status_code == 201, given.text
    assert given.json()["verdict"] == "false_alarm"
    stored = rows(
        database,
        "SELECT f.verdict, f.note, f.reviewer, p.decision, p.image_sha256, p.model_version "
        f"FROM feedback f JOIN predictions p ON p.id = f.prediction_id "
        f"WHERE p.id = '{prediction_id}'",
    )
    assert stored == [
        (
            "false_alarm",
            "selvage fold",
            "line 3",
            "anomalous",
            hashlib.sha256(defect_png).hexdigest(),
            answer["model"]["version"],
        )
    ]
    again = recording.post(
        f"/predictions/{prediction_id}/feedback", json={"verdict": "real_defect"}
    )
    assert again.status_code == 201
    record = recording.get(f"/predictions/{prediction_id}").json()
    assert record["verdict"] == "real_defect"  # the newest counts; both are kept
    assert [item["verdict"] for item in record["feedback"]] == ["false_alarm", "real_defect"]
    metrics = recording.get("/metrics").text
    assert 'loomwatch_feedback_total{verdict="false_alarm"} 1.0' in metrics


def test_the_list_filters_by_decision_and_verdict(
    recording: TestClient, clean_png: bytes, defect_png: bytes
) -> None:
    normal = post_image(recording, clean_png).json()
    anomalous = post_image(recording, defect_png).json()
    assert (normal["decision"], anomalous["decision"]) == ("normal", "anomalous")
    missed = {"verdict": "missed_defect", "note": "thin weft crack"}
    recording.post(f"/predictions/{normal['prediction_id']}/feedback", json=missed)

    def ids(**query: Any) -> list[str]:
        return [item["id"] for item in recording.get("/predictions", params=query).json()["items"]]

    assert normal["prediction_id"] in ids(decision="normal")
    assert normal["prediction_id"] not in ids(decision="anomalous")
    assert anomalous["prediction_id"] in ids(decision="anomalous")
    assert ids(verdict="missed_defect") == [normal["prediction_id"]]
    unreviewed = ids(verdict="none", decision="anomalous")
    assert anomalous["prediction_id"] in unreviewed and normal["prediction_id"] not in unreviewed
    assert recording.get("/predictions", params={"verdict": "maybe"}).status_code == 422
    assert ids(limit=1) == [anomalous["prediction_id"]]  # newest first
    assert ids(fabric="no-such-fabric") == []


def test_batch_predictions_are_recorded_each(recording: TestClient, clean_png: bytes) -> None:
    files = [("files", (f"strip-{n}.png", clean_png, "image/png")) for n in range(2)]
    items = recording.post("/predict/batch", files=files).json()["items"]
    found = {item["result"]["prediction_id"] for item in items}
    assert len(found) == 2 and None not in found
    for prediction_id in found:
        assert recording.get(f"/predictions/{prediction_id}").status_code == 200


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"verdict": "looks_fine"}, "verdict"),
        ({"verdict": "false_alarm", "note": "x" * (NOTE_MAX_CHARS + 1)}, "note"),
        ({"verdict": "false_alarm", "reviewer": "r" * 65}, "reviewer"),
        ({"verdict": "false_alarm", "admin": True}, "admin"),
        ({}, "verdict"),
    ],
)
def test_bad_feedback_is_refused_with_422(
    recording: TestClient, clean_png: bytes, body: dict[str, Any], where: str
) -> None:
    prediction_id = post_image(recording, clean_png).json()["prediction_id"]
    answer = recording.post(f"/predictions/{prediction_id}/feedback", json=body)
    assert answer.status_code == 422
    assert where in answer.json()["detail"]
    assert recording.get(f"/predictions/{prediction_id}").json()["feedback"] == []


def test_an_unknown_prediction_is_404(recording: TestClient) -> None:
    for path in ("/predictions/0123456789abcdef0123456789abcdef", "/predictions/nope/thumbnail"):
        answer = recording.get(path)
        assert answer.status_code == 404
        assert answer.json()["code"] == "unknown_prediction"
    given = recording.post(
        "/predictions/" + "f" * 32 + "/feedback", json={"verdict": "false_alarm"}
    )
    assert given.status_code == 404 and given.json()["code"] == "unknown_prediction"
    assert recording.get("/predictions/" + "x" * 65).status_code == 422  # bounded


def test_the_api_key_guards_the_feedback_routes(
    bundle: Path, tmp_path: Path, clean_png: bytes
) -> None:
    with service(bundle, tmp_path / "keyed.db", api_key="s3cret") as client:
        keyed = {"X-API-Key": "s3cret"}
        files = {"file": ("strip.png", clean_png, "image/png")}
        prediction_id = client.post("/predict", files=files, headers=keyed).json()["prediction_id"]
        feedback = f"/predictions/{prediction_id}/feedback"
        for method, path in (
            ("GET", "/predictions"),
            ("GET", f"/predictions/{prediction_id}"),
            ("GET", f"/predictions/{prediction_id}/thumbnail"),
            ("POST", feedback),
        ):
            refused = client.request(method, path, json={"verdict": "false_alarm"})
            assert refused.status_code == 401, path
            wrong = {"X-API-Key": "guess"}
            assert client.request(method, path, headers=wrong).status_code == 401, path
        given = client.post(feedback, json={"verdict": "false_alarm"}, headers=keyed)
        assert given.status_code == 201
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.get("/predictions", headers=bearer).json()["count"] == 1


def test_a_database_that_is_down_gets_503_for_feedback_while_scoring_goes_on(
    bundle: Path, tmp_path: Path, clean_png: bytes
) -> None:
    database = tmp_path / "down.db"
    with service(bundle, database) as client:
        prediction_id = post_image(client, clean_png).json()["prediction_id"]
        assert prediction_id
        stored = database.read_bytes()
        database.unlink()
        database.mkdir()  # the file gone, a folder in its place: nothing can open it
        scored = post_image(client, clean_png)
        assert scored.status_code == 200 and scored.json()["prediction_id"] is None
        for answer in (
            client.post(f"/predictions/{prediction_id}/feedback", json={"verdict": "false_alarm"}),
            client.get("/predictions"),
        ):
            assert answer.status_code == 503
            assert answer.json()["code"] == "database_unavailable"
            assert "Retry-After" in answer.headers
            assert "unable to open database file" in answer.json()["detail"]
        assert client.get("/ready").status_code == 200
        metrics = client.get("/metrics").text
        assert "loomwatch_feedback_database_failures_total 3.0" in metrics

        database.rmdir()
        database.write_bytes(stored)  # back: feedback works again, nothing lost
        given = client.post(
            f"/predictions/{prediction_id}/feedback", json={"verdict": "real_defect"}
        )
        assert given.status_code == 201


def test_a_database_down_at_start_up_does_not_stop_the_service(
    bundle: Path, tmp_path: Path, clean_png: bytes
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with service(bundle, blocker / "feedback.db") as client:
        assert client.get("/ready").status_code == 200
        scored = post_image(client, clean_png)
        assert scored.status_code == 200 and scored.json()["prediction_id"] is None
        assert client.get("/predictions").status_code == 503


def test_without_a_database_feedback_is_503_and_predict_answers_no_id(
    bundle: Path, clean_png: bytes
) -> None:
    with service(bundle, None) as client:
        assert post_image(client, clean_png).json()["prediction_id"] is None
        answer = client.get("/predictions")
        assert answer.status_code == 503 and "DATABASE_URL" in answer.json()["detail"]


def test_a_malformed_database_url_stops_start_up_in_one_line(bundle: Path) -> None:
    with pytest.raises(StartupError, match="DATABASE_URL") as raised:  # noqa: SIM117
        with service(bundle, "not a url"):
            pass
    assert "\n" not in str(raised.value)


def test_images_are_kept_only_when_asked_and_only_within_retention(
    bundle: Path, tmp_path: Path, defect_png: bytes
) -> None:
    with service(bundle, tmp_path / "plain.db") as client:
        prediction_id = post_image(client, defect_png).json()["prediction_id"]
        assert client.get(f"/predictions/{prediction_id}/image").status_code == 404
    images = tmp_path / "kept"
    database = tmp_path / "kept.db"
    with service(bundle, database, feedback_image_dir=images) as client:
        prediction_id = post_image(client, defect_png).json()["prediction_id"]
        kept = client.get(f"/predictions/{prediction_id}/image")
        assert kept.content == defect_png and kept.headers["content-type"] == "image/png"
        assert [path.read_bytes() for path in images.rglob("*.png")] == [defect_png]

    store = FeedbackStore(f"sqlite:///{database}", image_dir=images, retention_days=30)
    assert store.purge_expired(datetime.now(UTC) + timedelta(days=29)) == 0
    assert store.purge_expired(datetime.now(UTC) + timedelta(days=31)) == 1
    assert not list(images.rglob("*.png"))
    row = store.get(prediction_id)
    assert row.image_path is None and row.thumbnail_png is None
    assert row.image_sha256 == hashlib.sha256(defect_png).hexdigest()  # the record stays
    store.close()


def test_thumbnails_can_be_turned_off(bundle: Path, tmp_path: Path, clean_png: bytes) -> None:
    with service(bundle, tmp_path / "bare.db", feedback_thumbnails=False) as client:
        prediction_id = post_image(client, clean_png).json()["prediction_id"]
        assert not client.get(f"/predictions/{prediction_id}").json()["has_thumbnail"]
        assert client.get(f"/predictions/{prediction_id}/thumbnail").status_code == 404


def test_fabric_filter_and_the_fabrics_offered(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'fabrics.db'}")
    base: dict[str, Any] = {
        "request_id": "r", "filename": "a.png", "image_sha256": "0" * 64, "image_format": "PNG",
        "width": 64, "height": 64, "model_name": "m", "model_version": "1",
        "model_digest": "d", "weights_digest": "w", "decision": "normal", "score": 0.2,
        "raw_score": 1.0, "threshold": 0.5, "raw_threshold": 2.0, "regions": {"kept": []},
    }  # fmt: skip
    store.record([NewPrediction(id=f"id{n}", fabric=fabric, **base) for n, fabric in
                  enumerate(["02", "05", "02", None])])  # fmt: skip
    assert store.fabrics() == ["02", "05"]
    assert [row.id for row in store.recent(fabric="02")] == ["id0", "id2"]
    store.close()


def test_the_migrations_build_exactly_the_tables_and_go_back_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'migrated.db'}"
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], "tables.py changed without a migration"
    command.downgrade(alembic_config(url), "base")
    with engine.connect() as connection:
        names = (
            connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")
            .scalars()
            .all()
        )
    assert set(names) <= {"alembic_version"}
    engine.dispose()


def test_the_migrations_write_postgresql_sql(capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL (docker compose's database) gets the same schema: the SQL, written offline."""
    command.upgrade(alembic_config("postgresql://u@localhost/loomwatch"), "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE predictions" in sql and "CREATE TABLE feedback" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql and "BYTEA" in sql
    assert "ON DELETE CASCADE" in sql


def test_a_kept_image_is_removed_when_its_record_fails(tmp_path: Path) -> None:
    images, database = tmp_path / "kept", tmp_path / "gone.db"
    store = FeedbackStore(f"sqlite:///{database}", image_dir=images)
    item = NewPrediction(
        id="a" * 32, request_id="r", filename=None, image_sha256="0" * 64, image_format="PNG",
        width=1, height=1, model_name="m", model_version="1", model_digest="d",
        weights_digest="w", fabric=None, decision="normal", score=0.1, raw_score=0.1,
        threshold=0.5, raw_threshold=0.5, regions={"kept": []}, image=b"pixels",
    )  # fmt: skip
    store.upgrade()
    database.unlink()
    database.mkdir()
    with pytest.raises(FeedbackUnavailableError, match="unable to open database file"):
        store.record([item])
    assert not list(images.rglob("*.*"))  # no image without its record
    store.close()


def test_the_thumbnail_is_drawn_small_and_keeps_small_defects_visible(
    bundle: Path, defect_strip: np.ndarray, clean_strip: np.ndarray
) -> None:
    detector = Detector.from_bundle(bundle)
    wide = np.concatenate([clean_strip, defect_strip, clean_strip, clean_strip], axis=1)
    prediction = detector.predict(wide)  # 2048 x 128: a quarter of its size fits 512 x 128
    assert prediction.post.kept
    small = render_thumbnail(prediction)
    assert small.shape == (32, 512, 3)
    red = (small[..., 2] > 200) & (small[..., 1] < 50) & (small[..., 0] < 50)
    columns = np.flatnonzero(red.any(axis=0))
    for region in prediction.post.kept:  # each kept region boxed where it is, scaled
        assert any(abs(c - region.x / 4) <= 2 for c in columns), (region.x, columns)
    calm = render_thumbnail(detector.predict(np.concatenate([clean_strip] * 4, axis=1)))
    assert not ((calm[..., 2] > 200) & (calm[..., 1] < 50) & (calm[..., 0] < 50)).any()
