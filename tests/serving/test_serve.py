"""`export.py serve` against a real Triton Inference Server on loopback: the answers equal
`predict`'s over HTTP and gRPC, bad requests get errors and the server stays up, concurrent
requests are batched within the exported range."""

from __future__ import annotations

import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import export
from triton_server import (QUESTION, caption_of, grpc_error, predicted, served, v2_request,
                           videos_of)
from twbert_export.validation.artifact_runner import Artifact
from twbert_export.retrieval.predict import load_videos


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_ranking_and_answers_equal_predicts(server, qa_artifact, serve_clips, protocol,
                                                   capsys):
    videos = videos_of(serve_clips)
    caption = caption_of(serve_clips)
    want = predicted(qa_artifact, videos, "--text", caption, capsys)
    got = served(server, protocol, videos, "--text", caption)
    assert [r["video"] for r in got["ranking"]] == [r["video"] for r in want["ranking"]]
    for g, w in zip(got["ranking"], want["ranking"]):
        assert g["match_probability"] == pytest.approx(w["match_probability"], abs=1e-6)
        assert g["itc_similarity"] == pytest.approx(w["itc_similarity"], abs=1e-5)
        assert g["frames"] == w["frames"]
    want = predicted(qa_artifact, videos, "--question", QUESTION, capsys)
    got = served(server, protocol, videos, "--question", QUESTION)
    assert [a["answer"] for a in got["answers"]] == [a["answer"] for a in want["answers"]]
    assert [a["probability"] for a in got["answers"]] == pytest.approx(
        [a["probability"] for a in want["answers"]], abs=1e-6)


def test_bad_requests_get_errors_and_the_server_stays_up(server, qa_artifact, serve_clips):
    artifact = Artifact(qa_artifact / "model.fp32.onnx")
    clip = load_videos(artifact, videos_of(serve_clips, 1))[0]
    infer = "/v2/models/twbert_score/infer"
    bad = {
        "empty text": (v2_request(clip, "   "), "text is empty"),
        "wrong shape": (v2_request(clip[:, :, :32], "a caption"), "unexpected shape"),
        "wrong dtype": (v2_request(clip.astype(np.int64), "a caption"), "expects 'FP32'"),
        "unknown model": (v2_request(clip, "a caption"), "unknown model"),
    }
    for what, (body, message) in bad.items():
        path = "/v2/models/no_such_model/infer" if what == "unknown model" else infer
        status, reply = server.request("POST", path, body)
        assert status >= 400 and message in reply.get("error", ""), (what, status, reply)
    # The same bad request over gRPC, through the client library.
    proc = grpc_error(server, "twbert_score", "{'video': video, 'text': text_column('', 1)}",
                      setup="import numpy as np\n"
                      f"video = np.zeros((1, {', '.join(map(str, clip.shape))}), np.float32)\n")
    assert "text is empty" in proc.stdout, proc.stderr
    # Still up, still right.
    assert server.get("/v2/health/live")[0] == 200 and server.get("/v2/health/ready")[0] == 200
    status, reply = server.request("POST", infer, v2_request(clip, caption_of(serve_clips)))
    assert status == 200, reply
    assert 0.0 <= reply["outputs"][0]["data"][0] <= 1.0


def test_concurrent_requests_are_batched_within_the_exported_range(server, qa_artifact,
                                                                   serve_clips):
    artifact = Artifact(qa_artifact / "model.fp32.onnx")
    clip = load_videos(artifact, videos_of(serve_clips, 1))[0]
    body = v2_request(clip, caption_of(serve_clips))

    def one(_):
        return server.request("POST", "/v2/models/twbert_score/infer", body)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(16)))
    assert all(status == 200 for status, _ in replies), replies
    probabilities = {reply["outputs"][0]["data"][0] for _, reply in replies}
    assert max(probabilities) - min(probabilities) < 1e-6  # the same row, whatever its batch
    status, stats = server.get("/v2/models/twbert_score/stats")
    assert status == 200, stats
    sizes = [b["batch_size"] for b in stats["model_stats"][0]["batch_stats"]]
    assert max(sizes) > 1 and max(sizes) <= artifact.contract.batch.max, sizes


def test_serve_refuses_bad_arguments_in_one_line(qa_artifact, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        for args in (["--artifact", str(tmp_path / "missing")],
                     ["--artifact", str(qa_artifact), "--max-batch", "99"],
                     ["--artifact", str(qa_artifact), "--precision", "int8"],
                     ["--artifact", str(qa_artifact), "--http-port", busy]):
            assert export.main(["serve", *args]) == 2, args
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"--http-port {busy}" in err[0]


def descendants(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return children + [d for c in children for d in descendants(c)]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_python_backend_stubs_run_the_serving_pythons_own_libpython(server):
    """The stub would otherwise load the system's libpython, of another patch level than a
    pyenv Python's standard library, and fail to load the models (README, Serving)."""
    libdir = subprocess.run([str(server.python), "-c", "import sysconfig; print(sysconfig."
                             "get_config_var('LIBDIR'))"], capture_output=True, text=True,
                            timeout=60).stdout.strip()
    stubs = [p for p in descendants(server.process.pid)
             if b"triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert stubs, "no Python-backend stub process found under the server"
    for pid in stubs:
        loaded = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                  if "libpython3" in line}
        assert loaded and all(Path(lib).parent == Path(libdir) for lib in loaded), loaded
