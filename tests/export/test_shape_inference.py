"""Shape inference without the weights' data (`util.infer_shapes`, `util.infer_shapes_in_file`)
against ONNX's own."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from twbert_export.util import LIGHT_TENSOR_ELEMENTS, infer_shapes, infer_shapes_in_file

OPTIONS = [{}, {"strict_mode": True}, {"strict_mode": False, "data_prop": True}]


def weights_and_shapes_graph() -> onnx.ModelProto:
    """A MatMul on a large weight, a large weight also declared as a graph input (old IR
    style), a Reshape whose target is a small constant, and one computed from Shape/Gather/
    Concat (read through data propagation)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w2")
    target = numpy_helper.from_array(np.array([0, 4, 8], np.int64), "target")
    last = numpy_helper.from_array(np.array([-1], np.int64), "last")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Reshape", ["h", "target"], ["r"], name="fixed_reshape"),
             helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
             helper.make_node("Gather", ["x_shape", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Concat", ["n", "last"], ["flat"], name="concat", axis=0),
             helper.make_node("Reshape", ["r", "flat"], ["back"], name="computed_reshape"),
             helper.make_node("MatMul", ["back", "w2"], ["y"], name="mm2")]
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
                     helper.make_tensor_value_info("w2", TensorProto.FLOAT, [32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w1, w2, target, last, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert w1.dims[0] * w1.dims[1] > LIGHT_TENSOR_ELEMENTS >= target.dims[0]
    return model


@pytest.mark.parametrize("options", OPTIONS)
def test_equals_onnx_shape_inference_on_a_hand_made_graph(options):
    model = weights_and_shapes_graph()
    ours = infer_shapes(model, **options)
    assert ours.SerializeToString() == onnx.shape_inference.infer_shapes(
        model, **options).SerializeToString()
    assert {vi.name for vi in ours.graph.value_info} >= {"h", "r", "back"}
    assert [d.dim_value for d in ours.graph.output[0].type.tensor_type.shape.dim][1:] == [32]
    assert model.graph.value_info == []  # the model given is left as it was
    types_only = infer_shapes(model, weights=False, **options)
    assert types_only.graph.value_info == ours.graph.value_info
    assert {t.name for t in types_only.graph.initializer} == {"target", "last", "zero"}


@pytest.mark.parametrize("options", OPTIONS)
def test_in_place_gives_the_same_model_without_a_copy(options):
    model = weights_and_shapes_graph()
    theirs = onnx.shape_inference.infer_shapes(model, **options).SerializeToString()
    ours = infer_shapes(model, in_place=True, **options)
    assert ours is model  # no copy of the weights: the caller replaces its model by this one
    assert ours.SerializeToString() == theirs


@pytest.mark.slow  # an ONNX export of its own and ONNX's full inference: about 25 s
def test_equals_onnx_shape_inference_on_the_exported_tiny_model(tmp_path, tiny_cfg, tiny_model):
    from twbert_export.artifact.contract import IOContract
    from twbert_export.export.onnx_export import export_onnx

    path = export_onnx(tiny_model, IOContract.for_model(tiny_cfg, "retrieval"),
                       tmp_path / "m.onnx")
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    assert sum(math.prod(t.dims) > LIGHT_TENSOR_ELEMENTS
               for t in model.graph.initializer) > 10
    for options in OPTIONS:
        assert infer_shapes(model, **options).SerializeToString() == \
            onnx.shape_inference.infer_shapes(model, **options).SerializeToString(), options


def test_in_file_equals_onnx_infer_shapes_path_and_leaves_external_weights_alone(tmp_path):
    model = weights_and_shapes_graph()
    onnx.save(model, str(tmp_path / "m.onnx"))
    onnx.shape_inference.infer_shapes_path(str(tmp_path / "m.onnx"), str(tmp_path / "theirs.onnx"),
                                           strict_mode=True, data_prop=True)
    assert infer_shapes_in_file(tmp_path / "m.onnx", tmp_path / "ours.onnx", strict_mode=True,
                                data_prop=True)
    assert (tmp_path / "ours.onnx").read_bytes() == (tmp_path / "theirs.onnx").read_bytes()
    assert infer_shapes_in_file(tmp_path / "ours.onnx")  # in place
    assert (tmp_path / "ours.onnx").read_bytes() == (tmp_path / "theirs.onnx").read_bytes()

    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    before = (tmp_path / "ext.onnx").read_bytes()
    assert not infer_shapes_in_file(tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx").read_bytes() == before
