"""`loomwatch serve` as a real process on a free loopback port, for tests and benchmarks.

    with live_server(bundle, workdir) as server:
        httpx2.get(f"{server.url}/ready")
        server.rss_kib()                   # VmRSS of the server process
        code = server.stop()               # SIGTERM, then the exit status

The server's output goes to ``workdir/server.log`` (a pipe would fill up and block a busy
server); :attr:`LiveServer.output` reads it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

# Settings a developer's shell may hold that would change what is measured or tested.
_CLEARED = ("MODEL_URI", "API_KEY", "CORS_ORIGINS", "HOST", "PORT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def loomwatch_command() -> list[str]:
    """The `loomwatch` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("loomwatch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loomwatch"]


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_kib(self) -> int:
        """Resident memory of the server process (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc/<pid>/status")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.output}")
            try:
                if httpx2.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout:g} s")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@contextmanager
def live_server(
    model_uri: str | Path,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 120,
) -> Iterator[LiveServer]:
    """Start `loomwatch serve` in `workdir`, wait until /ready answers 200, stop it at the end."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    environment.setdefault("INFERENCE_LOG_PATH", str(workdir / "inference.jsonl"))
    environment.update(env or {})
    log = workdir / "server.log"
    argv = [*loomwatch_command(), "serve", "--model-uri", str(model_uri), "--port", str(port)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1"],
            env=environment,
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", log)
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
