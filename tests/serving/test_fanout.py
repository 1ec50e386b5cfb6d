"""Shards served by their own `export.py serve --index SHARD` and one query over all of them
(`export.py query --shards`, twbert_export/serving/fanout.py): the ranking of the unsplit index
for S = 1, 2, 4 over HTTP and gRPC, and a list with a missing, repeated or foreign shard refused
before any shard is queried. Seven Triton servers start here: slow tier. The merge itself
without servers: tests/export/test_shards.py."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest

from triton_server import REPO, caption_of, running_server
from twbert_export.retrieval.shards import shard_dir_name, split_index


def served_shards(stack: contextlib.ExitStack, python, artifact, shard_dirs, log_dir) -> list:
    servers = []
    for directory in shard_dirs:
        servers.append(stack.enter_context(running_server(
            python, lambda http, grpc, metrics, d=directory: [
                "export.py", "serve", "--artifact", str(artifact), "--index", str(d),
                "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                str(metrics), "--threads", "1"],
            log_dir / f"{directory.parent.name}-{directory.name}.log",
            ("twbert_retrieve", "twbert_shard"), f"the server of {directory.name}",
            exit_0=True)))
    return servers


def query(python, servers, protocol: str, *args: str) -> subprocess.CompletedProcess:
    urls = ",".join(s.http if protocol == "http" else s.grpc for s in servers)
    return subprocess.run([str(python), "export.py", "query", "--shards", urls, "--protocol",
                           protocol, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def retrieve_count(server) -> int:
    """Requests twbert_retrieve has run or refused on this server."""
    status, stats = server.get("/v2/models/twbert_retrieve/stats")
    assert status == 200, stats
    inference = stats["model_stats"][0]["inference_stats"]
    return int(inference["success"]["count"]) + int(inference["fail"]["count"])


@pytest.mark.slow
def test_fanout_over_served_shards(serving_python, qa_artifact, clip_index, serve_clips,
                                   tmp_path):
    caption = caption_of(serve_clips)
    shards = {}
    for count in (1, 2, 4):
        split_index(clip_index, count, tmp_path / f"split{count}")
        shards[count] = [tmp_path / f"split{count}" / shard_dir_name(i, count)
                         for i in range(1, count + 1)]
    with contextlib.ExitStack() as stack:
        servers = {count: served_shards(stack, serving_python, qa_artifact, dirs, tmp_path)
                   for count, dirs in shards.items()}
        for count, group in servers.items():
            for protocol, extra in (("http", ["--k", "3"]), ("grpc", ["--k", "2", "--top", "4"])):
                # The unsplit index ranked in the same environment as the shards are served.
                unsplit = subprocess.run(
                    [str(serving_python), "export.py", "predict", "--index", str(clip_index),
                     "--artifact", str(qa_artifact), "--text", caption, *extra, "--json"],
                    cwd=REPO, capture_output=True, text=True, timeout=120)
                assert unsplit.returncode == 0, unsplit.stderr
                want = json.loads(unsplit.stdout)  # every clip (--top cuts only the lines)
                assert len(want["ranking"]) == 6
                if "--top" in extra:  # the fan-out, like the client, asks for the top only
                    want["ranking"] = want["ranking"][:4]
                # The servers listed last to first: the order of the list does not matter.
                proc = query(serving_python, group[::-1], protocol, "--text", caption, *extra,
                             "--json")
                assert proc.returncode == 0, proc.stderr
                got = json.loads(proc.stdout)
                assert got == want, (count, protocol)  # clips, order, scores, frames: all equal
        # Refused before any shard is queried: twbert_retrieve's counts do not move.
        everyone = [s for group in servers.values() for s in group]
        before = [retrieve_count(s) for s in everyone]
        for group, message in (
                (servers[4][:3], "shard 4 of 4 of index"),  # missing
                ([servers[2][0], servers[4][1]], "is foreign"),  # another split's shard
                ([servers[2][0], servers[2][0], servers[2][1]], "are both shard 1/2")):
            for protocol in ("http", "grpc"):
                proc = query(serving_python, group, protocol, "--text", caption)
                err = proc.stderr.strip().splitlines()
                assert proc.returncode == 2 and proc.stdout == "", proc.stderr
                assert len(err) == 2 and err[0].startswith("error: ") and message in err[0], err
                assert err[1] == "hint: python export.py query --help"
        assert [retrieve_count(s) for s in everyone] == before
