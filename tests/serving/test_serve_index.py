"""`export.py serve --index`: the retrieval model ranks the indexed clips as `predict --index`
does, over HTTP and gRPC, through the client; bad requests get errors and the server stays up."""

from __future__ import annotations

import json
import subprocess

import pytest

import export
from triton_server import (REPO, RETRIEVE, caption_of, client, predicted_index,
                           retrieve_request)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_index_ranking_equals_predict_index(server, qa_artifact, clip_index, serve_clips,
                                                   protocol, capsys):
    caption = caption_of(serve_clips)
    code, out = predicted_index(qa_artifact, clip_index, caption, capsys, "--k", "3", "--json")
    assert code == 0
    want = json.loads(out)
    assert len(want["ranking"]) == 6
    proc = client(server, protocol, "--text", caption, "--k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert [r["clip"] for r in got["ranking"]] == [r["clip"] for r in want["ranking"]]
    assert [r["shortlisted"] for r in got["ranking"]] == [r["shortlisted"] for r in
                                                          want["ranking"]]
    assert sum(r["shortlisted"] for r in got["ranking"]) == 3
    for g, w in zip(got["ranking"], want["ranking"]):
        assert g["itc_similarity"] == pytest.approx(w["itc_similarity"], abs=1e-5)
        if w["shortlisted"]:
            assert g["match_probability"] == pytest.approx(w["match_probability"], abs=1e-6)
        assert g.get("frames") == w.get("frames")
    # The printed lines too, cut to --top as predict cuts them.
    code, want_lines = predicted_index(qa_artifact, clip_index, caption, capsys, "--k", "3",
                                       "--top", "2")
    proc = client(server, protocol, "--text", caption, "--k", "3", "--top", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == want_lines.splitlines()
    assert len(want_lines.splitlines()) == 2


def test_retrieve_bad_requests_get_errors_and_the_server_stays_up(server, serve_clips):
    for body, message in ((retrieve_request("  "), "text is empty"),
                          (retrieve_request("a caption", k=0), "k must be >= 1")):
        status, reply = server.request("POST", RETRIEVE, body)
        assert status >= 400 and message in reply.get("error", ""), (status, reply)
    proc = client(server, "grpc", "--text", "")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --text is empty"), proc.stderr
    # An empty text the client does not check, straight to the gRPC endpoint.
    code = ("from twbert_export.client import *\n"
            f"c = TritonClient({server.grpc!r}, 'grpc')\n"
            "try:\n    c.infer('twbert_retrieve', {'text': text_column('', 1)})\n"
            "except ServerError as e:\n    print(e)\n")
    proc = subprocess.run([str(server.python), "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "text is empty" in proc.stdout, proc.stderr
    assert server.get("/v2/health/live")[0] == 200 and server.get("/v2/health/ready")[0] == 200
    status, reply = server.request("POST", RETRIEVE,
                                   retrieve_request(caption_of(serve_clips), top=4))
    assert status == 200, reply
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert outputs["clips"]["shape"] == [1, 4] and len(set(outputs["clips"]["data"])) == 4


def test_serve_refuses_a_missing_index_in_one_line(qa_artifact, tmp_path, capsys):
    assert export.main(["serve", "--artifact", str(qa_artifact), "--index",
                        str(tmp_path / "missing.index")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
