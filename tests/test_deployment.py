"""The deployment files, checked statically (no Docker, no podman): the mistakes that would
only show on a user's machine or on Render. `make container-test` builds and starts the image.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {name.upper() for name in Settings.model_fields}
# variables the image or its tools read besides Settings
OTHER_ENV = {"PATH", "HOME", "MPLCONFIGDIR", "OMP_NUM_THREADS", "LOOMWATCH_MODEL_CACHE"}
OTHER_ENV_PREFIXES = ("PYTHON", "MLFLOW_")

# Render Blueprint fields (render.com/docs/blueprint-spec) that a web service can carry.
RENDER_ROOT_FIELDS = {"services", "databases", "envVarGroups", "projects", "ungrouped", "previews"}
RENDER_SERVICE_FIELDS = {
    "type", "name", "runtime", "plan", "region", "repo", "branch", "rootDir", "image",
    "dockerfilePath", "dockerContext", "dockerCommand", "registryCredential", "buildCommand",
    "startCommand", "preDeployCommand", "healthCheckPath", "envVars", "autoDeploy",
    "autoDeployTrigger", "numInstances", "scaling", "disk", "domains", "buildFilter",
    "maxShutdownDelaySeconds", "previews", "ipAllowList", "initialDeployHook",
}  # fmt: skip
RENDER_PLANS = {"free", "starter", "standard", "pro", "pro_plus", "pro_max", "pro_ultra"}
RENDER_ENV_SOURCES = {"value", "generateValue", "sync", "fromDatabase", "fromService", "fromGroup"}


def env_name_known(name: str) -> bool:
    return name in SETTINGS or name in OTHER_ENV or name.startswith(OTHER_ENV_PREFIXES)


# ---- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, base, instructions from its FROM on) of every stage, in order; unnamed: ''."""
    found: list[tuple[str, str, list[tuple[str, str]]]] = []
    for op, args in dockerfile_instructions():
        if op == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append((name, words[0], []))
        if found:
            found[-1][2].append((op, args))
    return found


def stage(name: str | None = None) -> list[tuple[str, str]]:
    """A stage's instructions with those of the stages it is built FROM: the image it makes
    (`name`, e.g. the `--target`; None: the last stage, what a plain `docker build` makes)."""
    everything = stages()
    index = len(everything) - 1 if name is None else [n for n, _, _ in everything].index(name)
    _, base, instructions = everything[index]
    earlier = {n: i for i, (n, _, _) in enumerate(everything[:index]) if n}
    inherited = stage(everything[earlier[base]][0]) if base in earlier else []
    return inherited + instructions


def final_stage() -> list[tuple[str, str]]:
    return stage(None)


def env_keys(args: str) -> list[str]:
    return re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", args)


def test_dockerfile_base_image_is_a_build_argument_defaulting_to_official_slim_python() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "ARG"
    name, _, default = instructions[0][1].partition("=")
    assert name == "BASE_IMAGE"
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", default), default
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a final stage"
    named: set[str] = set()
    for name, base, _ in stages():  # the base image, or a stage built before
        assert base == "${BASE_IMAGE}" or base in named, base
        named.add(name)


def test_dockerfile_installs_cpu_only_torch_from_an_index_build_argument() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.partition("=")[::2] for op, a in instructions if op == "ARG")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    installs = [a for op, a in instructions if op == "RUN" and "pip install" in a]
    assert '--index-url "${TORCH_INDEX_URL}"' in installs[0] and "torch==" in installs[0]


def test_final_stage_runs_as_non_root_with_healthcheck_and_serving_command() -> None:
    stage = final_stage()
    users = [args for op, args in stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "COPY" and args.startswith("--from=") for op, args in stage)
    assert not any(op == "RUN" and "pip install" in args for op, args in stage)
    (health,) = [args for op, args in stage if op == "HEALTHCHECK"]
    assert "/health" in health
    (cmd,) = [args for op, args in stage if op == "CMD"]
    assert cmd == '["loomwatch", "serve"]'


