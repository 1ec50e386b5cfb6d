"""`export.py serve --index`: the retrieval model ranks the indexed clips as `predict --index`
does, over HTTP and gRPC, through the client; bad requests get errors and the server stays up."""

from __future__ import annotations

import pytest

import export
from triton_server import (RETRIEVE, caption_of, client, grpc_error, predicted_index,
                           retrieve_request, served_and_predicted_index)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_index_ranking_equals_predict_index(server, qa_artifact, clip_index, serve_clips,
                                                   protocol, capsys):
    served_and_predicted_index(server, qa_artifact, clip_index, serve_clips, protocol, capsys)
    caption = caption_of(serve_clips)
    # The printed lines too, cut to --top as predict cuts them.
    code, want_lines = predicted_index(qa_artifact, clip_index, caption, capsys, "--k", "3",
                                       "--top", "2")
    proc = client(server, protocol, "--text", caption, "--k", "3", "--top", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == want_lines.splitlines()
    assert len(want_lines.splitlines()) == 2


def test_retrieve_bad_requests_get_errors_and_the_server_stays_up(server, serve_clips):
    for body, message in ((retrieve_request("  "), "text is empty"),
                          (retrieve_request("a caption", k=0), "k must be >= 1"),
                          (retrieve_request("a caption", k=3, shortlist=2),
                           "shortlist 2 is smaller than k 3")):
        status, reply = server.request("POST", RETRIEVE, body)
        assert status >= 400 and message in reply.get("error", ""), (status, reply)
    proc = client(server, "grpc", "--text", "")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --text is empty"), proc.stderr
    # An empty text the client does not check, straight to the gRPC endpoint.
    proc = grpc_error(server, "twbert_retrieve", "{'text': text_column('', 1)}")
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
    assert len(err) == 2 and err[0].startswith("error: ") and err[1].startswith("hint: "), err


def test_retrieve_gives_index_rows_and_an_unsplit_index_is_no_shard(server, clip_index,
                                                                    serve_clips):
    """`index_rows` (what a fan-out over shards breaks ties by) is each clip's row in the
    index; a server of an index that was not split is refused as a shard, in one line."""
    import json
    import subprocess

    from triton_server import REPO

    status, reply = server.request("POST", RETRIEVE, retrieve_request(caption_of(serve_clips)))
    assert status == 200, reply
    outputs = {o["name"]: o["data"] for o in reply["outputs"]}
    order = list(json.loads((clip_index / "index.json").read_text())["clips"])
    assert sorted(outputs["index_rows"]) == list(range(len(order)))
    assert [order[row] for row in outputs["index_rows"]] == outputs["clips"]
    proc = subprocess.run([str(server.python), "export.py", "query", "--shards", server.http,
                           "--text", caption_of(serve_clips)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 2 and "is not a shard" in err[0], proc.stderr
