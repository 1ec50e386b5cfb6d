"""`export.py triton-repo`: configs Triton's schema accepts, a repository written atomically
that never replaces a directory it did not write, and its Python-backend (BLS) models loaded
in PyTriton's bundled Triton, answering as `predict` and `predict --index` do (with ONNX
Runtime stand-ins for the TensorRT engine models, which cannot run here)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import export
from triton_server import (QUESTION, REPO, RETRIEVE, caption_of, check_refusals, predicted,
                           retrieve_request, running_server, served, served_and_predicted_index,
                           v2_request, videos_of)
from twbert_export.retrieval.gallery import SplitArtifact
from twbert_export.retrieval.predict import load_videos
from twbert_export.serving.triton_repo import RETRIEVAL_GRAPHS
from twbert_export.validation.artifact_runner import Artifact

HERE = Path(__file__).resolve().parent


def test_repository_holds_engine_and_bls_configs_from_the_contract(qa_artifact, tmp_path,
                                                                   capsys):
    out = tmp_path / "repo"
    assert export.main(["triton-repo", "--artifact", str(qa_artifact), "--out", str(out),
                        "--precision", "fp32", "--instances", "2"]) == 0
    contract = Artifact(qa_artifact / "model.fp32.onnx").contract
    engine = (out / "twbert_model" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in engine
    assert f"max_batch_size: {contract.batch.max}" in engine
    assert "instance_group [ { count: 2 kind: KIND_GPU } ]" in engine
    T, S, L = contract.frames, contract.image_size, contract.text_len
    assert f'name: "video" data_type: TYPE_FP32 dims: [ {T}, 3, {S}, {S} ]' in engine
    assert f'name: "input_ids" data_type: TYPE_INT64 dims: [ {L} ]' in engine
    for model in ("twbert_score", "twbert_qa"):
        bls = (out / model / "config.pbtxt").read_text()
        assert 'backend: "python"' in bls and "dynamic_batching" in bls
        assert (out / model / "1" / "model.py").is_file()
    assert "no engine" in capsys.readouterr().out  # says where the device's engine goes


def test_repository_never_replaces_a_directory_it_did_not_write(qa_artifact, tmp_path, capsys):
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    args = ["triton-repo", "--artifact", str(qa_artifact), "--precision", "fp32", "--out"]
    assert export.main([*args, str(foreign)]) == 2
    assert (foreign / "mine.txt").read_text() == "keep"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1] == "hint: python export.py triton-repo --help", err
    ours = tmp_path / "repo"
    assert export.main([*args, str(ours)]) == 0
    assert export.main([*args, str(ours)]) == 2  # an earlier repository: needs --force
    assert export.main([*args, str(ours), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "repo"]  # nothing left aside


def repo_listing(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file()}


def test_force_through_a_symbolic_link_is_refused_and_changes_nothing(qa_artifact, tmp_path,
                                                                      capsys):
    """Issue 23 item 8: rmtree on the link was an internal error (exit 3), after the user's
    link had been replaced by a directory and a stray `.old` link left beside it."""
    args = ["triton-repo", "--artifact", str(qa_artifact), "--precision", "fp32", "--out"]
    assert export.main([*args, str(tmp_path / "repo")]) == 0
    link = tmp_path / "models"
    link.symlink_to(tmp_path / "repo", target_is_directory=True)
    before = repo_listing(tmp_path / "repo")
    capsys.readouterr()
    assert export.main([*args, str(link), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is a symbolic link" in err[0] and err[1].startswith("hint: "), err
    assert link.is_symlink() and repo_listing(tmp_path / "repo") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "repo"]


def test_force_keeps_the_engine_the_user_copied_in(qa_artifact, tmp_path, capsys):
    """Issue 23 item 11: --force onto its own repository deleted the model.plan the user had
    copied in, as its output told them to, without a word. Kept for the same ONNX file; for
    another (the engine would not fit), refused, naming it, and nothing changed."""
    args = ["triton-repo", "--artifact", str(qa_artifact), "--precision", "fp32", "--out",
            str(tmp_path / "repo"), "--force"]
    assert export.main(args) == 0
    plan = tmp_path / "repo" / "twbert_model" / "1" / "model.plan"
    assert f"copy it to {plan}" in capsys.readouterr().out
    plan.write_bytes(b"engine built on the device")
    with pytest.warns(UserWarning, match="kept twbert_model/1/model.plan"):
        assert export.main(args + ["--instances", "2"]) == 0
    assert plan.read_bytes() == b"engine built on the device"
    assert "count: 2" in (tmp_path / "repo" / "twbert_model" / "config.pbtxt").read_text()
    assert "no engine" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]

    marker = tmp_path / "repo" / ".twbert-triton-repo.json"  # as if from another ONNX file
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "onnx_sha256": "0" * 64}))
    before = repo_listing(tmp_path / "repo")
    assert export.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "twbert_model/1/model.plan (engines built for" in err[0], err
    assert repo_listing(tmp_path / "repo") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_index_adds_split_engine_models_and_the_retrieval_model(qa_artifact, clip_index,
                                                                 tmp_path, capsys):
    out = tmp_path / "repo"
    assert export.main(["triton-repo", "--artifact", str(qa_artifact), "--out", str(out),
                        "--precision", "fp32", "--index", str(clip_index)]) == 0
    split = SplitArtifact.for_index(qa_artifact, clip_index)
    for graph in RETRIEVAL_GRAPHS:
        config = (out / f"twbert_{graph}" / "config.pbtxt").read_text()
        contract = split.contracts[graph]
        assert 'platform: "tensorrt_plan"' in config
        assert f"max_batch_size: {contract.batch.max}" in config
        for t in contract.inputs:
            dims = ", ".join(map(str, t.shape[1:]))
            assert f'name: "{t.name}" data_type: TYPE_{t.dtype.upper().replace("FLOAT", "FP")}' \
                   f' dims: [ {dims} ]' in config, (t, config)
    assert not (out / "twbert_video_stem").exists()  # the index holds the stems
    retrieve = (out / "twbert_retrieve" / "config.pbtxt").read_text()
    assert 'backend: "python"' in retrieve and 'name: "k" data_type: TYPE_INT64' in retrieve
    assert 'name: "index_rows" data_type: TYPE_INT64' in retrieve  # as serve's (served.py)
    assert f'string_value: "{clip_index.resolve()}"' in retrieve  # referenced, not copied
    contracts = json.loads((out / "twbert_retrieve" / "1" / "contracts.json").read_text())
    assert sorted(contracts) == sorted(RETRIEVAL_GRAPHS)
    assert "twbert_fuse/1/model.plan" in capsys.readouterr().out
    assert export.main(["triton-repo", "--artifact", str(qa_artifact), "--out",
                        str(tmp_path / "other"), "--index", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a clip index" in err[0] and err[1].startswith("hint: "), err


def triton_repo_with_index(serving_python, artifact, index, out) -> subprocess.CompletedProcess:
    """`export.py triton-repo --index` (FP32) in the serving environment, which checks each
    config against Triton's ModelConfig schema."""
    proc = subprocess.run([str(serving_python), "export.py", "triton-repo", "--artifact",
                           str(artifact), "--precision", "fp32", "--out", str(out),
                           "--index", str(index)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_every_config_parses_as_tritons_model_config(serving_python, qa_artifact, clip_index,
                                                     tmp_path):
    out = tmp_path / "repo"
    proc = triton_repo_with_index(serving_python, qa_artifact, clip_index, out)
    for model in ("twbert_model", "twbert_score", "twbert_qa", "twbert_text", "twbert_select",
                  "twbert_fuse", "twbert_retrieve"):
        assert f"{model}/config.pbtxt: parsed as Triton's ModelConfig" in proc.stdout


@contextlib.contextmanager
def bundled_repo_server(python, artifact, index, root: Path, models: tuple[str, ...]):
    """`triton-repo --index` (FP32) in PyTriton's bundled tritonserver, each engine model
    replaced by the ONNX Runtime stand-in running its ONNX file."""
    repo = root / "repo"
    triton_repo_with_index(python, artifact, index, repo)
    split = SplitArtifact.for_index(artifact, index)
    onnx_files = {"twbert_model": artifact / "model.fp32.onnx",
                  **{f"twbert_{g}": split.files[g] for g in RETRIEVAL_GRAPHS}}
    for model, onnx in onnx_files.items():
        config = repo / model / "config.pbtxt"
        config.write_text(config.read_text()
                          .replace('platform: "tensorrt_plan"', 'backend: "python"')
                          .replace("KIND_GPU", "KIND_CPU")
                          + f'parameters {{ key: "onnx" value {{ string_value: "{onnx}" }} }}\n')
        shutil.copy(HERE / "ort_engine_model.py", repo / model / "1" / "model.py")
    with running_server(
            python, lambda http, grpc, metrics: [
                "-m", "twbert_export.serving.triton_repo", "--bundled-server", str(repo), str(http),
                str(grpc), str(metrics), str(root / "workspace")],
            root / "server.log", models, "the bundled server", exit_0=False) as server:
        yield server


@pytest.fixture(scope="module")
def bundled(serving_python, qa_artifact, clip_index, tmp_path_factory):
    """The repository (with the clip index) in PyTriton's bundled tritonserver."""
    with bundled_repo_server(serving_python, qa_artifact, clip_index,
                             tmp_path_factory.mktemp("bundled"),
                             ("twbert_score", "twbert_qa", "twbert_retrieve")) as server:
        yield server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bls_models_answer_as_predict_does(bundled, qa_artifact, serve_clips, protocol, capsys):
    videos = videos_of(serve_clips)
    caption = caption_of(serve_clips)
    want = predicted(qa_artifact, videos, "--text", caption, capsys)
    got = served(bundled, protocol, videos, "--text", caption)
    assert [r["video"] for r in got["ranking"]] == [r["video"] for r in want["ranking"]]
    assert [r["match_probability"] for r in got["ranking"]] == pytest.approx(
        [r["match_probability"] for r in want["ranking"]], abs=1e-6)
    want = predicted(qa_artifact, videos, "--question", QUESTION, capsys)
    got = served(bundled, protocol, videos, "--question", QUESTION)
    assert [a["answer"] for a in got["answers"]] == [a["answer"] for a in want["answers"]]


def test_bls_model_answers_a_bad_request_with_an_error_and_stays_up(bundled, qa_artifact,
                                                                    serve_clips):
    clip = load_videos(Artifact(qa_artifact / "model.fp32.onnx"), videos_of(serve_clips, 1))[0]
    status, reply = bundled.request("POST", "/v2/models/twbert_score/infer",
                                    v2_request(clip, " "))
    assert status >= 400 and "text is empty" in reply["error"], (status, reply)
    status, reply = bundled.request("POST", "/v2/models/twbert_score/infer",
                                    v2_request(clip, caption_of(serve_clips)))
    assert status == 200, reply


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retrieval_model_ranks_the_index_as_predict_index_does(bundled, qa_artifact, clip_index,
                                                               serve_clips, protocol, capsys):
    served_and_predicted_index(bundled, qa_artifact, clip_index, serve_clips, protocol, capsys)


def test_retrieval_model_answers_bad_requests_with_errors_and_stays_up(bundled, serve_clips):
    for body, message in ((retrieve_request("  "), "text is empty"),
                          (retrieve_request("a caption", k=0), "k must be >= 1"),
                          (retrieve_request("a caption", k=3, shortlist=2),
                           "shortlist 2 is smaller than k 3")):
        status, reply = bundled.request("POST", RETRIEVE, body)
        assert status >= 400 and message in reply.get("error", ""), (status, reply)
    status, reply = bundled.request("POST", RETRIEVE,
                                    retrieve_request(caption_of(serve_clips), top=4))
    assert status == 200, reply
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert outputs["clips"]["shape"] == [1, 4] and len(set(outputs["clips"]["data"])) == 4


def test_bls_models_refuse_client_mistakes_as_serve_does(bundled, qa_artifact, serve_clips,
                                                         tmp_path):
    """The mistakes `serve` refuses (test_hardening), refused by the BLS models alike: HTTP 400
    and gRPC INVALID_ARGUMENT with the one-line reason, no traceback, no path."""
    check_refusals(bundled, qa_artifact, serve_clips, tmp_path)


@pytest.mark.slow  # two more bundled servers
def test_repositories_of_shards_serve_a_fan_out_as_the_unsplit_index(
        serving_python, qa_artifact, clip_index, serve_clips, tmp_path):
    """`triton-repo --index SHARD` writes twbert_shard beside twbert_retrieve, so that the
    stock container can be a shard: `query --shards` over two such servers gives the ranking
    of the unsplit index, as over `export.py serve --index SHARD` (test_fanout)."""
    from twbert_export.retrieval.shards import shard_dir_name, split_index

    split_index(clip_index, 2, tmp_path / "split")
    caption = caption_of(serve_clips)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(bundled_repo_server(
            serving_python, qa_artifact, tmp_path / "split" / shard_dir_name(i, 2),
            tmp_path / f"shard{i}", ("twbert_retrieve", "twbert_shard"))) for i in (1, 2)]
        assert "twbert_shard" in (tmp_path / "shard1" / "repo" / "twbert_shard" /
                                  "config.pbtxt").read_text()
        unsplit = subprocess.run(
            [str(serving_python), "export.py", "predict", "--index", str(clip_index),
             "--artifact", str(qa_artifact), "--text", caption, "--k", "3", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        assert unsplit.returncode == 0, unsplit.stderr
        proc = subprocess.run(
            [str(serving_python), "export.py", "query", "--shards",
             ",".join(s.http for s in servers), "--text", caption, "--k", "3", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == json.loads(unsplit.stdout)