def test_the_full_image_installs_the_train_extra_with_cpu_torch_installed_first() -> None:
    (_, _, build), *_ = stages()
    installs = [args for op, args in build if op == "RUN" and "pip install" in args]
    assert "torch==" in installs[0] and '"/src[train,postgres]"' in installs[1]


def test_the_slim_target_serves_an_exported_model_without_torch_as_the_full_one_does() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    slim, full = stage("slim"), final_stage()
    build = stage("slim-build")
    runtime = dict(a.partition("=")[::2] for op, a in build if op == "ARG")["SLIM_RUNTIME"]
    assert runtime == "onnxruntime" and {"onnxruntime", "openvino"} <= set(extras)
    (install,) = [args for op, args in build if op == "RUN" and "pip install" in args]
    assert '"/src[${SLIM_RUNTIME}]"' in install and "torch" not in install.split("&&")[1]
    assert "m.export or sys.exit" in " ".join(a for op, a in build if op == "RUN")
    assert ("COPY", "--from=slim-build /opt/venv /opt/venv") in slim
    assert not any(op == "COPY" and "--from=build" in args for op, args in slim)
    assert not any(op == "RUN" and "pip install" in args for op, args in slim)
    # the same user, settings, health check and command as the full image
    shared = {"USER", "ENV", "HEALTHCHECK", "CMD", "WORKDIR", "EXPOSE"}
    assert [i for i in slim if i[0] in shared] == [i for i in full if i[0] in shared]


def test_final_stage_environment_names_real_settings() -> None:
    env = [key for op, args in final_stage() if op == "ENV" for key in env_keys(args)]
    assert {"HOST", "PORT", "MODEL_URI"} <= set(env)
    assert [key for key in env if not env_name_known(key)] == []
    text = " ".join(args for op, args in final_stage() if op == "ENV")
    assert "HOST=0.0.0.0" in text and "MODEL_URI=/app/model" in text


# ---- .dockerignore ----------------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        body = body.removeprefix("**/")
        if any(
            fnmatch.fnmatchcase(prefix, body) or fnmatch.fnmatchcase(prefix.split("/")[-1], body)
            for prefix in prefixes
            if "/" not in body or prefix.count("/") == body.count("/")
        ):
            verdict = not negated
    return verdict


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    ["runs/pc-02/weights.safetensors", "mlruns/1/a/artifacts/x", "mlflow.db", ".venv/bin/python",
     "data/synth/Defect_images/a.png", ".loomwatch/inference.jsonl", ".git/HEAD",
     "app/__pycache__/main.cpython-311.pyc", "tests/test_deployment.py", "aitex-dev/x.png"],
)  # fmt: skip
def test_dockerignore_keeps_data_stores_and_caches_out(path: str) -> None:
    assert ignored(path, dockerignore())


def test_every_copied_source_is_in_the_build_context() -> None:
    patterns = dockerignore()
    sources: list[str] = []
    for op, args in dockerfile_instructions():
        if op == "COPY" and not args.startswith("--from="):
            sources += [s for s in args.split()[:-1] if not s.startswith("--")]
    sources = [s.replace("${BUNDLE_DIR}", "deploy/no-bundle") for s in sources]
    assert "deploy/no-bundle" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file()
            and "__pycache__" not in p.parts
        ]  # fmt: skip
        assert files and not [f for f in files if ignored(f, patterns)], source
    assert not ignored("deploy/bundles/fabric-02/weights.safetensors", patterns)


# ---- docker-compose.yml -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def default_of(value: str, variable: str) -> str:
    match = re.search(rf"\$\{{{variable}:-([^}}]*)\}}", value)
    assert match, f"{value} does not default ${variable}"
    return match.group(1)


def ours(services: dict[str, Any]) -> list[dict[str, Any]]:
    """The services that run the Loomwatch image (not PostgreSQL, Prometheus, Grafana)."""
    return [service for service in services.values() if "build" in service]


