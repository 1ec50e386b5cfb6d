"""The lint (twbert_export/trt/lint.py, TensorRT 10/11 rules) against NVIDIA's real parser: for
each rule, a minimal graph that breaks it, linted for TensorRT 10 and parsed and built by
TensorRT-RTX on the CPU. Each case records what the lint says and what TensorRT-RTX did; the test holds both
to the record, so a parser release that changes its mind fails here, and docs/rtx.md's table
is this file's output:

    PYTHONPATH=.:tests python tests/trt/test_rtx_lint.py   # the table (needs the RTX wheels)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from twbert_export.trt import lint
from twbert_export.trt import rtx

RTX, WHY = rtx.load_rtx()
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def model(nodes, inputs, outputs, inits=(), opset=19, domains=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def node(op, ins, outs, name=None, domain="", **attrs):
    return helper.make_node(op, ins, outs, name=name or f"/planted/{op}", domain=domain, **attrs)


X = ("x", F, [2, 4])
Y = ("y", F, None)


@dataclass(frozen=True)
class Case:
    rule: str  # the lint rule (lint.py check) the graph breaks
    graph: str  # what the minimal graph is, in words
    make: Callable[[], onnx.ModelProto]
    lint: str  # "error" / "warning": the lint's verdict for TensorRT 10
    rtx: str  # "refused at parse" / "refused at build" / "built" / "built, I/O retyped"
    conclusion: str
    shape_values: dict | None = None  # values of inputs TensorRT takes as shape tensors


CASES = [
    Case("check_operators: op not in the table", "Swish (opset 24) on x",
         lambda: model([node("Swish", ["x"], ["y"])], [X], [Y], opset=24),
         "error", "built",
         "parser newer than our table (transcribed from TensorRT 10.15's operators.md, which "
         "has no Swish): kept an error, the table is what the device parsers follow"),
    Case("check_operators: op the table marks unsupported", "Det of a 3x3 matrix",
         lambda: model([node("Det", ["x"], ["y"])], [("x", F, [3, 3])], [Y]),
         "error", "refused at parse", "agree"),
    Case("check_operators: custom domain without a plugin", "com.example.Frobnicate",
         lambda: model([node("Frobnicate", ["x"], ["y"], domain="com.example")], [X], [Y],
                       domains=("com.example",)),
         "error", "refused at parse", "agree"),
    Case("check_random_ops", "RandomNormalLike(x)",
         lambda: model([node("RandomNormalLike", ["x"], ["y"])], [X], [Y]),
         "error", "built",
         "lint stricter on purpose: the parser takes it, but an inference graph with a random "
         "op gives other numbers on every run"),
    Case("check_topk: sorted=0 (now a warning)", "TopK(x, K=2, sorted=0)",
         lambda: model([node("TopK", ["x", "k"], ["y", "i"], sorted=0)], [X],
                       [Y, ("i", I64, None)], [("k", np.array([2], np.int64))]),
         "warning", "built",
         "lint was wrong, fixed: the parser takes it and returns sorted results, an order "
         "sorted=0 allows (older onnx-tensorrt importers ignore the attribute too)"),
    Case("check_topk: K >= 3840", "TopK(x[1, 5000], K=4000)",
         lambda: model([node("TopK", ["x", "k"], ["y", "i"])], [("x", F, [1, 5000])],
                       [Y, ("i", I64, None)], [("k", np.array([4000], np.int64))]),
         "error", "refused at build", "agree (the builder, not the parser, refuses it)"),
    Case("check_topk: axis outside the last four", "TopK over axis 0 of a rank-5 input",
         lambda: model([node("TopK", ["x", "k"], ["y", "i"], axis=0)], [("x", F, [3, 1, 1, 1, 2])],
                       [Y, ("i", I64, None)], [("k", np.array([2], np.int64))]),
         "error", "built",
         "parser newer than the table: TensorRT-RTX takes it; the rule stays for the 10.x "
         "parsers of JetPack 6 (operators.md: last four axes)"),
    Case("check_einsum: ellipsis", "Einsum '...ij,...jk->...ik'",
         lambda: model([node("Einsum", ["x", "x2"], ["y"], equation="...ij,...jk->...ik")],
                       [("x", F, [2, 3, 4]), ("x2", F, [2, 4, 5])], [Y]),
         "error", "built",
         "parser newer than the rule: TensorRT >= 10.12 takes ellipsis; the rule stays for "
         "TensorRT 10.3 (JetPack 6.x)"),
    Case("check_einsum: more than two operands", "Einsum 'ij,jk,kl->il'",
         lambda: model([node("Einsum", ["x", "x2", "x3"], ["y"], equation="ij,jk,kl->il")],
                       [("x", F, [2, 3]), ("x2", F, [3, 4]), ("x3", F, [4, 5])], [Y]),
         "error", "built",
         "project rule, not a parser limit: TensorRT-RTX takes it; we keep einsums to two "
         "operands for the older parsers"),
    Case("check_einsum: diagonal", "Einsum 'ii->i'",
         lambda: model([node("Einsum", ["x"], ["y"], equation="ii->i")], [("x", F, [3, 3])], [Y]),
         "error", "built",
         "parser newer than the rule: TensorRT >= 10.12 takes diagonals; the rule stays for "
         "TensorRT 10.3 (JetPack 6.x)"),
    Case("check_op_restrictions: reduce axes computed at run time",
         "ReduceMean(x, axes) with axes a graph input",
         lambda: model([node("ReduceMean", ["x", "axes"], ["y"])], [X, ("axes", I64, [1])], [Y]),
         "error", "refused at parse", "agree"),
    Case("check_op_restrictions: LayerNormalization Mean/InvStdDev outputs",
         "LayerNormalization with three outputs",
         lambda: model([node("LayerNormalization", ["x", "g"], ["y", "m", "r"])], [X],
                       [Y, ("m", F, None), ("r", F, None)], [("g", np.ones(4, np.float32))]),
         "error", "refused at parse", "agree"),
    Case("check_op_restrictions: MaxPool Indices output", "MaxPool 2x2 with Indices",
         lambda: model([node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])],
                       [("x", F, [1, 1, 4, 4])], [Y, ("i", I64, None)]),
         "error", "refused at parse", "agree"),
    Case("check_dtypes: a type TensorRT lacks", "Add of two DOUBLE tensors",
         lambda: model([node("Add", ["x", "x"], ["y"])], [("x", TensorProto.DOUBLE, [2, 4])],
                       [("y", TensorProto.DOUBLE, None)]),
         "error", "built, I/O retyped",
         "agree: the parser does not refuse it, it mis-imports it (DOUBLE I/O becomes FLOAT)"),
    Case("check_dtypes: UINT8 inside the graph", "Cast x -> UINT8 -> FLOAT",
         lambda: model([node("Cast", ["x"], ["u"], name="/planted/to_u8", to=TensorProto.UINT8),
                        node("Cast", ["u"], ["y"], name="/planted/to_f", to=F)], [X], [Y]),
         "error", "refused at parse", "agree"),
    Case("check_dtypes: INT16", "Cast x -> INT16 -> FLOAT",
         lambda: model([node("Cast", ["x"], ["s"], name="/planted/to_i16", to=TensorProto.INT16),
                        node("Cast", ["s"], ["y"], name="/planted/to_f", to=F)], [X], [Y]),
         "error", "refused at parse", "agree"),
    # Warnings: the lint lets them through; does the parser?
    Case("check_topk: K computed at run time (warning)", "TopK(x, K) with K a graph input",
         lambda: model([node("TopK", ["x", "k"], ["y", "i"])], [X, ("k", I64, [1])],
                       [Y, ("i", I64, None)]),
         "warning", "built", "agree: dynamic K parses (TensorRT >= 8.6)", {"k": [2]}),
    Case("check_control_flow (warning)", "If on a graph input, two Identity branches",
         lambda: model([node("If", ["c"], ["y"], then_branch=helper.make_graph(
             [node("Identity", ["x"], ["t"], name="/then")], "then", [],
             [helper.make_tensor_value_info("t", F, [2, 4])]), else_branch=helper.make_graph(
             [node("Neg", ["x"], ["e"], name="/else")], "else", [],
             [helper.make_tensor_value_info("e", F, [2, 4])]))],
             [X, ("c", TensorProto.BOOL, [])], [Y]),
         "warning", "built", "agree: supported, with the limits the warning names"),
    Case("check_opset: above what 10.0 documents (warning)", "Add at opset 21",
         lambda: model([node("Add", ["x", "x"], ["y"])], [X], [Y], opset=21),
         "warning", "built", "agree: newer parsers take it"),
    Case("check_op_restrictions: INT32 / BOOL the table does not list (now an error)",
         "Sqrt of INT32",
         lambda: model([node("Sqrt", ["x"], ["y"])], [("x", TensorProto.INT32, [2, 4])],
                       [("y", TensorProto.INT32, None)]),
         "error", "refused at parse",
         "lint was too lenient (a warning), fixed: the parser refused all 25 unary ops tried "
         "on INT32 and on BOOL"),
    Case("check_op_restrictions: another type the table does not list (warning)",
         "Exp of INT8",
         lambda: model([node("Exp", ["x"], ["y"])], [("x", TensorProto.INT8, [2, 4])],
                       [("y", TensorProto.INT8, None)]),
         "warning", "refused at build",
         "kept a warning: on INT8 the builder took 9 of 25 unary ops the table does not list it "
         "for (Abs, Neg, Relu, ...) and refused the others"),
    # The lint passes these; the parser does not.
    Case("(none) Relu of INT32: the table lists INT32", "Relu of INT32",
         lambda: model([node("Relu", ["x"], ["y"])], [("x", TensorProto.INT32, [2, 4])],
                       [("y", TensorProto.INT32, None)]),
         "clean", "refused at parse",
         "lint more lenient than this parser: TensorRT 10.15's operators.md lists INT32 for "
         "Relu; TensorRT-RTX refuses it. Not changed (the table is the device parsers'); our "
         "graphs have no integer Relu, and the rtx stage would refuse one"),
]


def lint_verdict(proto: onnx.ModelProto) -> tuple[str, str]:
    """(worst severity, first finding) for TensorRT 10."""
    findings = lint.lint_model(proto, trt_major=10)
    if not findings:
        return "clean", ""
    return findings[0].severity, str(findings[0])


TRT_TO_ONNX = {"FLOAT": "FLOAT", "HALF": "FLOAT16", "BF16": "BFLOAT16", "INT8": "INT8",
               "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL", "UINT8": "UINT8"}


def rtx_verdict(proto: onnx.ModelProto, tmp: Path, shape_values: dict | None = None
                ) -> tuple[str, str]:
    """(verdict, message) of TensorRT-RTX's parser and builder on the graph (static shapes;
    `shape_values` for inputs TensorRT takes as shape tensors). 'built, I/O retyped' when the
    network's inputs or outputs have other types than the ONNX graph declares: a mis-import."""
    path = tmp / "case.onnx"
    onnx.save(proto, str(path))
    try:
        builder, network, _, _ = rtx.parse(RTX, path)
    except rtx.RtxGraphError as e:
        return "refused at parse", e.message
    declared = {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type)
                for v in (*proto.graph.input, *proto.graph.output)}
    tensors = ([network.get_input(i) for i in range(network.num_inputs)]
               + [network.get_output(i) for i in range(network.num_outputs)])
    retyped = [f"{t.name} {declared[t.name]} -> {TRT_TO_ONNX.get(rtx._dtype(t.dtype))}"
               for t in tensors if t.name in declared
               and TRT_TO_ONNX.get(rtx._dtype(t.dtype)) != declared[t.name]]
    config = builder.create_builder_config()
    if shape_values:
        profile = builder.create_optimization_profile()
        for name, values in shape_values.items():
            profile.set_shape_input(name, values, values, values)
        config.add_optimization_profile(profile)
    log = rtx._logger(RTX)
    log.messages = []
    with rtx._native_output([]):  # e.g. Myelin's "precision-lose casting" lines
        engine = builder.build_serialized_network(network, config)
    if engine is None:
        errors = [" ".join(m.split()) for level, m in log.messages if level != "WARNING"]
        return "refused at build", errors[0] if errors else "no engine"
    if retyped:
        return "built, I/O retyped", "; ".join(retyped)
    return "built", f"{engine.nbytes} bytes"


