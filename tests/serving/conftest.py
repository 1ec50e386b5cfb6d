"""A real Triton Inference Server (PyTriton's) serving the demo artifact on loopback.

The server runs in the serving environment (`.venv-serve`, README "Serving"; or the Python named
by $TWBERT_SERVE_PYTHON): PyTriton pins numpy < 2, so it does not share the main environment.
Tests that need the server skip, saying so, where that environment is missing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import export
from clipdata import copy_clips
from triton_server import SERVE_ENV, running_server, serve_python
from twbert_export.export.pipeline import ExportOptions, run_export


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
    run_export(ExportOptions(ckpt="demo", precisions=("fp32",), task="qa",
                             val_data=str(serve_clips), out=str(out), calib_cache=False,
                             rtx_check=False))  # tests/trt/test_rtx.py builds the demo's graphs
    return out


@pytest.fixture(scope="session")
def clip_index(qa_artifact, serve_clips, tmp_path_factory) -> Path:
    """`export.py index` of the served clips, with the split graphs the export wrote beside
    the whole model (so one artifact serves all three models)."""
    out = tmp_path_factory.mktemp("serve-index") / "clips.index"
    assert export.main(["index", "--artifact", str(qa_artifact), "--videos",
                        str(serve_clips / "videos"), "--out", str(out), "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def server(serving_python, qa_artifact, clip_index, tmp_path_factory):
    """`export.py serve --index` on free loopback ports; stopped with SIGINT at the end, which
    must end it with exit 0 within STOP_TIMEOUT_S."""
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with running_server(
            serving_python, lambda http, grpc, metrics: [
                "export.py", "serve", "--artifact", str(qa_artifact), "--index", str(clip_index),
                "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                str(metrics), "--max-queue-delay-us", "50000", "--threads", "1"],
            log, ("twbert_score", "twbert_qa", "twbert_retrieve"), "the server",
            exit_0=True) as server:
        yield server
