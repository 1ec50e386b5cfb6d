"""Stage 4, TensorRT-compatibility lint: each rule on a tiny planted graph, then our real export."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from twbert_export.trt.lint import (  # noqa: E402
    OPERATORS, LintError, LintFinding, check_model, format_findings, lint_model)

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def make_model(nodes, inputs, outputs, initializers=(), domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 19)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def errors(model, **kw):
    return [f for f in lint_model(model, **kw) if f.severity == "error"]


def clean_model():
    """x @ w -> Softmax -> LayerNormalization: what our encoders are made of."""
    init = [numpy_helper.from_array(np.ones((8, 8), np.float32), "w"),
            numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
            numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Softmax", ["h"], ["p"], name="attn", axis=-1),
             helper.make_node("LayerNormalization", ["p", "gamma", "beta"], ["y"], name="norm",
                              axis=-1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 4, 8])],
                      [helper.make_tensor_value_info("y", F, ["batch", 4, 8])], init)


def topk_model(k=16, dtype=F, axis=-1, shape=("batch", 5000)):
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="select", axis=axis)]
    outputs = [helper.make_tensor_value_info("values", dtype, None),
               helper.make_tensor_value_info("indices", I64, None)]
    k_init = numpy_helper.from_array(np.array([k], np.int64), "k")
    return make_model(nodes, [helper.make_tensor_value_info("x", dtype, list(shape))], outputs,
                      [k_init])


def einsum_model(equation, n_inputs=2):
    names = [f"x{i}" for i in range(n_inputs)]
    node = helper.make_node("Einsum", names, ["y"], name="contract", equation=equation)
    inputs = [helper.make_tensor_value_info(n, F, [2, 3, 3]) for n in names]
    return make_model([node], inputs, [helper.make_tensor_value_info("y", F, None)])


def test_clean_graph_has_no_findings():
    assert lint_model(clean_model()) == []
    assert check_model(clean_model()) == []


def test_clean_graph_on_8x_only_warns_about_layernorm_and_opset():
    findings = {f.node: f for f in lint_model(clean_model(), trt_major=8)}
    assert {f.severity for f in findings.values()} == {"warning"}
    assert set(findings) == {"norm", "<graph>"}
    assert "8.6" in findings["norm"].reason and "opset 19" in findings["<graph>"].reason


def test_random_op_is_an_error_naming_the_node():
    model = clean_model()
    model.graph.node.insert(1, helper.make_node("RandomNormalLike", ["h"], ["noise"],
                                                name="dropout_noise"))
    found = errors(model)
    assert [(f.node, f.op_type) for f in found] == [("dropout_noise", "RandomNormalLike")]
    assert "random op in an inference graph" in found[0].reason


def test_topk_k_of_3840_or_more_is_an_error():
    assert errors(topk_model(k=16)) == []
    found = errors(topk_model(k=4000))
    assert [f.node for f in found] == ["select"] and "K=4000" in found[0].reason


def test_integer_topk_is_an_error_for_8x_only():
    model = topk_model(dtype=I64)
    found = errors(model, trt_major=8)
    assert [f.node for f in found] == ["select"] and "INT64" in found[0].reason
    assert errors(model, trt_major=10) == []


def test_topk_outside_the_last_four_axes_is_an_error():
    assert errors(topk_model(axis=-4, shape=(2, 2, 2, 2, 20))) == []
    found = errors(topk_model(axis=0, shape=(2, 2, 2, 2, 20)))
    assert [f.node for f in found] == ["select"] and "last 4 axes" in found[0].reason


def test_einsum_with_ellipsis_or_three_operands_is_an_error():
    assert errors(einsum_model("bij,bjk->bik")) == []
    found = errors(einsum_model("...ij,...jk->...ik"))
    assert [f.node for f in found] == ["contract"] and "ellipsis" in found[0].reason
    found = errors(einsum_model("bij,bjk,bkl->bil", n_inputs=3))
    assert [f.node for f in found] == ["contract"] and "3 operands" in found[0].reason


def test_double_initializer_is_an_error_naming_the_tensor():
    model = clean_model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.float64), "scale64"))
    model.graph.node.append(helper.make_node("Cast", ["scale64"], ["scale"], name="to_float",
                                             to=F))
    found = errors(model)
    assert len(found) == 1 and "'scale64'" in found[0].reason and "DOUBLE" in found[0].reason


def test_bf16_tensor_is_an_error_before_9():
    model = clean_model()
    model.graph.node.append(helper.make_node("Cast", ["y"], ["y16"], name="to_bf16",
                                             to=TensorProto.BFLOAT16))
    assert errors(model) == []
    assert [f.node for f in errors(model, trt_major=8)] == ["to_bf16"]


def test_unsupported_op_in_the_table_is_an_error():
    assert OPERATORS["Unique"].supported is False
    model = make_model([helper.make_node("Unique", ["x"], ["y"], name="dedupe")],
                       [helper.make_tensor_value_info("x", F, [6])],
                       [helper.make_tensor_value_info("y", F, None)])
    assert [(f.node, f.op_type) for f in errors(model)] == [("dedupe", "Unique")]


def test_custom_op_is_an_error_unless_listed_as_plugin():
    node = helper.make_node("FusedSelect", ["x"], ["y"], name="select_plugin",
                            domain="twbert.plugins")
    model = make_model([node], [helper.make_tensor_value_info("x", F, [2, 8])],
                       [helper.make_tensor_value_info("y", F, [2, 8])],
                       domains=["twbert.plugins"])
    found = errors(model)
    assert [f.node for f in found] == ["select_plugin"] and "plugin" in found[0].reason
    assert errors(model, plugins=["FusedSelect"]) == []


def test_data_dependent_op_only_warns():
    model = make_model([helper.make_node("NonZero", ["x"], ["idx"], name="keep")],
                       [helper.make_tensor_value_info("x", F, [6])],
                       [helper.make_tensor_value_info("idx", I64, None)])
    assert [(f.node, f.severity) for f in lint_model(model)] == [("keep", "warning")]


def test_lint_error_lists_every_bad_node():
    model = clean_model()
    model.graph.node.insert(1, helper.make_node("RandomUniformLike", ["h"], ["noise"],
                                                name="noise_a"))
    model.graph.node.insert(2, helper.make_node("Unique", ["noise"], ["u"], name="dedupe_b"))
    with pytest.raises(LintError) as info:
        check_model(model)
    message = str(info.value)
    assert "node noise_a (RandomUniformLike): random op" in message
    assert "node dedupe_b (Unique)" in message
    assert isinstance(info.value, ValueError)
    assert {f.node for f in info.value.findings} == {"noise_a", "dedupe_b"}


def test_format_findings_puts_errors_first():
    text = format_findings([LintFinding("a", "If", "control flow", "warning"),
                            LintFinding("b", "Unique", "not supported")])
    assert text.splitlines() == ["error: node b (Unique): not supported",
                                 "warning: node a (If): control flow"]


def test_model_path_is_accepted(tmp_path):
    onnx.save(topk_model(k=4000), str(tmp_path / "m.onnx"))
    assert [f.node for f in errors(tmp_path / "m.onnx")] == ["select"]
    assert [f.node for f in errors(str(tmp_path / "m.onnx"))] == ["select"]


# -- our exported tiny model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from model import TWBert, TWBertConfig
    from twbert_export.artifact.contract import IOContract
    from twbert_export.export.onnx_export import export_onnx

    cfg = TWBertConfig.tiny(num_answers=7)
    torch.manual_seed(0)
    model = TWBert(cfg).eval()
    return export_onnx(model, IOContract.for_model(cfg, "qa"), tmp_path_factory.mktemp("lint") /
                       "m.onnx")


def test_exported_model_is_clean_for_trt10(exported):
    assert lint_model(exported, trt_major=10) == []
    assert check_model(exported, trt_major=10) == []


def test_exported_model_is_refused_for_trt8_and_its_legacy_graph_is_not(exported, tmp_path):
    """The opset-19 graph: 8.x parsers would reduce over every axis (ReduceL2/ReduceMean with
    axes as an input: onnx-tensorrt 8.5-GA / 8.6-GA), and 8.5 has no LayerNormalization. The
    graph twbert_export.export.legacy writes for them has neither problem: only the INT64 note."""
    from twbert_export.export.legacy import to_trt8_graph

    findings = lint_model(exported, trt_major=8)
    errors_8 = {f.op_type for f in findings if f.severity == "error"}
    assert errors_8 == {"ReduceL2", "ReduceMean"}
    assert all("reduces over every axis" in f.reason for f in findings if f.severity == "error")
    errors_85 = {f.op_type for f in lint_model(exported, parser="8.5") if f.severity == "error"}
    assert errors_85 == {"ReduceL2", "ReduceMean", "LayerNormalization"}
    with pytest.raises(LintError):
        check_model(exported, parser="8.6")
    legacy = tmp_path / "m.trt8.onnx"
    to_trt8_graph(exported, legacy, "8.5")
    for parser in ("8.5", "8.6"):
        warnings = check_model(legacy, parser=parser)  # does not raise
        assert [f.op_type for f in warnings] == ["Model"]
        assert "INT64" in warnings[0].reason and "'input_ids'" in warnings[0].reason