@pytest.mark.skipif(RTX is None, reason=WHY)
@pytest.mark.parametrize("case", CASES, ids=[c.rule for c in CASES])
def test_lint_rule_against_tensorrt_rtx(case: Case, tmp_path):
    proto = case.make()
    severity, finding = lint_verdict(proto)
    assert severity == case.lint, finding
    verdict, message = rtx_verdict(proto, tmp_path, case.shape_values)
    assert verdict == case.rtx, message


# Unary ops the dtype sweep tries (lint.STRICT_OP_DTYPES rests on it).
UNARY = ("Abs", "Acos", "Ceil", "Cos", "Erf", "Exp", "Floor", "Log", "Neg", "Reciprocal", "Relu",
         "Round", "Sigmoid", "Sign", "Sin", "Sqrt", "Tanh", "Softmax", "Elu", "LeakyRelu",
         "HardSigmoid", "Softplus", "IsNaN", "Not", "Identity")
SWEEP = [(op, dtype) for dtype in ("INT32", "BOOL") for op in UNARY
         if dtype not in lint.OPERATORS[op].types]


def unary(op: str, dtype: str) -> onnx.ModelProto:
    elem = getattr(TensorProto, dtype)
    out = TensorProto.BOOL if op == "IsNaN" else elem
    return model([node(op, ["x"], ["y"])], [("x", elem, [2, 4])], [("y", out, None)])


