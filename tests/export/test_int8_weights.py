"""INT8 weights stored as INT8 (issue 21): the int8 file's DQ-only weights compute what the
FP32-weight Q/DQ form computes (its TensorRT 8.x twin, which gets that form back); weight-only
INT8 (int8w: precision/weight_only.py) on tiny graphs; the TensorRT rules for both forms (lint,
build plans, refusals); and on the session's demo export: the int8w file, its gates and sizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from twbert_export.artifact.manifest import TRT8_FLAVOUR, Manifest
from twbert_export.export import legacy
from twbert_export.precision import quantize_weights, to_int8
from twbert_export.precision.weight_only import quantize_per_channel
from twbert_export.trt.build import plan_for
from twbert_export.trt.commands import build_script, precision_flags
from twbert_export.trt.lint import lint_model
from twbert_export.trt.version import WEIGHT_ONLY_REFUSAL, UnsupportedTensorRT, check_precision

from tinygraphs import Clips, matmul_graph

ort = pytest.importorskip("onnxruntime")


def run(path_or_model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = path_or_model if isinstance(path_or_model, (str, bytes)) else \
        path_or_model.SerializeToString()
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def int8_weights(model) -> list[str]:
    return [t.name for t in model.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]


# -- int8: DQ-only INT8 weights ---------------------------------------------------------------
@pytest.fixture
def int8_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("TWBERT_CACHE", str(tmp_path / "cache"))
    src = matmul_graph(tmp_path / "model.fp32.onnx")
    smooth = np.cumsum(np.random.default_rng(1).standard_normal((20, 16, 64)), axis=-1)
    calib = Clips(smooth.astype(np.float32))
    dst = tmp_path / "model.int8.onnx"
    report = to_int8(src, dst, calib, "max")
    return src, dst, report, smooth[:3].astype(np.float32)


def test_int8_stores_its_weights_as_int8_and_computes_what_the_fp32_weight_form_computes(
        int8_tiny, tmp_path):
    src, dst, report, x = int8_tiny
    model = onnx.load(str(dst))
    assert sorted(int8_weights(model)) == ["w1", "w2"]
    assert report.calibration["int8_weights"] == 2
    # Only the activations keep a QuantizeLinear: none is fed by an initializer any more.
    inits = {t.name for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                and n.input[0] in inits]
    # The TensorRT 8.x twin has the FP32 weights with Q/DQ again: the same numbers.
    twin = tmp_path / "model.int8.trt8.onnx"
    legacy.to_trt8_graph(dst, twin, "8.5")
    twin_model = onnx.load(str(twin))
    assert not int8_weights(twin_model)
    assert sum(n.op_type == "QuantizeLinear" for n in twin_model.graph.node) == 4
    for a, b in zip(run(str(dst), {"x": x}), run(str(twin), {"x": x})):
        np.testing.assert_array_equal(a, b)
    for parser in legacy.PARSERS:
        assert not [f for f in lint_model(twin, parser=parser) if f.severity == "error"]


def test_the_lint_refuses_int8_weights_before_tensorrt_10(int8_tiny):
    _, dst, _, _ = int8_tiny
    for parser in ("8.5", "8.6"):
        errors = [f for f in lint_model(dst, parser=parser) if f.severity == "error"]
        assert errors and all("pre-quantized" in f.reason for f in errors)
    assert not [f for f in lint_model(dst, trt_major=10) if f.severity == "error"]


# -- int8w: weight-only INT8 ------------------------------------------------------------------
def test_per_channel_quantization_is_symmetric_narrow_and_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float32) * np.linspace(0.01, 3, 8)
    w[:, 3] = 0.0  # a channel of zeros
    q, scale = quantize_per_channel(w, axis=1)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (8,)
    assert np.abs(q).max() == 127 and q.min() >= -127
    assert scale[3] == 1 and not q[:, 3].any()
    back = q.astype(np.float32) * scale.astype(np.float32)
    assert (np.abs(back - w) <= scale.astype(np.float32) / 2 + 1e-6).all()


def fp16_graph(shared: bool = False, selection: bool = False):
    """x (FP16) -> MatMul(w1) -> MatMul(w2) -> y; `shared`: w1 also feeds an Add; `selection`:
    the first product is a frame-selection node (kept as it is)."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((32, 32)).astype(np.float16) for _ in range(2))
    first = "/model/selector1/score/MatMul" if selection else "mm1"
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name=first),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 32])]
    if shared:
        nodes.append(helper.make_node("Add", ["w1", "w1"], ["z"], name="add"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT16, [32, 32]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 32])], outputs,
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("case", ["plain", "shared", "selection"])
def test_quantize_weights_puts_int8_behind_dequantize_and_keeps_what_it_must(case):
    model = fp16_graph(shared=case == "shared", selection=case == "selection")
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float16)
    want = run(model, {"x": x})
    assert quantize_weights(model) == (2 if case == "plain" else 1)
    onnx.checker.check_model(model, full_check=True)
    expected = {"plain": ["w1_int8", "w2_int8"], "shared": ["w2_int8"],
                "selection": ["w2_int8"]}[case]
    assert sorted(int8_weights(model)) == expected
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(len(n.input) == 3 for n in dequantize)  # explicit zero point
    got = run(model, {"x": x})
    assert got[0].dtype == np.float16
    a, b = got[0].astype(np.float64).ravel(), want[0].astype(np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine > 0.999


def test_tensorrt_8x_gets_no_int8w_graph_and_a_one_line_refusal(tmp_path):
    model = fp16_graph()
    quantize_weights(model)
    src = tmp_path / "model.int8w.onnx"
    onnx.save(model, str(src))
    with pytest.raises(legacy.LegacyGraphError, match="needs TensorRT 10 or later"):
        legacy.to_trt8_graph(src, tmp_path / "model.int8w.trt8.onnx", "8.5")
    assert "int8w" in legacy.NO_TWIN
    for version in ("8.5", "8.6.2"):
        with pytest.raises(UnsupportedTensorRT, match="int8w"):
            check_precision(version, "int8w")
        with pytest.raises(UnsupportedTensorRT, match="int8w"):
            plan_for(version, "int8w")
    with pytest.raises(UnsupportedTensorRT, match="int8w"):
        precision_flags((8, 6), "int8w")
    with pytest.raises(UnsupportedTensorRT, match="DLA"):
        plan_for("11.4.1", "int8w", dla=True)
    assert plan_for("10.3", "int8w").strongly_typed
    assert precision_flags((10, 3), "int8w") == ["--stronglyTyped"]
    assert "\n" not in WEIGHT_ONLY_REFUSAL


# -- on the session's demo export -------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped(artifact):
    out, report = artifact
    return out, report, Manifest.load(out)


def test_the_demo_int8w_file_has_int8_weights_passes_its_gates_and_has_no_8x_twin(shipped):
    out, report, manifest = shipped
    entry = manifest.file("int8w")
    model = onnx.load(str(out / entry.path))
    assert int8_weights(model)
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert manifest.passed("int8w") is True
    result = report.result("int8w")
    assert all(g["passed"] for g in result.gates)
    assert all(s["divergent"] == 0 for s in result.selection.values())
    assert result.conversion["calibration"]["activation_calibration"] is None
    assert manifest.twin(entry, TRT8_FLAVOUR) is None
    assert manifest.file("int8", flavour=TRT8_FLAVOUR) is not None
    script = build_script(manifest)
    assert "int8w" in script and WEIGHT_ONLY_REFUSAL in script


def test_the_demo_int8_file_stores_int8_weights_and_is_smaller_than_fp16(shipped):
    out, _, manifest = shipped
    int8 = onnx.load(str(out / manifest.file("int8").path))
    int8w = onnx.load(str(out / manifest.file("int8w").path))
    # int8w stores every matrix product's weight as INT8 (68 in the demo); W8A8 all but those
    # ModelOpt leaves FP32 (GEMV-shaped products: 65 of the 68 when this was written).
    assert 0.9 * len(int8_weights(int8w)) <= len(int8_weights(int8)) <= len(int8_weights(int8w))
    sizes = {p: (out / manifest.file(p).path).stat().st_size for p in ("fp16", "int8w", "int8")}
    assert sizes["int8"] < sizes["fp16"] and sizes["int8w"] < sizes["fp16"]


def test_int8w_takes_fewer_calibration_clips_than_int8_needs(tmp_path):
    """int8w calibrates nothing: the 16-clip minimum of INT8 does not apply (4 clips pass the
    input checks that refuse them for int8, tests/export/test_bad_input.py)."""
    from clipdata import copy_clips

    from twbert_export.artifact.input_checks import UserError
    from twbert_export.data.calibration import CalibrationDataError
    from twbert_export.export.job import ExportOptions
    from twbert_export.export.load import resolve_inputs

    few = copy_clips(tmp_path / "few", 4)
    inputs = resolve_inputs(ExportOptions(precisions=("int8w",), calib_data=str(few)))
    assert inputs.precisions == ["fp32", "int8w"] and inputs.calib_dir is not None
    with pytest.raises((UserError, CalibrationDataError), match="at least 16"):
        resolve_inputs(ExportOptions(precisions=("int8w", "int8"), calib_data=str(few)))
