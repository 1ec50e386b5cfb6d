"""Issue 23, serving: what a client gets for its mistakes, readiness that means ready, JSON that
is JSON, and the tools around the server (perf_analyzer's input, the queue-delay default), against
a real `export.py serve` on loopback."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import export
from triton_server import (REPO, RETRIEVE, START_TIMEOUT_S, STOP_TIMEOUT_S, caption_of,
                           check_refusals, free_port, retrieve_request, v2_request, videos_of)
from twbert_export.retrieval.predict import load_videos
from twbert_export.serving.perf_input import decoded_video, entries
from twbert_export.serving import served
from twbert_export.serving.serve import ServeOptions
from twbert_export.validation.artifact_runner import Artifact

MODELS = ("twbert_score", "twbert_qa", "twbert_retrieve")


def status_of(url: str) -> int | None:
    """HTTP status of a GET, None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_ready_is_never_200_before_every_model_is(serving_python, qa_artifact, clip_index,
                                                  tmp_path):
    """Polled every 50 ms from the moment the server is started: whenever /v2/health/ready
    said 200, every model said ready in the same round; and it settles at 200."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(serving_python), "export.py", "serve", "--artifact", str(qa_artifact),
             "--index", str(clip_index), "--http-port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--threads", "1"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}/v2"
    rounds, ready_rounds, early = 0, 0, []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and ready_rounds < 20 and process.poll() is None:
            health = status_of(f"{base}/health/ready")
            if health == 200:
                models = {m: status_of(f"{base}/models/{m}/ready") for m in MODELS}
                if any(s != 200 for s in models.values()):
                    early.append((rounds, models))
                ready_rounds += 1
            rounds += 1
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    assert not early, f"ready while models were not: {early[:3]}\n{log.read_text()}"
    assert ready_rounds == 20, f"not ready within {START_TIMEOUT_S} s:\n{log.read_text()}"


def test_client_mistakes_are_400_and_invalid_argument_with_the_reason(server, qa_artifact,
                                                                      serve_clips, tmp_path):
    clip, caption = check_refusals(server, qa_artifact, serve_clips, tmp_path)
    # Still up and still right.
    assert server.get("/v2/health/ready")[0] == 200
    status, reply = server.request("POST", "/v2/models/twbert_score/infer",
                                   v2_request(clip, caption))
    assert status == 200 and 0.0 <= reply["outputs"][0]["data"][0] <= 1.0, reply


def test_requests_batched_with_a_refused_one_are_not_blamed_for_it(server, qa_artifact,
                                                                   serve_clips):
    """Concurrent requests (the server's batcher waits 50 ms, so they share batches): the bad
    one gets 400 with its reason; each good one its answer, or 503 saying to send it again,
    never another request's reason."""
    clip = load_videos(Artifact(qa_artifact / "model.fp32.onnx"), videos_of(serve_clips, 1))[0]
    good = v2_request(clip, caption_of(serve_clips))
    bad = v2_request(clip, " ")
    bodies = [bad, good, good, good] * 2

    def one(body):
        return server.request("POST", "/v2/models/twbert_score/infer", body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(one, bodies))
    for body, (status, reply) in zip(bodies, replies):
        if body is bad:
            assert status == 400 and "text is empty" in reply["error"], (status, reply)
        else:
            assert status == 200 or (status == 503 and "send it again" in reply["error"]), \
                (status, reply)
    statuses = [s for s, _ in replies]
    assert 503 in statuses or statuses.count(200) == 6, statuses


def strict_json(raw: bytes):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(raw, parse_constant=refuse)


def test_retrieve_answers_json_with_shortlisted_instead_of_nan(server, serve_clips):
    body = json.dumps(retrieve_request(caption_of(serve_clips), k=2)).encode()
    req = urllib.request.Request(f"http://{server.http}{RETRIEVE}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        reply = strict_json(r.read())  # NaN, Infinity: ValueError
    outputs = {o["name"]: o for o in reply["outputs"]}
    shortlisted = outputs["shortlisted"]["data"]
    probability = outputs["match_probability"]["data"]
    assert outputs["shortlisted"]["datatype"] == "BOOL" and len(shortlisted) == 6
    assert shortlisted == [True, True, False, False, False, False]  # the ITM-ranked first
    assert all(0.0 <= p <= 1.0 for p, s in zip(probability, shortlisted) if s)
    assert all(p == served.NOT_SCORED for p, s in zip(probability, shortlisted) if not s)


def test_validate_refuses_reference_clips_the_preprocessing_cannot_make(qa_artifact, tmp_path,
                                                                        capsys):
    for name, value in (("nan", np.nan), ("inf", np.inf), ("7e4", 7e4)):
        reference = tmp_path / name
        shutil.copytree(qa_artifact / "reference", reference)
        with np.load(reference / "validation.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["video"][1, 2, 0, 3, 4] = value
        np.savez(reference / "validation.npz", **arrays)
        code = export.main(["validate", "--engine", str(qa_artifact / "model.fp32.onnx"),
                            "--reference", str(reference)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert err[0].startswith("error: ") and "input video" in err[0], err
        assert ("NaN or Inf" if name != "7e4" else "outside what the preprocessing") in err[0]
        assert [line for line in err[1:] if not line.startswith("hint: ")] == [], err


def test_video_range_is_what_the_preprocessing_makes():
    """Black and white frames through the real preprocessing sit inside the range, and just
    beyond either end is outside it."""
    from twbert_export.data import preprocess
    from twbert_export.data.preprocess import normalize_frame

    for level in (0, 255):
        frame = normalize_frame(np.full((20, 30, 3), level, np.uint8), 16)
        assert preprocess.video_problem(frame[None]) is None
    low, high = preprocess.video_range()
    assert (high - low).min() > 3.2 and preprocess.VIDEO_SLACK <= 1e-3
    frame = normalize_frame(np.zeros((8, 8, 3), np.uint8), 8)[None]
    frame[0, 2, 0, 0] = low[2] - 2 * preprocess.VIDEO_SLACK
    assert "channel 2" in preprocess.video_problem(frame)


def test_perf_input_carries_the_artifacts_preprocessed_clips(serving_python, qa_artifact,
                                                             serve_clips, server, tmp_path):
    """The perf_analyzer input the command writes: the clips exactly as predict preprocesses
    them, each with its caption, and each entry, sent as a request, is answered."""
    out = tmp_path / "perf.json"
    proc = subprocess.run([str(serving_python), "-m", "twbert_export.serving.perf_input", "--artifact",
                           str(qa_artifact), "--precision", "fp32", "--data", str(serve_clips),
                           "--clips", "3", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "perf_analyzer -m twbert_score" in proc.stdout
    data = json.loads(out.read_text())["data"]
    artifact = Artifact(qa_artifact / "model.fp32.onnx")
    clips = load_videos(artifact, videos_of(serve_clips, 3))
    shape = clips.shape[1:]
    annotations = [json.loads(line) for line in
                   (serve_clips / "annotations.jsonl").read_text().splitlines()]
    captions = {a["video"]: a["caption"] for a in reversed(annotations) if a.get("caption")}
    assert len(data) == 3
    for entry, clip, video in zip(data, clips, videos_of(serve_clips, 3)):
        assert np.array_equal(decoded_video(entry, shape), clip)
        assert entry["text"] == [captions[str(Path(video).relative_to(serve_clips))]]
        status, reply = server.request("POST", "/v2/models/twbert_score/infer",
                                       v2_request(decoded_video(entry, shape), entry["text"][0]))
        assert status == 200, reply
    retrieve = entries("twbert_retrieve", np.zeros(0), ["a caption"], k=3, top=2)
    assert retrieve == [{"text": ["a caption"], "k": [3], "top": [2]}]


def test_default_queue_delay_is_the_one_the_measured_table_chose():
    """docs/serving.md chooses serve's default from its measured sweep; serve, its
    command line and the load test use it."""
    from twbert_export.serving import serve, serve_bench

    doc = (REPO / "docs" / "serving.md").read_text()
    chosen = int(re.search(r"default queue delay: \*\*(\d+) ms\*\*", doc).group(1))
    assert "| delay (ms) | clients | rows/s |" in doc
    assert ServeOptions("x").max_queue_delay_us == chosen * 1000
    assert serve.DEFAULT_QUEUE_DELAY_US == chosen * 1000
    for module in (serve, serve_bench):  # both command lines take the constant
        assert '"--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US' in \
            Path(module.__file__).read_text(), module


def test_pytriton_patch_adds_the_refusal_answer_and_changes_nothing_else(serving_python):
    """The one patch of PyTriton's proxy model (pytriton_compat): found once in the installed
    PyTriton, removable to the byte, valid Python, applied only on the version it was made
    for."""
    from twbert_export.serving import pytriton_compat

    where = subprocess.run([str(serving_python), "-c", "import importlib.metadata as m, "
                            "importlib.util as u; print(u.find_spec('pytriton').submodule_"
                            "search_locations[0]); print(m.version('nvidia-pytriton'))"],
                           capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    package, version = where.stdout.split()
    original = (Path(package) / "proxy" / "model.py").read_text()
    patched = pytriton_compat.patch_text(original)
    if version not in pytriton_compat.PATCHED_VERSIONS:
        pytest.skip(f"nvidia-pytriton {version}: the patch is made for "
                    f"{pytriton_compat.PATCHED_VERSIONS} only")
    assert patched is not None and patched != original
    assert pytriton_compat.unpatch_text(patched) == original
    compile(patched, "model.py", "exec")
    assert pytriton_compat.patch_text(patched) is None  # never applied twice
