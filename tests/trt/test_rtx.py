"""TensorRT-RTX's own ONNX parser and CPU (ahead-of-time) builder on our graphs (trt/rtx.py).

Runs here without a GPU: the parser and the AOT builder need none. Skips when the TensorRT-RTX
wheels are not installed (they are in pyproject's dependencies on x86-64). The GPU half (running
the engines) is tests/trt/test_rtx_gpu.py, marked gpu.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from blocked_imports import run_without
from onnx import TensorProto, helper, numpy_helper

from twbert_export.artifact.contract import BatchRange, IOContract, TensorSpec
from twbert_export.artifact.manifest import FLAVOURS, PRECISIONS, TRT8_FLAVOUR, Manifest, Report
from twbert_export.export.legacy import NO_TWIN
from twbert_export.precision import SELECTION_NODES
from twbert_export.trt import rtx

RTX, WHY = rtx.load_rtx()
needs_rtx = pytest.mark.skipif(RTX is None, reason=WHY)


def tiny_contract() -> IOContract:
    return IOContract((TensorSpec("x", "float32", ("batch", 4)),),
                      (TensorSpec("y", "float32", ("batch", 4)),), BatchRange(1, 2, 4))


def scorer_graph(path: Path, selection_type: int = TensorProto.FLOAT, bad_op: bool = False) -> Path:
    """x -> MatMul named like a frame scorer (/model/selector1/...) -> Relu -> y. With
    `selection_type` FLOAT16 the scorer runs in FP16 (Casts around it); with `bad_op` a node
    TensorRT has no importer for (Unique) stands in the middle."""
    w = np.eye(4, dtype=np.float32 if selection_type == TensorProto.FLOAT else np.float16)
    nodes, src = [], "x"
    if selection_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=selection_type, name="to16"))
        src = "x16"
    nodes.append(helper.make_node("MatMul", [src, "w"], ["s"], name="/model/selector1/MatMul"))
    if selection_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.FLOAT, name="to32"))
        src = "s32"
    else:
        src = "s"
    if bad_op:
        nodes.append(helper.make_node("Unique", [src], ["u"], name="/model/planted/Unique"))
        src = "u"
    nodes.append(helper.make_node("Relu", [src], ["y"], name="/model/relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def spec(path: Path, precision: str = "fp32") -> rtx.GraphSpec:
    return rtx.GraphSpec("model", precision, "trt10", path, tiny_contract())


# -- the demo artifact's graphs (the export fixture ran the rtx stage) -----------------------------
@needs_rtx
def test_every_shipped_graph_of_the_demo_artifact_parses_and_builds(artifact):
    out, report = artifact
    check = report.rtx
    assert check is not None and check.ran and check.version == RTX.__version__
    manifest = Manifest.load(out)
    # every ONNX file of the artifact, each graph, precision and flavour, was checked once
    assert sorted(g.onnx for g in check.graphs) == sorted(f.path for f in manifest.files)
    assert {(g.precision, g.flavour) for g in check.graphs} == {
        (p, fl) for p in PRECISIONS for fl in FLAVOURS
        if not (fl == TRT8_FLAVOUR and p in NO_TWIN)}  # int8w: TensorRT 10+ only, no twin
    assert all(g.built and g.engine_bytes > 100_000 for g in check.graphs), \
        [(g.onnx, g.note) for g in check.graphs if not g.built]
    assert not any(g.engine for g in check.graphs)  # kept only with --rtx-engines
    assert not list(out.glob("*.rtx.engine"))
    # what report.json holds is what the export returned
    assert Report.load(out).rtx == check
    assert "## TensorRT-RTX" in (out / "report.md").read_text()


@needs_rtx
def test_tensorrt_sees_the_precisions_we_wrote(artifact):
    """TensorRT's own types of the parsed networks: FP32 files have no HALF MatMul, the FP16
    whole model has mostly HALF MatMuls, and every layer on the selection path is FP32."""
    _, report = artifact
    by_file = {g.onnx: g for g in report.rtx.graphs}
    assert set(by_file["model.fp32.onnx"].matmul) == {"FLOAT"}
    fp16 = by_file["model.fp16.onnx"].matmul
    assert fp16["HALF"] > 5 * fp16["FLOAT"] > 0
    for name in ("model.fp16.onnx", "model.int8.onnx", "select.fp16.onnx",
                 "model.fp16.trt8.onnx"):
        assert by_file[name].selection_layers > 10 and by_file[name].selection_not_fp32 == []
    assert by_file["text.fp16.onnx"].selection_layers == 0  # no selector in the text graph
    # the W8A8 graph reaches TensorRT with its Q/DQ pairs; the others have none
    assert by_file["model.int8.onnx"].qdq_layers > 100
    assert by_file["model.fp16.onnx"].qdq_layers == 0
    # every warning the parser or builder gave is explained in report.json
    assert report.rtx.warnings and "not explained yet" not in report.rtx.warnings.values()


# -- refusals and the audit ---------------------------------------------------------------------
@needs_rtx
def test_a_graph_the_parser_rejects_fails_with_its_message_and_node(tmp_path):
    bad = scorer_graph(tmp_path / "model.fp32.onnx", bad_op=True)
    with pytest.raises(rtx.RtxGraphError) as e:
        rtx.build_graphs([spec(bad)], SELECTION_NODES, trt=RTX)
    assert e.value.node == "/model/planted/Unique" and e.value.op == "Unique"
    assert e.value.phase == "ONNX parse" and "UNSUPPORTED_NODE" in e.value.message
    assert str(e.value).startswith("model.fp32.onnx: TensorRT-RTX ONNX parse failed at node "
                                   "/model/planted/Unique (Unique): UNSUPPORTED_NODE")


@needs_rtx
def test_an_int8_graph_it_cannot_take_is_recorded_not_raised(tmp_path):
    bad = scorer_graph(tmp_path / "model.int8.onnx", bad_op=True)
    [result] = rtx.build_graphs([spec(bad, "int8")], SELECTION_NODES, trt=RTX)
    assert not result.built and "/model/planted/Unique" in result.note
    with pytest.raises(rtx.RtxGraphError):  # unless asked to fail
        rtx.build_graphs([spec(bad, "int8")], SELECTION_NODES, trt=RTX, int8_may_fail=False)


@needs_rtx
def test_an_fp16_layer_on_the_selection_path_fails_the_audit(tmp_path):
    planted = scorer_graph(tmp_path / "model.fp16.onnx", TensorProto.FLOAT16)
    with pytest.raises(rtx.RtxAuditError) as e:
        rtx.build_graphs([spec(planted, "fp16")], SELECTION_NODES, trt=RTX)
    assert e.value.layers == ["/model/selector1/MatMul (MATRIX_MULTIPLY): HALF"]
    # the same graph with the scorer in FP32 passes and builds
    [ok] = rtx.build_graphs([spec(scorer_graph(tmp_path / "ok.onnx"))], SELECTION_NODES, trt=RTX)
    assert ok.built and ok.selection_layers == 1 and ok.matmul == {"FLOAT": 1}


@needs_rtx
def test_engines_are_kept_only_when_asked_with_a_sidecar(tmp_path):
    src = scorer_graph(tmp_path / "model.fp32.onnx")
    [r] = rtx.build_graphs([spec(src)], SELECTION_NODES, engines=tmp_path, trt=RTX)
    engine = tmp_path / "model.fp32.rtx.engine"
    assert r.engine == engine.name and engine.stat().st_size == r.engine_bytes
    sidecar = rtx.engine_sidecar(engine)
    assert sidecar["tensorrt_rtx_version"] == RTX.__version__
    assert sidecar["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"]
    assert "ahead-of-time" in sidecar["build"] and "CPU" in sidecar["build"]
    assert sidecar["profile_shapes"] == {"x": [[1, 4], [2, 4], [4, 4]]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary file left behind
        "model.fp32.onnx", "model.fp32.rtx.engine", "model.fp32.rtx.engine.json"]


def test_export_exits_1_with_one_line_when_nvidia_refuses_a_graph(monkeypatch, capsys):
    import export
    from twbert_export.export import pipeline

    def refuse(opts):
        raise rtx.RtxGraphError("model.fp16.onnx", "ONNX parse", "UNSUPPORTED_NODE: false",
                                "/model/planted/Unique", "Unique")

    monkeypatch.setattr(pipeline, "run_export", refuse)
    assert export.main(["--out", "unused"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at node /model/planted/Unique (Unique)" in err[0]


def test_without_the_wheels_the_stage_says_so_in_one_line_and_goes_on():
    code = (
        "from twbert_export.trt import rtx\n"
        "class Lines:\n"
        "    def line(self, name, seconds, path, note=''): print(f'[rtx] {name} {note}')\n"
        "check = rtx.rtx_stage([('model', 'fp32', 'trt10', 'x.onnx')], {}, (), Lines())\n"
        "assert not check.ran and check.graphs == [], check\n"
        "print(check.to_dict()['reason'])\n")
    proc = run_without(("tensorrt_rtx_bindings", "tensorrt_rtx_libs", "tensorrt_rtx"), code)
    assert proc.returncode == 0, proc.stderr
    line, reason = proc.stdout.strip().splitlines()
    assert line.startswith("[rtx] rtx skipped: TensorRT-RTX is not installed (pip install "
                           "tensorrt-rtx-cu12-libs==")
    assert reason in line


def test_a_library_caller_may_leave_the_stage_out_and_the_line_says_so(tmp_path):
    """ExportOptions.rtx_check=False (the serving tests' artifact): one 'skipped' line, nothing
    parsed (the file named does not even exist), nothing recorded as built."""
    lines = []

    class Lines:
        def line(self, name, seconds, path, note=""):
            lines.append(f"{name} {note}")

    check = rtx.rtx_stage([("model", "fp32", "trt10", tmp_path / "absent.onnx")], {}, (),
                          Lines(), asked=False)
    assert not check.ran and check.graphs == []
    assert lines == ["rtx skipped: not asked for (ExportOptions.rtx_check)"]


def test_the_rtx_module_imports_without_tensorrt_rtx_torch_or_modelopt():
    blocked = ("tensorrt_rtx_bindings", "tensorrt_rtx_libs", "torch", "modelopt", "tensorrt")
    proc = run_without(blocked, "import twbert_export.trt.rtx\n"
                                "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                                "('torch', 'modelopt', 'onnxruntime')))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_report_json_round_trips_the_check():
    from twbert_export.artifact.manifest import RtxCheck, RtxGraphBuild

    check = RtxCheck(True, "1.7.1.116", graphs=[RtxGraphBuild(
        "model", "fp16", "trt10", "model.fp16.onnx", True, 0.4, 5.1, 21_000_000,
        matmul={"HALF": 103, "FLOAT": 10}, normalization={"HALF": 25, "FLOAT": 2},
        selection_layers=87, parser_warnings=["w"])], warnings={"w": "why"})
    assert RtxCheck.from_dict(json.loads(json.dumps(check.to_dict())), "report.json") == check


# -- the runner's refusals (running is tests/trt/test_rtx_gpu.py) ----------------------------------
def test_an_rtx_engine_maps_to_the_onnx_file_it_came_from():
    from trtdata import artifact_manifest

    manifest = artifact_manifest(("fp32", "fp16"))
    assert manifest.entry_for("a/model.fp16.rtx.engine") == manifest.file("fp16")
    assert manifest.entry_for("model.fp16.trt8.rtx.engine") == manifest.file("fp16",
                                                                                flavour="trt8")


@needs_rtx
def test_the_runner_refuses_an_engine_of_another_file_before_touching_a_gpu(tmp_path):
    from twbert_export.trt.engine_manifest import EngineMismatch
    from twbert_export.trt.rtx_runtime import rtx_runner
    from twbert_export.trt.targets import query_cuda_device

    src = scorer_graph(tmp_path / "model.fp32.onnx")
    [r] = rtx.build_graphs([spec(src)], SELECTION_NODES, engines=tmp_path, trt=RTX)
    with pytest.raises(EngineMismatch, match="was built from another model.fp32.onnx"):
        rtx_runner(tmp_path / r.engine, tiny_contract(), onnx_sha256="0" * 64).activate()
    if query_cuda_device() is None:
        with pytest.raises(EngineMismatch, match="no CUDA GPU visible here: model.fp32.rtx.engine "
                                                 "runs only on a GPU"):
            rtx_runner(tmp_path / r.engine, tiny_contract()).activate()


@needs_rtx
@pytest.mark.slow
def test_a_planted_bad_graph_stops_a_real_export_and_nothing_is_moved_into_place(
        tmp_path, small_val, monkeypatch, capsys):
    """The whole export (FP32, whole model), with one more file for the rtx stage: a graph
    NVIDIA's parser rejects. Exit 1, the parser's message and node in one line, no artifact and
    no scratch directory left."""
    import export
    from twbert_export.export import pipeline

    bad = scorer_graph(tmp_path / "planted.fp32.onnx", bad_op=True)
    real_stage = pipeline.rtx_stage

    def with_planted_graph(entries, contracts, *args, **kwargs):
        return real_stage([*entries, ("model", "fp32", "trt10", bad)], contracts, *args,
                          **kwargs)

    monkeypatch.setattr(pipeline, "rtx_stage", with_planted_graph)
    out = tmp_path / "out"
    code = export.main(["--precision", "fp32", "--graphs", "monolithic", "--val-data",
                        str(small_val), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith(
        "error: planted.fp32.onnx: TensorRT-RTX ONNX parse failed at node /model/planted/Unique "
        "(Unique): UNSUPPORTED_NODE")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planted.fp32.onnx"]
