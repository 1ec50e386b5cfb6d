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
from twbert_export.retrieval.predict import load_videos
from twbert_export.serving.served import MAX_TEXT_BYTES
from twbert_export.validation.artifact_runner import Artifact

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
    # The cascade (issue 22): the first stage's 4 clips, as `predict --index --shortlist 4`.
    code, out = predicted_index(artifact, index, caption, capsys, "--k", "3", "--shortlist",
                                "4", "--json")
    want = json.loads(out)["ranking"]
    proc = client(server, protocol, "--text", caption, "--k", "3", "--shortlist", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["ranking"]
    assert len(got) == 4 and [r["clip"] for r in got] == [r["clip"] for r in want]
    for g, w in zip(got, want):
        assert g["first_stage_similarity"] == pytest.approx(w["first_stage_similarity"],
                                                            abs=1e-5)
    # index_rows, what a fan-out over shards breaks ties by: each clip's row in the index.
    status, reply = server.request("POST", "/v2/models/twbert_retrieve/infer",
                                   retrieve_request(caption))
    assert status == 200, reply
    outputs = {o["name"]: o["data"] for o in reply["outputs"]}
    order = list(json.loads((Path(index) / "index.json").read_text())["clips"])
    assert [order[row] for row in outputs["index_rows"]] == outputs["clips"]


def retrieve_request(text: str, **optional: int) -> dict:
    inputs = [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]
    inputs += [{"name": name, "shape": [1, 1], "datatype": "INT64", "data": [value]}
               for name, value in optional.items()]
    return {"inputs": inputs}


# -- refusals of client mistakes (issue 23; serve and the triton-repo BLS models) ----------------
PROBE = """
import json, sys
import numpy as np
from tritonclient.utils import InferenceServerException
import tritonclient.http as http, tritonclient.grpc as grpc
cases = json.loads(sys.stdin.read())
video = np.load(sys.argv[3])
results = []
for protocol, module, url in (("http", http, sys.argv[1]), ("grpc", grpc, sys.argv[2])):
    client = module.InferenceServerClient(url)
    for case in cases:
        inputs = []
        for name, spec in case["inputs"].items():
            if spec["kind"] == "text":
                array = np.array([[t.encode("utf-8") if isinstance(t, str) else bytes(t)]
                                  for t in spec["rows"]], dtype=np.object_)
                dtype = "BYTES"
            elif spec["kind"] == "int":
                array, dtype = np.array([[v] for v in spec["rows"]], np.int64), "INT64"
            else:
                array = np.repeat(video[None], spec["rows"], 0).copy()
                for index, value in spec.get("set", []):
                    array[tuple(index)] = float(value)
                dtype = "FP32"
            tensor = module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            client.infer(case["model"], inputs)
            results.append({"case": case["name"], "protocol": protocol, "status": "OK"})
        except InferenceServerException as e:
            results.append({"case": case["name"], "protocol": protocol,
                            "status": str(e.status()), "message": e.message()})
    client.close()
print(json.dumps(results))
"""


def probe(server, clip: np.ndarray, cases: list[dict], tmp_path: Path) -> list[dict]:
    """Each case sent once over HTTP and once over gRPC with tritonclient (binary tensors, so
    that non-UTF-8 bytes reach the model), in the serving environment."""
    np.save(tmp_path / "clip.npy", clip)
    proc = subprocess.run([str(server.python), "-c", PROBE, server.http, server.grpc,
                           str(tmp_path / "clip.npy")], input=json.dumps(cases), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def text(rows):
    return {"kind": "text", "rows": rows}


def clip_rows(n=1, set_=()):
    return {"kind": "video", "rows": n, "set": list(set_)}


def ints(rows):
    return {"kind": "int", "rows": rows}


LONG = "a man is cooking pasta in a small kitchen " * 40  # ~360 wordpieces, 1.7 KB


def refusal_cases(caption: str) -> list[tuple[dict, str]]:
    """(request, what the refusal must say): the client mistakes of issue 23, items 2, 3, 5."""
    score = "twbert_score"
    return [
        ({"name": "empty text", "model": score, "inputs": {"video": clip_rows(),
                                                          "text": text([""])}}, "text is empty"),
        ({"name": "whitespace text", "model": score,
          "inputs": {"video": clip_rows(), "text": text(["  \t "])}}, "text is empty"),
        ({"name": "non-UTF-8 text", "model": score,
          "inputs": {"video": clip_rows(), "text": text([[0xff, 0xfe, 0x41]])}},
         "text is not UTF-8"),
        ({"name": "empty question", "model": "twbert_qa",
          "inputs": {"video": clip_rows(), "question": text([" "])}}, "question is empty"),
        ({"name": "text too long", "model": score,
          "inputs": {"video": clip_rows(), "text": text([LONG])}}, "wordpieces long"),
        ({"name": "text over the byte limit", "model": score,
          "inputs": {"video": clip_rows(), "text": text(["x" * (MAX_TEXT_BYTES + 1)])}},
         f"the limit is {MAX_TEXT_BYTES} bytes"),
        ({"name": "NaN pixel", "model": score,
          "inputs": {"video": clip_rows(set_=[([0, 0, 0, 0, 0], "nan")]),
                     "text": text([caption])}}, "video holds NaN or Inf"),
        ({"name": "Inf pixel", "model": score,
          "inputs": {"video": clip_rows(set_=[([0, 1, 2, 3, 4], "inf")]),
                     "text": text([caption])}}, "video holds NaN or Inf"),
        ({"name": "pixel beyond FP16", "model": "twbert_qa",
          "inputs": {"video": clip_rows(set_=[([0, 0, 1, 0, 0], 7e4)]),
                     "question": text([caption])}}, "outside what the preprocessing makes"),
        ({"name": "pixel just out of range", "model": score,
          "inputs": {"video": clip_rows(set_=[([0, 0, 0, 0, 0], -2.5)]),
                     "text": text([caption])}}, "outside what the preprocessing makes"),
        ({"name": "k = 0", "model": "twbert_retrieve",
          "inputs": {"text": text([caption]), "k": ints([0])}}, "k must be >= 1"),
        ({"name": "k < 0", "model": "twbert_retrieve",
          "inputs": {"text": text([caption]), "k": ints([-3])}}, "k must be >= 1"),
        ({"name": "top < 0", "model": "twbert_retrieve",
          "inputs": {"text": text([caption]), "top": ints([-1])}}, "top must be >= 0"),
        ({"name": "rows with different top", "model": "twbert_retrieve",
          "inputs": {"text": text([caption, caption]), "top": ints([1, 2])}},
         "the same for every row"),
        ({"name": "retrieve text too long", "model": "twbert_retrieve",
          "inputs": {"text": text([LONG])}}, "wordpieces long"),
    ]


def check_refusals(server, qa_artifact, serve_clips, tmp_path):
    clip = load_videos(Artifact(qa_artifact / "model.fp32.onnx"), videos_of(serve_clips, 1))[0]
    caption = caption_of(serve_clips)
    cases = refusal_cases(caption)
    results = probe(server, clip, [c for c, _ in cases] + [
        {"name": "good", "model": "twbert_score",
         "inputs": {"video": clip_rows(), "text": text([caption])}}], tmp_path)
    want = {c["name"]: message for c, message in cases}
    for r in results:
        if r["case"] == "good":
            assert r["status"] == "OK", r
            continue
        expected = "400" if r["protocol"] == "http" else "StatusCode.INVALID_ARGUMENT"
        assert r["status"] == expected, r
        message = r["message"]
        assert want[r["case"]] in message, r
        assert "\n" not in message.strip() and "Traceback" not in message, r
        assert "/" not in message and ".py" not in message, r  # no server path
    assert len(results) == 2 * (len(cases) + 1)
    return clip, caption
