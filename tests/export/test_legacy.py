"""The TensorRT 8.5 / 8.6 graph (twbert_export.export.legacy): each rewrite on a tiny graph against
ONNX Runtime, the lint rules of each parser release, and on a tiny export: the shipped
`model.PRECISION.trt8.onnx` passes the same gates as the main graph, and the printed
Polygraphy check runs (with ONNX Runtime in place of TensorRT) and passes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from twbert_export.export import legacy
from twbert_export.artifact.manifest import DEFAULT_FLAVOUR, TRT8_FLAVOUR, Manifest
from twbert_export.artifact.contract import IOContract
from twbert_export.trt.lint import LintError, check_model, lint_model
from twbert_export.trt.lint import main as lint_main
from twbert_export.trt.commands import polygraphy_command

ort = pytest.importorskip("onnxruntime")


def run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def save(tmp_path: Path, nodes, inputs, outputs, initializers=(), opset=19) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def reduce_graph(tmp_path: Path, op: str) -> Path:
    """x (2, 3, 4) -> op over axis -1 with keepdims=1, axes given as an INPUT (opset 18+)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 1])
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=1, name="reduce")
    return save(tmp_path, [node], [x], [y], [axes])


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceL2", "ReduceSumSquare", "ReduceMax"])
def test_reduce_axes_become_attributes_with_identical_results(tmp_path, op):
    src = reduce_graph(tmp_path, op)
    dst = tmp_path / "model.trt8.onnx"
    info = legacy.to_trt8_graph(src, dst, "8.6")
    model = onnx.load(str(dst))
    (node,) = model.graph.node
    assert model.opset_import[0].version == 17 and list(node.input) == ["x"]
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "axes")) == [-1]
    assert info["reduce_axes_to_attributes"] == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(src, {"x": x})[0], run(dst, {"x": x})[0])


def test_the_lint_refuses_axes_inputs_on_8x_and_accepts_the_converted_graph(tmp_path, capsys):
    src = reduce_graph(tmp_path, "ReduceL2")
    for parser in ("8.5", "8.6"):
        with pytest.raises(LintError, match="ignores it and reduces over every axis"):
            check_model(src, parser=parser)
        assert lint_main([str(src), "--parser", parser]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"TensorRT {parser} would" in err
    check_model(src, parser="10")  # 10.0-GA reads the axes input
    dst = tmp_path / "model.trt8.onnx"
    legacy.to_trt8_graph(src, dst, "8.6")
    assert lint_main([str(dst), "--parser", "8.6"]) == 0


def layer_norm_graph(tmp_path: Path, dtype: int, np_dtype) -> Path:
    x = helper.make_tensor_value_info("x", dtype, [2, 5, 8])
    y = helper.make_tensor_value_info("y", dtype, [2, 5, 8])
    rng = np.random.default_rng(1)
    scale = numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np_dtype), "scale")
    bias = numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np_dtype), "bias")
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1,
                            epsilon=1e-5, name="norm")
    return save(tmp_path, [node], [x], [y], [scale, bias])


@pytest.mark.parametrize("dtype, np_dtype, atol", [(TensorProto.FLOAT, np.float32, 2e-6),
                                                   (TensorProto.FLOAT16, np.float16, 4e-3)])
