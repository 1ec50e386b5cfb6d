"""Helpers of the serving tests (tests/serving): a Triton server process on loopback, queried
over KServe v2 HTTP with the standard library, and the client and `predict` runs compared."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

import export

REPO = Path(__file__).resolve().parents[1]
SERVE_ENV = "TWBERT_SERVE_PYTHON"
START_TIMEOUT_S, STOP_TIMEOUT_S, REQUEST_TIMEOUT_S = 180, 60, 60


def serve_python() -> Path | None:
    path = Path(os.environ.get(SERVE_ENV) or REPO / ".venv-serve" / "bin" / "python")
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http: str
    grpc: str
    python: Path
    log: Path
    models: tuple[str, ...] = ("twbert_score", "twbert_qa")

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
                   for model in server.models):
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the server was not ready within {START_TIMEOUT_S} s:\n{server.output()}")


@contextlib.contextmanager
def running_server(python: Path, command: Callable[[int, int, int], list[str]], log: Path,
                   models: tuple[str, ...], what: str, exit_0: bool) -> Iterator[Server]:
    """`command(http, grpc, metrics)` on free loopback ports, run by `python`, until ready;
    stopped with SIGINT at the end, within STOP_TIMEOUT_S (and with exit 0 if `exit_0`)."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([str(python), *command(http, grpc, metrics)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", python, log,
                    models=models)
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
            pytest.fail(f"{what} did not stop within {STOP_TIMEOUT_S} s of SIGINT")
        if exit_0:
            assert code == 0, server.output()


def grpc_error(server: Server, model: str, inputs: str, setup: str = ""
               ) -> subprocess.CompletedProcess:
    """The client library sending a request (`inputs`: a Python dict expression, after
    `setup`) over gRPC and printing the server's refusal."""
    code = ("from twbert_export.serving.client import *\n" + setup
            + f"c = TritonClient({server.grpc!r}, 'grpc')\n"
            f"try:\n    c.infer({model!r}, {inputs})\n"
            "except ServerError as e:\n    print(e)\n")
    return subprocess.run([str(server.python), "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)



QUESTION = "which way does the camera move?"


def videos_of(data: Path, n: int = 3) -> list[str]:
    return sorted(str(p) for p in (data / "videos").glob("*.mp4"))[:n]


def predicted(artifact: Path, videos: list[str], flag: str, text: str, capsys) -> dict:
    args = ["predict", "--model", str(artifact / "model.fp32.onnx"), flag, text, "--json"]
    for v in videos:
        args += ["--video", v]
    assert export.main(args) == 0
    return json.loads(capsys.readouterr().out)


def served(server, protocol: str, videos: list[str], flag: str, text: str) -> dict:
    url = server.http if protocol == "http" else server.grpc
    args = [str(server.python), "-m", "twbert_export.serving.client", "--url", url, "--protocol",
            protocol, flag, text, "--json"]
    for v in videos:
        args += ["--video", v]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def caption_of(data: Path) -> str:
    return json.loads((data / "annotations.jsonl").read_text().splitlines()[0])["caption"]


def v2_request(video: np.ndarray, text: str) -> dict:
    """A KServe v2 JSON request of one row."""
    return {"inputs": [
        {"name": "video", "shape": [1, *video.shape], "datatype": video.dtype == np.int64
         and "INT64" or "FP32", "data": video.ravel().tolist()},
        {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}


# -- twbert_retrieve (serve --index, triton-repo --index) -----------------------------------------
RETRIEVE = "/v2/models/twbert_retrieve/infer"


def predicted_index(artifact, index, text: str, capsys, *extra: str) -> tuple[int, str]:
    code = export.main(["predict", "--index", str(index), "--artifact", str(artifact),
                        "--text", text, *extra])
    return code, capsys.readouterr().out


def client(server, protocol: str, *args: str) -> subprocess.CompletedProcess:
    url = server.http if protocol == "http" else server.grpc
    return subprocess.run([str(server.python), "-m", "twbert_export.serving.client", "--url", url,
                           "--protocol", protocol, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def served_and_predicted_index(server, artifact, index, data: Path, protocol: str, capsys
                               ) -> None:
    """twbert_retrieve serves, for the first caption (k = 3), the ranking `predict --index`
    prints: the six clips in the same order, the same three shortlisted, the same scores."""
    caption = caption_of(data)
    code, out = predicted_index(artifact, index, caption, capsys, "--k", "3", "--json")
    assert code == 0
    want = json.loads(out)["ranking"]
    assert len(want) == 6
    proc = client(server, protocol, "--text", caption, "--k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["ranking"]
    assert [r["clip"] for r in got] == [r["clip"] for r in want]
    assert [r["shortlisted"] for r in got] == [r["shortlisted"] for r in want]
    assert sum(r["shortlisted"] for r in got) == 3
    for g, w in zip(got, want):
        assert g["itc_similarity"] == pytest.approx(w["itc_similarity"], abs=1e-5)
        if w["shortlisted"]:
            assert g["match_probability"] == pytest.approx(w["match_probability"], abs=1e-6)
        assert g.get("frames") == w.get("frames")


def retrieve_request(text: str, **optional: int) -> dict:
    inputs = [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]
    inputs += [{"name": name, "shape": [1, 1], "datatype": "INT64", "data": [value]}
               for name, value in optional.items()]
    return {"inputs": inputs}
