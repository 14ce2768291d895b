"""The feedback database on PostgreSQL, the database docker compose gives the API.

A PostgreSQL server that is not there is tested always (a closed loopback port: connection
refused). The rest runs against a real server when LOOMWATCH_TEST_POSTGRES_URL names one (an
empty database it may fill and empty), e.g. Debian's: apt-get install postgresql,
pg_ctlcluster 15 main start, a role and database, then
LOOMWATCH_TEST_POSTGRES_URL=postgresql+psycopg://loomwatch:PASSWORD@127.0.0.1/loomwatch.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.feedback.store import FeedbackStore, alembic_config
from app.feedback.tables import Base
from app.main import create_app
from tests.helpers import free_port, make_settings, post_image

POSTGRES_URL = os.environ.get("LOOMWATCH_TEST_POSTGRES_URL", "")


def test_a_postgresql_server_that_is_not_there_gets_503_and_scoring_goes_on(
    bundle: Path, clean_png: bytes
) -> None:
    url = f"postgresql+psycopg://loomwatch:secret-pw@127.0.0.1:{free_port()}/loomwatch"
    settings = make_settings(bundle, None, database_url=url, database_timeout_s=2)
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        scored = post_image(client, clean_png)
        assert scored.status_code == 200 and scored.json()["prediction_id"] is None
        answer = client.get("/predictions")
        assert answer.status_code == 503 and answer.json()["code"] == "database_unavailable"
        assert "secret-pw" not in answer.text and "***" in answer.json()["detail"]
        assert time.monotonic() - started < 10  # refused at once, not a hang


@pytest.fixture()
def postgres() -> Iterator[str]:
    if not POSTGRES_URL:
        pytest.skip("no PostgreSQL server: set LOOMWATCH_TEST_POSTGRES_URL to run against one")
    command.downgrade(alembic_config(POSTGRES_URL), "base")  # an empty database to start with
    yield POSTGRES_URL
    command.downgrade(alembic_config(POSTGRES_URL), "base")


def test_the_migrations_build_exactly_the_tables_on_postgresql(postgres: str) -> None:
    command.upgrade(alembic_config(postgres), "head")
    engine = create_engine(postgres)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


def test_the_service_records_and_takes_feedback_on_postgresql(
    postgres: str, bundle: Path, defect_png: bytes, clean_png: bytes
) -> None:
    settings = make_settings(bundle, None, database_url=postgres)
    with TestClient(create_app(settings)) as client:
        alarm = post_image(client, defect_png).json()
        normal = post_image(client, clean_png).json()
        body = {"verdict": "false_alarm", "note": "<b>crease</b>", "reviewer": "shift A"}
        feedback = f"/predictions/{alarm['prediction_id']}/feedback"
        assert client.post(feedback, json=body).status_code == 201
        listed = client.get("/predictions", params={"verdict": "none"}).json()
        assert [item["id"] for item in listed["items"]] == [normal["prediction_id"]]
        assert client.get(f"/predictions/{alarm['prediction_id']}/thumbnail").status_code == 200
    engine = create_engine(postgres)
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT p.image_sha256, p.decision, f.verdict, f.note, f.reviewer "
                "FROM predictions p JOIN feedback f ON f.prediction_id = p.id"
            )
        ).one()
    engine.dispose()
    sha = hashlib.sha256(defect_png).hexdigest()
    assert tuple(row) == (sha, "anomalous", "false_alarm", "<b>crease</b>", "shift A")
    store = FeedbackStore(postgres)
    scores = {item.prediction_id: item.label for item in store.labelled_scores()}
    store.close()
    assert scores == {alarm["prediction_id"]: 0, normal["prediction_id"]: 0}