def test_layer_norm_is_decomposed_for_85_with_fp32_statistics(tmp_path, dtype, np_dtype, atol):
    src = layer_norm_graph(tmp_path, dtype, np_dtype)
    with pytest.raises(LintError, match="the 8.5 parser has no importer"):
        check_model(src, parser="8.5")
    check_model(src, parser="8.6")  # 8.6-GA imports it (INormalizationLayer)
    dst = tmp_path / "model.trt8.onnx"
    info = legacy.to_trt8_graph(src, dst, "8.5")
    assert info["layer_norms_decomposed"] == 1
    nodes = onnx.load(str(dst)).graph.node
    assert "LayerNormalization" not in {n.op_type for n in nodes}
    check_model(dst, parser="8.5")
    if dtype == TensorProto.FLOAT16:  # statistics in FP32: cast up first, back before scale
        casts = [helper.get_attribute_value(n.attribute[0]) for n in nodes if n.op_type == "Cast"]
        assert casts == [TensorProto.FLOAT, TensorProto.FLOAT16]
    # Large offsets (the FP16 variance of such rows would overflow or lose them): compared with
    # LayerNorm in float64, the decomposition is as close as ONNX Runtime's own kernel.
    x = (np.random.default_rng(2).standard_normal((2, 5, 8)) * 30 + 200).astype(np_dtype)
    graph = {i.name: numpy_helper.to_array(i).astype(np.float64)
             for i in onnx.load(str(src)).graph.initializer}
    x64 = x.astype(np.float64)
    exact = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    exact = exact * graph["scale"] + graph["bias"]
    ours = np.abs(run(dst, {"x": x})[0].astype(np.float64) - exact).max()
    ortk = np.abs(run(src, {"x": x})[0].astype(np.float64) - exact).max()
    assert ours <= max(2 * ortk, atol), (ours, ortk)


