"""A precision per split graph (issue 21, artifact/plan.py): the plan's rules, its bad input
(one line, exit 2, before anything loads), and how index / predict --index / triton-repo pick
the plan's files. The export of a plan, its validation and serving: tests/serving/test_serve_plan.py
(slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import export
from twbert_export.artifact.manifest import Manifest, PlanEntry
from twbert_export.artifact.plan import (PlanError, model_precision, parse_plan,
                                         resolve_plan, split_plans)
from twbert_export.retrieval.clip_index import INDEX_FILE
from twbert_export.retrieval.gallery import SplitArtifact

EDGE = "video_stem=int8,text=fp16,select=fp16,fuse=fp16"


def test_a_plan_is_named_by_its_common_precision_and_its_exceptions():
    plan = parse_plan(EDGE)
    assert plan.name == "fp16+video_stem-int8"
    assert plan.spec == "text=fp16,video_stem=int8,select=fp16,fuse=fp16"  # graph order
    assert plan.precisions == ["fp32", "fp16", "int8"]  # what the export converts to
    assert plan.model == "fp16"  # the whole model: the plan's most accurate precision
    assert plan.gate_precision == "int8"  # judged by its least accurate precision's gates
    assert plan.needs("video_stem", "int8") and not plan.needs("text", "int8")
    assert plan.needs("model", "fp16") and not plan.needs("model", "int8")
    assert all(plan.needs(g, "fp32") for g in ("model", "text", "video_stem"))
    # model=P keeps the whole model elsewhere; the name is the split graphs'
    other = parse_plan(EDGE + ",model=fp32")
    assert other.model == "fp32" and other.name == plan.name and other.precisions == plan.precisions
    # A tie goes to the more accurate precision; a uniform plan is named by its precision.
    assert parse_plan("text=fp32,video_stem=int8,select=int8,fuse=fp32").name == \
        "fp32+video_stem-int8+select-int8"
    uniform = parse_plan("text=fp16,video_stem=fp16,select=fp16,fuse=fp16")
    assert uniform.uniform and uniform.name == "fp16"


@pytest.mark.parametrize("text, message", [
    ("video=int8,text=fp16,select=fp16,fuse=fp16", "unknown graph 'video'"),
    ("video_stem=int4,text=fp16,select=fp16,fuse=fp16", "unknown precision 'int4'"),
    ("video_stem=int8,text=fp16", "gives no precision to select, fuse"),
    ("video_stem=int8,video_stem=fp16,text=fp16,select=fp16,fuse=fp16", "named twice"),
    ("video_stem=int8,fp16,select=fp16,fuse=fp16", "is not GRAPH=PRECISION"),
])
def test_a_bad_plan_says_what_is_wrong(text, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(text)


@pytest.mark.parametrize("extra, message", [
    (["--precision", "video=int8,text=fp16,select=fp16,fuse=fp16"], "unknown graph 'video'"),
    (["--precision", "video_stem=int4,text=fp16,select=fp16,fuse=fp16"], "unknown precision"),
    (["--precision", EDGE, "--graphs", "monolithic"], "writes the whole model only"),
    (["--precision", EDGE, "--calib-data", "{tmp}/none"],
     "the plan fp16+video_stem-int8 needs calibration data"),
])
def test_export_refuses_a_bad_plan_in_one_line_with_exit_2(extra, message, small_val, tmp_path,
                                                           capsys):
    args = [a.format(tmp=tmp_path) for a in extra]
    assert export.main([*args, "--val-data", str(small_val), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert len(err) == 2 and err[0].startswith("error: ") and message in err[0], err
    assert err[1].startswith("hint: ")
    assert not (tmp_path / "a").exists()


# -- the consumers ------------------------------------------------------------------------------
@pytest.fixture
def plan_artifact(artifact, tmp_path) -> Path:
    """The session artifact (every graph at fp32, fp16, int8w, int8) with the edge plan named in its
    manifest, as a plan export names it (the plan export itself: the slow test)."""
    out, _ = artifact
    copy = tmp_path / "plan-artifact"
    shutil.copytree(out, copy)
    manifest = Manifest.load(copy)
    plan = parse_plan(EDGE)
    manifest.plans = {plan.name: PlanEntry(plan.by_graph, plan.model, {"trt10": True})}
    manifest.write(copy)
    return copy


def test_the_plans_of_an_artifact_and_their_round_trip(artifact, plan_artifact):
    out, _ = artifact
    # One plan per precision every split graph has, the least accurate first.
    assert list(split_plans(Manifest.load(out))) == ["int8", "int8w", "fp16", "fp32"]
    manifest = Manifest.load(plan_artifact)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))).plans == manifest.plans
    assert list(split_plans(manifest))[0] == "fp16+video_stem-int8"  # the exported plan first
    # Its name and its list give the same plan; a precision is the plan of that name.
    assert resolve_plan(manifest, EDGE) == resolve_plan(manifest, "fp16+video_stem-int8")
    assert resolve_plan(manifest, "fp16")[1] == {g: "fp16" for g in parse_plan(EDGE).by_graph}
    assert model_precision(manifest, "fp16+video_stem-int8") == "fp16"
    assert model_precision(manifest, "int8") == "int8" and model_precision(manifest, None) is None
    # A combination nobody exported (and so nobody validated) is refused.
    with pytest.raises(PlanError, match="no such split graphs"):
        resolve_plan(manifest, "video_stem=fp16,text=int8,select=fp16,fuse=fp16")


def test_index_and_predict_index_run_the_plans_graphs(plan_artifact, small_val, tmp_path,
                                                      capsys):
    split = SplitArtifact(plan_artifact)  # default: the exported plan
    assert split.precision == "fp16+video_stem-int8"
    assert {g: e.precision for g, e in split.entries.items()} == parse_plan(EDGE).by_graph
    index = tmp_path / "index"
    assert export.main(["index", "--artifact", str(plan_artifact), "--videos", str(small_val),
                        "--out", str(index), "--threads", "1"]) == 0
    assert "plan fp16+video_stem-int8, video_stem.int8 (video_stem.int8.onnx" in capsys.readouterr().out
    manifest = Manifest.load(plan_artifact)
    assert json.loads((index / INDEX_FILE).read_text())["artifact"] == \
        manifest.file("int8", "video_stem").sha256
    # predict --index takes the plan that holds the index's video_stem: the exported plan
    # before the uniform int8 graphs that share it.
    queried = SplitArtifact.for_index(plan_artifact, index)
    assert queried.precision == "fp16+video_stem-int8"
    assert SplitArtifact.for_index(plan_artifact, index, precision="int8").precision == "int8"
    caption = json.loads((small_val / "annotations.jsonl").read_text().splitlines()[0])["caption"]
    base = ["predict", "--index", str(index), "--artifact", str(plan_artifact), "--text", caption]
    assert export.main([*base, "--precision", EDGE, "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)["ranking"]
    assert len(ranking) == len(list((small_val / "videos").glob("*.mp4")))
    # A plan whose video_stem did not make the index: one line, exit 2.
    assert export.main([*base, "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "holds the stems of video_stem.int8" in err[0], err


def test_triton_repo_serves_the_whole_model_at_the_plans_precision(plan_artifact, small_val,
                                                                   tmp_path):
    from twbert_export.serving.triton_repo import MARKER, write_repo

    index = tmp_path / "index"
    assert export.main(["index", "--artifact", str(plan_artifact), "--videos", str(small_val),
                        "--out", str(index), "--threads", "1"]) == 0
    repo = tmp_path / "repo"
    write_repo(plan_artifact, repo, "fp16+video_stem-int8", index=index)
    assert json.loads((repo / MARKER).read_text())["precision"] == "fp16"


def test_consumers_refuse_a_plan_the_artifact_lacks_in_one_line(artifact, small_val, tmp_path,
                                                                capsys):
    out, _ = artifact
    assert export.main(["index", "--artifact", str(out), "--videos", str(small_val), "--out",
                        str(tmp_path / "i"), "--precision", EDGE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such split graphs (it has int8, int8w, fp16, fp32)" in err[0], err


def test_build_artifact_takes_each_graphs_file_of_the_plan(plan_artifact):
    from twbert_export.trt.cli import artifact_onnx_files

    manifest = Manifest.load(plan_artifact)
    names = lambda sel, p: [f.name for f in artifact_onnx_files(manifest, plan_artifact, sel, p)]  # noqa: E731
    plan_files = ["text.fp16.onnx", "video_stem.int8.onnx", "select.fp16.onnx", "fuse.fp16.onnx"]
    assert names("split", None) == plan_files  # default: the exported plan
    assert names("split", EDGE) == names("split", "fp16+video_stem-int8") == plan_files
    assert names("all", None) == ["model.fp16.onnx", *plan_files]  # the plan's model precision
    assert names("split", "int8") == [f"{g}.int8.onnx" for g in ("text", "video_stem", "select",
                                                                  "fuse")]


def test_a_plan_without_a_trt8_twin_for_a_graph_has_no_trt8_files():
    """int8w has no TensorRT 8.x form (legacy.NO_TWIN): the plan's trt8 flavour is left out,
    not looked up (a KeyError after every conversion had run: review of issue 21)."""
    from twbert_export.artifact.manifest import TRT8_FLAVOUR
    from twbert_export.export.job import Conversion

    plan = parse_plan("text=fp16,video_stem=int8w,select=fp16,fuse=fp16")
    conversion = Conversion()
    for graph, precision in plan.graphs:
        conversion.files[(graph, precision)] = Path(f"{graph}.{precision}.onnx")
        if precision != "int8w":
            conversion.twins.setdefault(TRT8_FLAVOUR, {})[(graph, precision)] = \
                Path(f"{graph}.{precision}.trt8.onnx")
    assert conversion.plan_files(plan)["video_stem"].name == "video_stem.int8w.onnx"
    assert conversion.plan_files(plan, TRT8_FLAVOUR) is None


@pytest.mark.slow  # an export with its FP16 and int8w steps: minutes
def test_an_int8w_plan_with_an_int8w_whole_model_exports_and_validates(small_val, tmp_path):
    """Both crash paths the review found: a plan with an int8w graph (validate stage) and a
    whole model whose last precision is int8w (write stage: its trt8 next command)."""
    from twbert_export.artifact.manifest import Report
    from twbert_export.export.pipeline import ExportOptions, run_export

    spec = "text=fp16,video_stem=int8w,select=fp16,fuse=fp16,model=int8w"
    result = run_export(ExportOptions(ckpt="demo", plan=spec, val_data=str(small_val),
                                      out=str(tmp_path / "demo"), rtx_check=False, val_limit=3))
    assert not result.report.failed
    manifest = Manifest.load(tmp_path / "demo")
    assert manifest.file("int8w", "model") is not None
    name = parse_plan(spec).name
    assert manifest.plans[name].parity == {"trt10": True}  # no 8.x form of int8w
    report = Report.load(tmp_path / "demo")
    assert report.split[name].passed and f"{name}.trt8" not in report.split
    assert not any("8.5 / 8.6" in c for c in report.next_commands)
