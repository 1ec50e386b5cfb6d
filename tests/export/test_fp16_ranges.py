"""Activation ranges: one forward pass per calibration clip gives every tensor's largest |value|,
for the FP16 range check (nodes beyond FP16's safe range stay FP32) and for INT8 max
calibration (the same scales ModelOpt's own calibration computes)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from twbert_export.precision.modelopt_compat import quiet_modelopt
from twbert_export.precision import FP16_DATA_MAX, ActivationRanges, to_fp16, to_int8
from twbert_export.precision.int8 import _RowReader

from tinygraphs import Clips, matmul_graph


def scale_graph(path):
    """x -> scale (x 1e5) -> shrink (x 1e-5) -> relu -> y: only the middle tensor is large."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["scaled"], name="scale"),
             helper.make_node("Mul", ["scaled", "small"], ["shrunk"], name="shrink"),
             helper.make_node("Relu", ["shrunk"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("big", TensorProto.FLOAT, [], [1e5]),
         helper.make_tensor("small", TensorProto.FLOAT, [], [1e-5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_a_single_clip_beyond_the_range_flags_the_nodes_around_the_large_tensor(tmp_path):
    src = scale_graph(tmp_path / "m.onnx")
    quiet = np.full((3, 4), 1e-3, np.float32)
    with ActivationRanges(src, Clips(quiet)) as ranges:
        ranges.over(3)
        assert ranges.nodes_beyond(FP16_DATA_MAX) == []
    loud = quiet.copy()
    loud[2, 1] = 1.0  # 1e5 after `scale`, only in the last clip
    assert 1e5 > FP16_DATA_MAX
    with ActivationRanges(src, Clips(loud)) as ranges:
        absmax = ranges.over(3)
        assert ranges.nodes_beyond(FP16_DATA_MAX) == ["scale", "shrink"]
    assert absmax["scaled"] == np.float32(1e5) and absmax["x"] == 1.0


def test_fp16_keeps_the_out_of_range_nodes_in_fp32(tmp_path):
    src = scale_graph(tmp_path / "m.onnx")
    x = np.full((3, 4), 1e-3, np.float32)
    x[2, 1] = 1.0
    with ActivationRanges(src, Clips(x)) as ranges:
        report = to_fp16(src, tmp_path / "m.fp16.onnx", ranges)
    assert set(report.kept_fp32_range) >= {"scale", "shrink"}
    assert report.calibration["range_check_clips"] == 3


def test_a_large_model_is_checked_on_fewer_clips_and_extends_on_demand(tmp_path, monkeypatch):
    from twbert_export.precision import ranges as ranges_module

    src = scale_graph(tmp_path / "m.onnx")
    monkeypatch.setattr(ranges_module, "LARGE_MODEL_TENSOR_BYTES", 16)  # > one 4-float tensor
    monkeypatch.setattr(ranges_module, "LARGE_MODEL_RANGE_CLIPS", 2)
    x = np.full((3, 4), 1e-3, np.float32)
    x[2, 1] = 1.0  # only the third clip is loud: beyond the clips checked by default
    with ActivationRanges(src, Clips(x)) as ranges:
        assert ranges.is_large and ranges.default_rows() == 2
        ranges.over(ranges.default_rows())
        assert ranges.nodes_beyond(FP16_DATA_MAX) == []
        ranges.over(3)  # INT8 asks for every clip: only the third one is run now
        assert ranges.rows_done == 3
        assert ranges.nodes_beyond(FP16_DATA_MAX) == ["scale", "shrink"]


def activation_scales(path) -> dict[str, float]:
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    # after the FP16 step a quantized FP16 tensor reaches its Q node through a cast
    return {n.input[0].removesuffix("_cast_to_fp32"): float(numpy_helper.to_array(
            inits[n.input[1]]))
            for n in model.graph.node if n.op_type == "QuantizeLinear"
            and n.input[0] not in inits}


def test_int8_max_scales_equal_modelopts_own_calibration(tmp_path):
    """Our one-pass maxima, handed to ModelOpt as a calibration cache, give the scales that
    ModelOpt's own max calibration over every clip gives."""
    from modelopt.onnx.quantization import quantize

    src = matmul_graph(tmp_path / "m.onnx")
    smooth = np.cumsum(np.random.default_rng(1).standard_normal((20, 16, 64)), axis=-1)
    calib = Clips((smooth * np.linspace(0.5, 3, 20)[:, None, None]).astype(np.float32))
    report = to_int8(src, tmp_path / "ours.onnx", calib, "max", use_cache=False)
    assert report.calibration["scales_checked"] == 2
    with quiet_modelopt():
        quantize(str(src), quantize_mode="int8", calibration_method="max",
                 calibration_data_reader=_RowReader(calib, np.arange(len(calib))),
                 calibration_eps=["cpu"], op_types_to_quantize=["MatMul"],
                 high_precision_dtype="fp32", output_path=str(tmp_path / "theirs.onnx"),
                 log_level="ERROR")
    ours, theirs = activation_scales(tmp_path / "ours.onnx"), activation_scales(
        tmp_path / "theirs.onnx")
    assert set(ours) == set(theirs) == {"x", "r"}
    for name in ours:
        assert abs(ours[name] - theirs[name]) <= 1e-6 * theirs[name], name
    assert ours["x"] == np.float32(np.abs(calib.x).max() / 127)  # the last, loudest clip counts



def test_linear_dead_node_cleanup_removes_what_modelopts_removes():
    """Our linear-time dead-node pass against ModelOpt's own on the same graph: a node nothing
    reads goes, the node feeding it stays (one pass, as ModelOpt's), so do graph outputs and a
    node with one output read."""
    from types import SimpleNamespace

    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    from twbert_export.precision.modelopt_compat import linear_dead_node_cleanup

    nodes = [helper.make_node("Relu", ["x"], ["r1"], name="feeds_dead"),
             helper.make_node("Relu", ["r1"], ["r2"], name="dead"),
             helper.make_node("Cast", ["x"], ["c"], name="dead_cast", to=TensorProto.FLOAT16),
             helper.make_node("Split", ["x"], ["s1", "s2"], name="half_read", axis=1,
                              num_outputs=2),
             helper.make_node("Add", ["s1", "s1"], ["y"], name="output")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    theirs, ours = onnx.ModelProto(), onnx.ModelProto()
    theirs.CopyFrom(model)
    ours.CopyFrom(model)
    PrecisionConverter._cleanup_no_consumer_nodes(SimpleNamespace(model=theirs))
    with linear_dead_node_cleanup():
        PrecisionConverter._cleanup_no_consumer_nodes(SimpleNamespace(model=ours))
    assert [n.name for n in ours.graph.node] == ["feeds_dead", "half_read", "output"]
    assert ours.SerializeToString() == theirs.SerializeToString()


def test_linear_dead_node_cleanup_gives_autocasts_own_result(tmp_path):
    """AutoCast with our linear-time dead-node pass writes the same bytes as with ModelOpt's
    own, on a graph with a dead branch, a node kept FP32 (casts around it) and FP32 I/O."""
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    from twbert_export.precision.modelopt_compat import linear_dead_node_cleanup

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Softmax", ["h"], ["p"], name="keep_fp32", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="mm2"),
             helper.make_node("Relu", ["h"], ["unused"], name="dead")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), name)
         for name in ("w1", "w2")])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(src))

    def autocast() -> bytes:
        with quiet_modelopt():
            return convert_to_mixed_precision(
                str(src), low_precision_type="fp16", keep_io_types=True,
                nodes_to_exclude=["keep_fp32"], data_max=np.inf,
                providers=["cpu"]).SerializeToString()

    theirs = autocast()
    original = PrecisionConverter._cleanup_no_consumer_nodes
    with linear_dead_node_cleanup():
        assert PrecisionConverter._cleanup_no_consumer_nodes is not original
        ours = autocast()
    assert PrecisionConverter._cleanup_no_consumer_nodes is original
    assert ours == theirs
    model = onnx.load_from_string(ours)
    assert "dead" not in {n.name for n in model.graph.node}
    assert any(n.op_type == "Cast" for n in model.graph.node)


def test_on_an_untested_modelopt_its_own_path_writes_the_same_int8_graph(tmp_path, monkeypatch):
    """With the compat patches standing aside (an untested ModelOpt version), ModelOpt runs its
    own calibrator, GEMV check, shape inference and dead-node pass: the same bytes, and the
    report says which path ran."""
    from twbert_export.precision import modelopt_compat

    src = matmul_graph(tmp_path / "m.onnx")
    smooth = np.cumsum(np.random.default_rng(1).standard_normal((20, 16, 64)), axis=-1)
    calib = Clips(smooth.astype(np.float32))
    patched = to_int8(src, tmp_path / "patched.onnx", calib, "max", use_cache=False)
    monkeypatch.setattr(modelopt_compat, "modelopt_version", lambda: "0.99.0")
    own = to_int8(src, tmp_path / "own.onnx", calib, "max", use_cache=False)
    assert patched.note == "" and own.note == "ModelOpt 0.99.0 untested: its own path"
    assert (tmp_path / "own.onnx").read_bytes() == (tmp_path / "patched.onnx").read_bytes()
