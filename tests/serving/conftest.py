"""A real Triton Inference Server (PyTriton's) serving the demo artifact on loopback.

The server runs in the serving environment (`.venv-serve`, README "Serving"; or the Python named
by $TWBERT_SERVE_PYTHON): PyTriton pins numpy < 2, so it does not share the main environment.
Tests that need the server skip, saying so, where that environment is missing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipdata import copy_clips
from twbert_export.pipeline import ExportOptions, run_export

REPO = Path(__file__).resolve().parents[2]
SERVE_ENV = "TWBERT_SERVE_PYTHON"
START_TIMEOUT_S, STOP_TIMEOUT_S, REQUEST_TIMEOUT_S = 180, 60, 60


def serve_python() -> Path | None:
    path = Path(os.environ.get(SERVE_ENV) or REPO / ".venv-serve" / "bin" / "python")
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serving_python() -> Path:
    python = serve_python()
    if python is None:
        pytest.skip("no serving environment: create .venv-serve as the README's Serving section "
                    f"says (or set {SERVE_ENV} to a Python with requirements-serve.txt)")
    probe = subprocess.run([str(python), "-c", "import pytriton, tritonclient.grpc"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode:
        pytest.skip(f"{python} cannot import pytriton/tritonclient: "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="session")
def serve_clips(tmp_path_factory) -> Path:
    return copy_clips(tmp_path_factory.mktemp("serve-val") / "data", 6)


@pytest.fixture(scope="session")
def qa_artifact(tmp_path_factory, serve_clips) -> Path:
    """The demo checkpoint exported for QA (FP32 only: no calibration). A QA artifact serves
    both models: its contract has the retrieval outputs beside qa_logits."""
    out = tmp_path_factory.mktemp("serve-engines") / "demo-qa"
    run_export(ExportOptions(ckpt="demo", precisions=("fp32",), task="qa", val_data=str(serve_clips),
                             out=str(out), calib_cache=False))
    return out


@dataclass
class Server:
    process: subprocess.Popen
    http: str
    grpc: str
    python: Path
    log: Path

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.output()}")
        try:
            # The server is ready before PyTriton has loaded the models; then each model is.
            if all(server.get(f"/v2/models/{model}/ready")[0] == 200
                   for model in ("twbert_score", "twbert_qa")):
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the server was not ready within {START_TIMEOUT_S} s:\n{server.output()}")


@pytest.fixture(scope="module")
def server(serving_python, qa_artifact, tmp_path_factory):
    """`export.py serve` on free loopback ports; stopped with SIGINT at the end, which must
    end it with exit 0 within STOP_TIMEOUT_S."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(serving_python), "export.py", "serve", "--artifact", str(qa_artifact),
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--max-queue-delay-us", "50000", "--threads", "1"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", serving_python, log)
    try:
        wait_ready(server)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            pytest.fail(f"the server did not stop within {STOP_TIMEOUT_S} s of SIGINT")
        assert code == 0, server.output()
