"""Faults around the service: SIGTERM with requests in flight, a bundle broken at start, the
MLflow tracking server down at start, and an inference log on a full or refusing disk."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter

import app.inference_log
from app.inference_log import InferenceLog
from app.main import create_app
from bench.hostile import BOUNDARY, MULTIPART_STREAM_TYPE
from bench.live_server import free_port, live_server
from loomwatch.cli import main
from models.bundle import WEIGHTS
from tests.helpers import make_settings, metric, post_image, wait_until


def socket_inodes(pid: int) -> set[str]:
    """The sockets a process holds open (``socket:[inode]`` links in /proc/<pid>/fd)."""
    links = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            links.add(os.readlink(fd))
    return {link for link in links if link.startswith("socket:")}


def slow_upload(image: bytes, started: threading.Event, go: threading.Event) -> Iterator[bytes]:
    """A multipart body whose second half is sent only once `go` is set."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    yield image[: len(image) // 2]
    started.set()
    assert go.wait(60)
    yield image[len(image) // 2 :]
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish_refuses_new_ones_and_exits_0(
    bundle: Path, defect_png: bytes, tmp_path: Path
) -> None:
    answers: list[httpx2.Response] = []
    with live_server(bundle, tmp_path, {"INFERENCE_THREADS": "1"}) as server:
        started, go = threading.Event(), threading.Event()

        def in_flight() -> None:
            body = slow_upload(defect_png, started, go)
            headers = {"Content-Type": MULTIPART_STREAM_TYPE}
            answers.append(
                httpx2.post(f"{server.url}/predict", content=body, headers=headers, timeout=60)
            )

        before = socket_inodes(server.process.pid)
        client = threading.Thread(target=in_flight)
        client.start()
        assert started.wait(30)
        # SIGTERM only once the server has accepted the connection (a new socket of its own):
        # it then reads the request line and headers already sent before it checks for shutdown.
        wait_until(lambda: bool(socket_inodes(server.process.pid) - before), 30,
                   "the server to accept the upload's connection")  # fmt: skip
        server.process.send_signal(signal.SIGTERM)

        def refuses_new_connections() -> bool:
            try:
                httpx2.get(f"{server.url}/health", timeout=1)
            except httpx2.ConnectError:
                return True
            return False

        wait_until(refuses_new_connections, 20, "the server to refuse new connections")
        assert server.process.poll() is None, "the server quit with a request in flight"
        go.set()
        client.join(60)
        code = server.process.wait(60)
        output = server.output
    assert len(answers) == 1 and answers[0].status_code == 200, answers and answers[0].text
    assert answers[0].json()["decision"] == "anomalous"
    assert code == 0, output
    assert "Traceback" not in output
    assert (tmp_path / "inference.jsonl").read_text().count("\n") == 1


def run_serve(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() points logging at captured stderr
    try:
        code = main(["serve", *argv, "--port", str(free_port())])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("loomwatch: error:")]


def test_serve_stops_with_one_line_when_the_bundle_is_corrupt(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes((bundle / "manifest.json").read_bytes())
    weights = (bundle / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(weights[: len(weights) // 3])  # cut off mid-file
    code, errors = run_serve(["--model-uri", str(broken)], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert WEIGHTS in errors[0] and "safetensors" in errors[0]


def test_serve_stops_with_one_line_when_the_tracking_server_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("LOOMWATCH_MODEL_CACHE", str(tmp_path / "cache"))
    code, errors = run_serve(["--model-uri", "models:/fabric@champion"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "unreachable" in errors[0] and str(closed) in errors[0]


def unwritable_log(kind: str, tmp_path: Path) -> Path:
    """A log path whose writes fail; skips where this machine cannot make one."""
    if kind == "not a folder":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the log folder should be")
        return blocker / "inference.jsonl"
    if kind == "full disk":
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full here")
        return Path("/dev/full")
    sysfs = Path("/sys/loomwatch-inference.jsonl")  # refuses writes, even root's
    try:
        sysfs.touch()
    except OSError:
        return sysfs
    sysfs.unlink()
    pytest.skip("/sys accepts writes here")


@pytest.mark.parametrize("kind", ["not a folder", "full disk", "read-only file system"])
def test_an_unwritable_inference_log_never_fails_a_request_and_is_counted(
    bundle: Path, defect_png: bytes, kind: str, tmp_path: Path
) -> None:
    path = unwritable_log(kind, tmp_path)
    with TestClient(create_app(make_settings(bundle, path))) as client:
        for _ in range(3):
            assert post_image(client, defect_png).status_code == 200

        def failures() -> float:  # counted by the log's background thread
            return metric(client.get("/metrics").text, "loomwatch_inference_log_failures_total")

        wait_until(lambda: failures() >= 3, 10, "three failed log lines to be counted")
        assert failures() == 3
    # leaving the `with` ran the shutdown, which closed the log on the same disk without raising


def test_closing_the_log_waits_for_a_full_queue_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.inference_log, "QUEUE_SIZE", 2)
    release = threading.Event()
    write = app.inference_log._CountingFileHandler.emit

    def slow_write(self: logging.Handler, record: logging.LogRecord) -> None:
        release.wait(30)
        write(self, record)

    monkeypatch.setattr(app.inference_log._CountingFileHandler, "emit", slow_write)
    registry = CollectorRegistry()
    failures = Counter("failures", "", registry=registry)

    def failed() -> float:
        return registry.get_sample_value("failures_total") or 0.0

    log = InferenceLog(tmp_path / "log.jsonl", 1 << 20, 1, failures)
    for index in range(10):  # one is being written, two wait, seven are dropped and counted
        log.append({"index": index})
    assert failed() >= 7
    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        log.close()  # the stock QueueListener raised queue.Full here
    except queue.Full:  # pragma: no cover - the defect this test guards against
        pytest.fail("closing the inference log raised queue.Full")
    finally:
        timer.join()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) + failed() == 10
