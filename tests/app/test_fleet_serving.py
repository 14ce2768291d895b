"""Serving a fleet (issue 16): one model per fabric in one process, lazily loaded, evicted LRU,
following registry aliases; the fabric named per request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from loomwatch.cli import main
from tests.helpers import FAST_TRAIN, make_settings, sample_images, tracking_client
from tracking.fleet import FLEET_MANIFEST


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(data, fleet folder): two synthetic fabrics, trained once, registered as sv-FF with
    alias champion, in a store of the module's own."""
    from training.synth import generate_dataset

    store = tmp_path_factory.mktemp("fleet-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.as_posix()}/mlflow.db")
        patch.setenv("LOOMWATCH_MODEL_CACHE", str(store / "model-cache"))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        data = tmp_path_factory.mktemp("fleet-data")
        generate_dataset(data, fabrics=2, normal=10, defective=2, seed=5, width=256, height=128,
                         progress=False)  # fmt: skip
        out = store / "fleet"
        args = ["--quiet", "train", "--model", "patchcore", "--data", str(data), *FAST_TRAIN]
        args += ["--fabric", "all", "--out", str(out), "--max-minutes", "2"]
        assert main([*args, "--register", "sv", "--alias", "champion"]) == 0
        yield data, out


def fleet_client(uri: Path, tmp_path: Path, **overrides: object) -> TestClient:
    settings = make_settings(uri, tmp_path / "log.jsonl", model_poll_s=0, **overrides)
    return TestClient(create_app(settings))


def post(client: TestClient, image: bytes, query: dict[str, str] | None = None,
         form: dict[str, str] | None = None) -> Any:  # fmt: skip
    files = {"file": ("strip.png", image, "image/png")}
    return client.post("/predict", files=files, params=query or {}, data=form or {})


@pytest.mark.slow
def test_a_fleet_is_served_per_fabric_lazily_and_evicted_lru(
    fleet: tuple[Path, Path], tmp_path: Path
) -> None:
    data, out = fleet
    image = sample_images(data)[0]
    with fleet_client(out, tmp_path, max_loaded_models=1) as client:
        assert client.get("/ready").json()["status"] == "ready"
        listed = client.get("/models").json()
        assert [(m["fabric"], m["loaded"]) for m in listed["models"]] == [
            ("00", False),
            ("01", False),
        ]
        missing = post(client, image)
        assert missing.status_code == 422 and missing.json()["code"] == "fabric_required"
        unknown = post(client, image, query={"fabric": "07"})
        assert unknown.status_code == 404
        assert "known fabrics: 00, 01" in unknown.json()["detail"]
        by_form = post(client, image, form={"fabric": "00"})
        assert by_form.status_code == 200, by_form.text
        assert by_form.json()["model"]["name"] == "sv-00"
        by_query = post(client, image, query={"fabric": "1"})  # "1" is fabric 01
        assert by_query.status_code == 200 and by_query.json()["model"]["name"] == "sv-01"
        # at most one model loaded: 01 evicted 00
        loaded = [m["fabric"] for m in client.get("/models").json()["models"] if m["loaded"]]
        assert loaded == ["01"]
        details = client.get("/model", params={"fabric": "01"}).json()
        assert details["training"]["fabric"] == "01"
        assert client.get("/model").status_code == 422
        # the fabric is documented as a query parameter and as a form field
        schema = client.get("/openapi.json").json()
        operation = schema["paths"]["/predict"]["post"]
        assert "fabric" in [p["name"] for p in operation["parameters"]]
        body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        form = schema["components"]["schemas"][body.rsplit("/", 1)[1]]
        assert "fabric" in form["properties"] and "404" in operation["responses"]


@pytest.mark.slow
def test_a_moved_alias_is_swapped_in_without_a_restart(
    fleet: tuple[Path, Path], tmp_path: Path
) -> None:
    data, out = fleet
    image = sample_images(data)[0]
    manifest = json.loads((out / FLEET_MANIFEST).read_text())
    with fleet_client(out, tmp_path) as client:
        before = post(client, image, query={"fabric": "00"}).json()
        assert before["model"]["version"] == "1"
        models = client.app.state.fleet  # type: ignore[attr-defined]
        old = models.scorer("00")
        digest = old.model.digest
        assert models.poll() == []  # nothing moved
        # a new version of sv-00 (fabric 01's weights, so that it differs) becomes champion
        version = mlflow.register_model(
            f"runs:/{manifest['fabrics']['01']['run_id']}/model", "sv-00"
        ).version
        tracking_client().set_registered_model_alias("sv-00", "champion", version)
        assert models.poll() == ["00"]
        after = post(client, image, query={"fabric": "00"}).json()
        assert after["model"]["version"] == str(version)
        # a request that still holds the old model finishes on it: it is not closed yet
        assert old.model.detector.predict(image_array(image)).score >= 0.0
        row = next(m for m in client.get("/models").json()["models"] if m["fabric"] == "00")
        assert row["pinned"] == f"models:/sv-00/{version}" and row["digest"] != digest


def image_array(data: bytes) -> Any:
    from models.preprocessing import decode_image

    return decode_image(data)


@pytest.mark.slow
def test_a_fleet_naming_a_missing_version_answers_503_for_that_fabric(
    fleet: tuple[Path, Path], tmp_path: Path
) -> None:
    data, out = fleet
    manifest = json.loads((out / FLEET_MANIFEST).read_text())
    manifest["fabrics"]["00"]["uri"] = "models:/sv-00/99"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / FLEET_MANIFEST).write_text(json.dumps(manifest))  # no bundle folders beside it
    image = sample_images(data)[0]
    with fleet_client(broken, tmp_path) as client:
        refused = post(client, image, query={"fabric": "00"})
        assert refused.status_code == 503
        assert "sv-00" in refused.json()["detail"]
        assert post(client, image, query={"fabric": "01"}).status_code == 200  # others go on
    # a fleet manifest that cannot be read stops start-up with one line
    (broken / FLEET_MANIFEST).write_text("{")
    with pytest.raises(Exception, match="cannot read fleet"), fleet_client(broken, tmp_path):
        pass