def test_compose_services_profiles_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"mlflow", "trainer", "api", "postgres"} <= set(services)
    assert services["trainer"]["profiles"] == ["train"]
    assert "profiles" not in services["api"] and "profiles" not in services["mlflow"]
    api_deps = services["api"]["depends_on"]
    assert api_deps["mlflow"]["condition"] == "service_healthy"
    assert api_deps["trainer"] == {"condition": "service_completed_successfully", "required": False}
    assert services["trainer"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["trainer"]["restart"] == "no"
    assert services["mlflow"]["healthcheck"]["test"][0] == "CMD"
    assert api_deps["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    for service in ours(services):
        assert service["build"]["context"] == "."
        if "gpu" in service.get("profiles", []):  # the GPU image: test_compose_gpu_profile
            continue
        assert service["image"] == services["api"]["image"], "one image for all services"


def test_compose_gpu_profile_reserves_a_gpu_for_the_gpu_image(compose: dict[str, Any]) -> None:
    """Profile gpu: a trainer and an API built from the Dockerfile's gpu target, each with a
    device reservation; DEVICE=cuda (no silent CPU fallback); the trainer runs the CPU one's
    script; the API serves the same champion on its own port."""
    services = compose["services"]
    names = {name for name, service in services.items() if "gpu" in service.get("profiles", [])}
    assert names == {"trainer-gpu", "api-gpu"}
    gpu = stage("gpu")
    assert "DEVICE=cuda" in " ".join(args for op, args in gpu if op == "ENV")
    assert any(op == "COPY" and args.startswith("--from=gpu-build") for op, args in gpu)
    installs = [args for op, args in stage("gpu-build") if op == "RUN" and "pip install" in args]
    assert '--index-url "${GPU_TORCH_INDEX_URL}"' in installs[0]
    assert "torch.version.cuda" in installs[0]  # the build fails on a CPU-only torch
    for name in names:
        service = services[name]
        assert service["build"] == {"context": ".", "target": "gpu"}
        assert service["image"] != services["api"]["image"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["trainer-gpu"]["command"] == services["trainer"]["command"]
    api = services["api-gpu"]
    assert api["environment"]["MODEL_URI"] == services["api"]["environment"]["MODEL_URI"]
    assert default_of(api["environment"]["DEVICE"], "GPU_DEVICE") == "cuda"
    assert [key for key in api["environment"] if not env_name_known(key)] == []
    assert api["ports"] != services["api"]["ports"]


def test_compose_api_serves_what_the_trainer_registers(compose: dict[str, Any]) -> None:
    api, trainer = compose["services"]["api"], compose["services"]["trainer"]
    name = default_of(trainer["environment"]["MODEL_NAME"], "MODEL_NAME")
    assert api["environment"]["MODEL_URI"] == f"models:/${{MODEL_NAME:-{name}}}@champion"
    script = trainer["command"][-1]
    assert '--register "$$MODEL_NAME"' in script
    assert 'promote "$$MODEL_NAME"' in script
    for env in (api["environment"], trainer["environment"]):
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--port=5000" in compose["services"]["mlflow"]["command"]
    assert [key for key in api["environment"] if not env_name_known(key)] == []


def test_compose_trainer_script_leaves_its_variables_to_the_shell(compose: dict[str, Any]) -> None:
    """A single `$` would be filled in by compose from the host's environment, not the shell."""
    script = compose["services"]["trainer"]["command"][-1]
    assert re.findall(r"(?<!\$)\$(?!\$)[{(A-Za-z_]", script.replace("$$", "")) == []


def test_compose_volumes_are_declared_and_owned_by_the_service_user(
    compose: dict[str, Any],
) -> None:
    declared = set(compose["volumes"])
    dockerfile = " ".join(args for op, args in final_stage() if op == "RUN")
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            if "build" not in service:  # another image: its own folders (and our config files)
                if not volume.startswith("./"):
                    used.add(volume.split(":")[0])
                continue
            match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(:.*)?", volume)
            assert match, volume
            source, target = match.group(1), match.group(2)
            name = default_of(source, "TRAIN_DATA") if source.startswith("${") else source
            used.add(name)
            assert target in dockerfile, f"{target}: create it in the image for the user to own"
    assert used == declared
    command = " ".join(compose["services"]["mlflow"]["command"])
    mounts = [v.split(":")[1] for v in compose["services"]["mlflow"]["volumes"]]
    assert f"sqlite:///{mounts[0]}/mlflow.db" in command
    assert f"--artifacts-destination={mounts[1]}" in command


# ---- monitoring (compose profile `monitoring`) -------------------------------------------------

MONITORING = ROOT / "deploy" / "monitoring"


def exported_metrics() -> set[str]:
    """Every series name the service's /metrics can carry (counters end in _total, histograms
    in _bucket, _sum and _count)."""
    from app.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
    return names


def test_compose_monitoring_profile_scrapes_the_api(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    assert "8000" in services["api"]["ports"][0]
    key_file = job["authorization"]["credentials_file"]
    assert key_file in services["prometheus"]["entrypoint"][-1]  # written from API_KEY
    assert "API_KEY" in services["prometheus"]["environment"]
    mounted = [v.split(":")[1] for v in services["prometheus"]["volumes"]]
    assert set(config["rule_files"]) <= set(mounted)


def test_the_dashboard_and_the_alert_use_metrics_the_service_exports() -> None:
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "loomwatch.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [v["definition"] for v in dashboard["templating"]["list"]]
    alerts = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    expressions += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    used = {name for expr in expressions for name in re.findall(r"loomwatch_[a-z_]+", expr)}
    assert used and used <= exported_metrics(), used - exported_metrics()
    drift = {"loomwatch_score_drift_psi", "loomwatch_score_drift_ks", "loomwatch_feedback_total",
             "loomwatch_window_anomaly_rate", "loomwatch_window_kept_area_mean"}  # fmt: skip
    assert drift <= used
    datasource = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel["targets"]}
    assert uids == {datasource["uid"]}


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="no promtool (apt-get install prometheus)"
)
def test_promtool_accepts_the_rules_and_their_unit_test() -> None:
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts-test.yml"]):
        done = subprocess.run(
            ["promtool", *command], cwd=MONITORING, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


# ---- render.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def render() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "render.yaml").read_text())
    return loaded


def test_render_blueprint_uses_documented_fields(render: dict[str, Any]) -> None:
    assert set(render) <= RENDER_ROOT_FIELDS
    (service,) = render["services"]
    assert set(service) <= RENDER_SERVICE_FIELDS, set(service) - RENDER_SERVICE_FIELDS
    assert service["type"] == "web" and service["runtime"] == "docker"
    assert service["plan"] in RENDER_PLANS and service["plan"] not in ("free", "starter")
    assert (ROOT / service["dockerfilePath"]).is_file()
    assert (ROOT / service["dockerContext"]).is_dir()
    for entry in service["envVars"]:
        assert set(entry) <= {"key"} | RENDER_ENV_SOURCES
        assert len(set(entry) & RENDER_ENV_SOURCES) == 1, entry
        assert "value" not in entry or isinstance(entry["value"], str), entry
        assert env_name_known(entry["key"]), entry["key"]


def test_render_secrets_and_model_are_not_in_the_file(render: dict[str, Any]) -> None:
    env = {entry["key"]: entry for entry in render["services"][0]["envVars"]}
    assert env["API_KEY"] == {"key": "API_KEY", "generateValue": True}
    for key in ("MODEL_URI", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key].get("sync") is False
    assert env["INFERENCE_THREADS"]["value"] == "1"


def test_render_health_check_path_is_a_route_that_needs_no_key(render: dict[str, Any]) -> None:
    path = render["services"][0]["healthCheckPath"]
    client = TestClient(
        create_app(Settings(api_key=SecretStr("secret")))
    )  # no lifespan: no model loaded
    assert client.get(path).status_code in (200, 503)  # 503 until the model is ready
    assert client.get("/model").status_code == 401