@pytest.mark.skipif(RTX is None, reason=WHY)
def test_int32_and_bool_where_the_table_does_not_list_them_are_lint_errors_and_refused(tmp_path):
    """Every unary op of UNARY on INT32 / BOOL that the operator table does not list the type
    for: a lint error (STRICT_OP_DTYPES), and TensorRT-RTX's parser refuses it."""
    assert len(SWEEP) == 42
    for op, dtype in SWEEP:
        proto = unary(op, dtype)
        assert lint_verdict(proto)[0] == "error", (op, dtype)
        assert rtx_verdict(proto, tmp_path)[0] == "refused at parse", (op, dtype)


@pytest.mark.skipif(RTX is None, reason=WHY)
def test_int8_where_the_table_does_not_list_it_stays_a_warning(tmp_path):
    """On INT8 the same ops split: TensorRT-RTX builds some and refuses the rest, so the lint
    keeps a warning there."""
    built = set()
    for op in UNARY:
        proto = unary(op, "INT8")
        assert lint_verdict(proto)[0] == "warning", op
        if rtx_verdict(proto, tmp_path)[0] == "built":
            built.add(op)
    assert built == {"Abs", "Erf", "Neg", "Reciprocal", "Relu", "Sign", "LeakyRelu",
                     "HardSigmoid", "Identity"}


def table(tmp: Path) -> str:
    rows = ["| rule (lint.py) | minimal graph | lint, TensorRT 10 | TensorRT-RTX "
            f"{RTX.__version__} | conclusion |", "| --- | --- | --- | --- | --- |"]
    for case in CASES:
        proto = case.make()
        severity, finding = lint_verdict(proto)
        verdict, message = rtx_verdict(proto, tmp, case.shape_values)
        short = message if len(message) < 110 else message[:107] + "..."
        rows.append(f"| {case.rule} | {case.graph} | {severity} | {verdict}"
                    f"{': ' + short if verdict != 'built' else ''} | {case.conclusion} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    if RTX is None:
        sys.exit(WHY)
    with tempfile.TemporaryDirectory() as d:
        print(table(Path(d)))