def qdq_graph(tmp_path: Path, zero_point: bool) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero")]
    qdq = ["scale", "zero"] if zero_point else ["scale"]
    nodes = [helper.make_node("QuantizeLinear", ["x", *qdq], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", *qdq], ["y"], name="dq")]
    return save(tmp_path, nodes, [x], [y], inits)


def test_qdq_passes_with_the_explicit_int8_zero_point_85_requires(tmp_path):
    src, dst = qdq_graph(tmp_path, zero_point=True), tmp_path / "model.trt8.onnx"
    legacy.to_trt8_graph(src, dst, "8.5")
    feed = {"x": np.array([-1.0, 0.02, 0.3, 2.0], np.float32)}
    np.testing.assert_array_equal(run(src, feed)[0], run(dst, feed)[0])
    # Without a zero point ONNX quantizes to UINT8 (-1 -> 0), TensorRT to INT8: refused.
    with pytest.raises(legacy.LegacyGraphError, match="UINT8"):
        legacy.to_trt8_graph(qdq_graph(tmp_path, zero_point=False), dst, "8.5")


def test_what_has_no_opset17_form_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    pads = numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap", name="pad")
    src = save(tmp_path, [node], [x], [y], [pads])
    with pytest.raises(legacy.LegacyGraphError, match="wrap"):
        legacy.to_trt8_graph(src, tmp_path / "out.onnx", "8.5")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(ValueError, match="parser_version"):
        legacy.to_trt8_graph(src, tmp_path / "out.onnx", "10.3")


# -- on a tiny export ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped(artifact):
    """The session's demo export (tests/export/conftest.py), which ships the trt8 twins."""
    out, report = artifact
    return out, report, Manifest.load(out)


def test_the_export_ships_an_8x_graph_per_precision_that_passes_the_same_gates(shipped):
    out, report, manifest = shipped
    for p in ("fp32", "fp16"):
        twin = manifest.file(p, flavour=TRT8_FLAVOUR)
        assert twin.path == f"model.{p}.trt8.onnx"
        assert manifest.passed(p, TRT8_FLAVOUR) is True
        result = report.result(p, TRT8_FLAVOUR)
        assert result.gate == report.result(p).gate  # the precision's gates
        assert all(g["passed"] for g in result.gates)
        for parser in legacy.PARSERS:  # nothing either parser would reject or mis-import
            assert not [f for f in lint_model(out / twin.path, parser=parser)
                        if f.severity == "error"]
    fp16 = report.result("fp16", TRT8_FLAVOUR)
    assert all(s["divergent"] == 0 for s in fp16.selection.values())


def test_the_86_rules_alone_are_output_identical_on_onnx_runtime(shipped, tmp_path):
    """Opset 17 + axes attributes change no number (same kernels); only the 8.5 LayerNorm
    decomposition does, which is why the shipped file is validated with the gates."""
    from polygraphy.json import load_json

    out, _, _ = shipped
    feed = load_json(str(out / "reference/inputs.json"))[0]
    dst = tmp_path / "model.fp16.86.onnx"
    legacy.to_trt8_graph(out / "model.fp16.onnx", dst, "8.6")
    for a, b in zip(run(out / "model.fp16.onnx", feed), run(dst, feed)):
        np.testing.assert_array_equal(a, b)


def test_the_int32_reference_inputs_for_8x_engines_hold_the_same_rows(shipped):
    from polygraphy.json import load_json

    out, _, _ = shipped
    wide, narrow = (load_json(str(out / f"reference/{n}.json")) for n in ("inputs",
                                                                          "inputs.int32"))
    for a, b in zip(wide, narrow):
        assert b["input_ids"].dtype == np.int32 and b["video"].dtype == np.float32
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("precision, flavour", [("fp16", DEFAULT_FLAVOUR),
                                               ("fp16", TRT8_FLAVOUR), ("fp32", TRT8_FLAVOUR)])
def test_the_printed_polygraphy_check_runs_and_passes_with_onnx_runtime(shipped, precision,
                                                                        flavour):
    """The command export.py prints, with --onnxrt (and the ONNX file) in place of the
    engine and --trt: same inputs, reference outputs and per-output tolerances."""
    out, report, manifest = shipped
    contract = manifest.contract
    errors = report.result(precision, flavour).outputs
    onnx_name = manifest.file(precision, flavour=flavour).path
    trt8 = flavour == TRT8_FLAVOUR
    printed = polygraphy_command(onnx_name.replace(".onnx", ".engine"), precision, errors,
                                 trt_major=8 if trt8 else 10)
    assert "--model-type engine --trt" in printed
    assert ("inputs.int32.json" in printed) == trt8
    assert "frame_indices_1:0" in printed  # integer outputs: exactly equal
    built = polygraphy_command(onnx_name, precision, errors, contract, trt_major=10)
    assert "--strongly-typed" in built and "--trt-max-shapes" in built
    for command in (polygraphy_command(onnx_name, precision, errors, backend="onnxrt"),
                    built.replace(" --trt ", " --onnxrt ")):  # the TensorRT flags must parse
        argv = shlex.split(command)
        bindir = Path(sys.executable).parent
        proc = subprocess.run([str(bindir / argv[0]), *argv[1:]], cwd=out, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PATH": str(bindir)
                                                           + os.pathsep + os.environ["PATH"]})
        assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stdout[-2000:] + proc.stderr


@pytest.mark.slow  # exports the four split graphs: about 40 s
def test_the_split_graphs_get_trt8_twins_that_compose_as_the_originals(tmp_path):
    """Issue 14's 8.x rules apply to every graph of an artifact: the four split graphs
    (split.py, not yet in the export) convert and lint for both parsers as trt8_stage would
    convert them, and composed they give what the originals give."""
    from model import load_checkpoint
    from twbert_export.data.assets import resolve_checkpoint
    from twbert_export.export.onnx_export import example_feed
    from twbert_export.validation.composed import ComposedSplit
    from twbert_export.export.split import export_split, split_contracts

    model, _ = load_checkpoint(resolve_checkpoint("demo"))
    monolithic = IOContract.for_model(model.cfg)
    contracts = split_contracts(monolithic, model.eval().cfg)
    files = export_split(model, contracts, tmp_path)
    (tmp_path / "trt8").mkdir()
    twins = {graph: legacy.write_trt8_twin(path, tmp_path / "trt8")
             for graph, path in files.items()}
    assert all(onnx.load(str(t)).opset_import[0].version == legacy.LEGACY_OPSET
               for t in twins.values())
    feed = example_feed(monolithic, batch=4, seed=1)
    expected = ComposedSplit(files, contracts, monolithic).infer(feed)
    got = ComposedSplit(twins, contracts, monolithic).infer(feed)
    for name in ("itm_logits", "itc_sim"):
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0)
    for name in ("frame_indices_1", "frame_indices_2"):
        np.testing.assert_array_equal(got[name], expected[name])
