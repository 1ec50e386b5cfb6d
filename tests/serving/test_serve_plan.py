"""A per-graph precision plan end to end (issue 21): exported (each split graph only at its
plan's precision, the whole model at one), validated composed with its gates, named in the
manifest, indexed, queried with `predict --index` and served by `serve --index` with the same
ranking. Slow: the plan's export (FP16 and INT8 steps, calibration included)."""

from __future__ import annotations

from pathlib import Path

import pytest

import export
from triton_server import running_server, served_and_predicted_index
from twbert_export.artifact.manifest import DEFAULT_FLAVOUR, Manifest, Report
from twbert_export.export.pipeline import ExportOptions, run_export
from twbert_export.validation.parity import DEFAULT_GATES

EDGE = "video_stem=int8,text=fp16,select=fp16,fuse=fp16"
NAME = "fp16+video_stem-int8"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plan_export(tmp_path_factory, serve_clips):
    out = tmp_path_factory.mktemp("plan-engines") / "demo-plan"
    result = run_export(ExportOptions(ckpt="demo", plan=EDGE, val_data=str(serve_clips),
                                      out=str(out), rtx_check=False))
    return out, result


@pytest.fixture(scope="module")
def plan_index(plan_export, serve_clips, tmp_path_factory) -> Path:
    out, _ = plan_export
    index = tmp_path_factory.mktemp("plan-index") / "clips.index"
    assert export.main(["index", "--artifact", str(out), "--videos", str(serve_clips / "videos"),
                        "--out", str(index), "--threads", "1"]) == 0
    return index


def test_a_plan_export_writes_each_graph_at_its_precision_and_gates_it_composed(plan_export):
    out, result = plan_export
    assert not result.report.failed
    manifest = Manifest.load(out)
    written = {(f.graph, f.precision) for f in manifest.entries(DEFAULT_FLAVOUR)}
    assert written == {(g, p) for g in ("model", "text", "select", "fuse")
                       for p in ("fp32", "fp16")} | {("video_stem", "fp32"),
                                                     ("video_stem", "int8")}
    assert manifest.precisions == ["fp32", "fp16", "int8"]
    plan = manifest.plans[NAME]
    assert plan.graphs == {"text": "fp16", "video_stem": "int8", "select": "fp16",
                           "fuse": "fp16"}
    assert plan.model == "fp16" and plan.parity == {"trt10": True, "trt8": True}
    report = Report.load(out)
    for label in (NAME, f"{NAME}.trt8"):
        assert report.split[label].passed
        assert report.split[label].gate["metric_keys"] == list(DEFAULT_GATES["int8"].metric_keys)
    # each graph's own precision step is reported with the plan
    assert set(report.split[NAME].conversion) == {"text", "video_stem", "select", "fuse"}
    assert report.split[NAME].conversion["video_stem"]["calibration"]["int8_nodes"] > 0


def test_a_plan_is_indexed_queried_and_served_with_the_same_ranking(
        serving_python, plan_export, plan_index, serve_clips, tmp_path_factory, capsys):
    out, _ = plan_export
    log = tmp_path_factory.mktemp("plan-serve-log") / "serve.log"
    with running_server(
            serving_python, lambda http, grpc, metrics: [
                "export.py", "serve", "--artifact", str(out), "--index", str(plan_index),
                "--precision", NAME, "--http-port", str(http), "--grpc-port", str(grpc),
                "--metrics-port", str(metrics), "--threads", "1"],
            log, ("twbert_score", "twbert_retrieve"), "the server", exit_0=True) as server:
        served_and_predicted_index(server, out, plan_index, serve_clips, "http", capsys)
    assert f"{NAME}" in log.read_text()
