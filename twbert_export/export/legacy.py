"""The graph for TensorRT 8.5 / 8.6 (JetPack 5.1.x / 6.0): an ONNX -> ONNX conversion of a
shipped graph into the form those parsers import correctly.

Why (read in github.com/onnx/onnx-tensorrt, branches 8.5-GA and 8.6-GA):

- `reduceTensor` (onnx2trt_utils.cpp) reads `axes` from the ATTRIBUTE only; the ReduceMean,
  ReduceMax, ReduceL2, ReduceSumSquare ... importers never pass the opset-18 `axes` INPUT to it
  (only ReduceSum does), so an opset-18+ reduce silently reduces over every axis: a
  ReduceL2(keepdims=1) then divides each row by one global norm. 9.x behaves the same; 10.0-GA
  passes the input. -> opset 17, axes as attributes (`reduce_axes_to_attributes`).
- 8.5-GA has no LayerNormalization importer (8.6-GA maps it to INormalizationLayer with the
  `stash_type` compute precision). -> for 8.5, decomposed with the mean and variance computed in
  FP32 whatever the tensor type (`decompose_layer_norm`), as the ONNX function of
  LayerNormalization does with stash_type=1.
- Both parsers document opsets up to 17; ops whose opset-18/19 form differs from the opset-17
  one are converted where the meaning is the same (Pad without `axes` or `wrap`, `saturate` at
  its default) and refused otherwise. The result is checked against the opset-17 schemas
  (`onnx.checker`, full check), so anything this module does not convert fails here, on the
  host, not in the device's parser.
- Q/DQ (INT8 file): the 8.5-GA importer requires three inputs (an explicit zero point), FP32
  positive scales and all-zero zero points (`QuantDequantLinearHelper`); anything else is
  refused (a missing zero point means UINT8 in ONNX, which TensorRT would read as INT8). 8.x
  builds a Q/DQ network with the INT8 builder flag.
- INT8 weights (the int8 file stores its quantized weights as INT8 initializers feeding
  DequantizeLinear): the 8.5-GA / 8.6-GA importers turn such an initializer into an INT8
  IConstantLayer, which TensorRT 8.x documents nowhere (its explicit-quantization section has
  FP32 weights quantized by the builder; 8.0 / 8.2 refuse "invalid weights type of Int8").
  -> the twin gets the FP32-weight form back (`requantize_int8_weights`: w = q * scale, then
  QuantizeLinear / DequantizeLinear with the same scale, which gives q again: same numerics).
  Weight-only INT8 (int8w: DequantizeLinear on weights only, FP16 scales) has no 8.x form: 8.x
  builds Q/DQ networks with INT8 kernels only where the activation is quantized too, and its
  DequantizeLinear takes FP32 scales only. -> no twin (`NO_TWIN`); `to_trt8_graph` refuses it.
- INT64: 8.x parsers narrow INT64 tensors to INT32 themselves (INT64 is native from 9.0), so
  the graph keeps the contract's INT64 I/O; the engine binds it as INT32 and the runner casts.

Every (graph, precision) file of the default flavour gets a twin of flavour `trt8`
(`model.fp16.onnx` -> `model.fp16.trt8.onnx`, a FileEntry of its own in the manifest), written for
the 8.5 rules so that it also serves 8.6. The whole-model twins are validated on ONNX Runtime
with their precision's gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact.manifest import TRT8_FLAVOUR
from ..trt.version import WEIGHT_ONLY_REFUSAL
from ..util import atomic_path, infer_shapes, require

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

LEGACY_OPSET = 17  # the highest opset the 8.5 / 8.6 parsers document
PARSERS = ("8.5", "8.6")
# Precisions TensorRT 8.5 / 8.6 cannot build: their files get no twin (see above).
NO_TWIN = ("int8w",)
# Reduce ops whose axes moved from attribute to input in opset 18 (ReduceSum moved in 13 and
# its 8.x importer reads the input).
AXES_INPUT_SINCE_18 = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})


class LegacyGraphError(ValueError):
    """The graph has something the 8.x parsers cannot import correctly and we cannot convert."""


def twin_name(onnx_name: str) -> str:
    """'model.fp16.onnx' -> 'model.fp16.trt8.onnx': the name the export gives a twin (readers
    find it through the manifest's entry, flavour trt8)."""
    stem = onnx_name[:-len(".onnx")] if onnx_name.endswith(".onnx") else onnx_name
    return f"{stem}.{TRT8_FLAVOUR}.onnx"


# -- the rewrites (each a small function on a gs.Graph ending in cleanup().toposort()) ---------
def requantize_int8_weights(graph: "gs.Graph") -> "gs.Graph":
    """INT8 weight -> DequantizeLinear (the int8 file's stored form) back to FP32 weight ->
    QuantizeLinear -> DequantizeLinear with the same scale and zero point. The FP32 weight is
    q * scale, which QuantizeLinear rounds back to q (|q| <= 127: the float error is far below
    half a step), so the network computes what the int8 file computes. Refuses weight-only
    INT8 (a DequantizeLinear on a weight whose scale is not FP32: `WEIGHT_ONLY_REFUSAL`)."""
    import numpy as np

    gs = require("onnx_graphsurgeon", "to convert graphs for TensorRT 8.x")
    for node in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
        weight, scale = node.inputs[0], node.inputs[1]
        if not isinstance(weight, gs.Constant):
            continue
        if not isinstance(scale, gs.Constant) or scale.values.dtype != np.float32:
            raise LegacyGraphError(f"node {node.name}: {WEIGHT_ONLY_REFUSAL}")
        axis = node.attrs.get("axis", 1)
        shape = [1] * weight.values.ndim
        if scale.values.size > 1:
            shape[axis] = -1
        fp32 = weight.values.astype(np.float32) * scale.values.reshape(shape)
        quantized = gs.Variable(f"{weight.name}/trt8_quantized", dtype=weight.values.dtype,
                                shape=list(weight.values.shape))
        graph.layer(op="QuantizeLinear", name=f"{node.name}/trt8_quantize",
                    inputs=[gs.Constant(f"{weight.name}/trt8_fp32", fp32), *node.inputs[1:]],
                    outputs=[quantized], attrs={"axis": axis} if scale.values.size > 1 else {})
        node.inputs[0] = quantized
    return graph.cleanup().toposort()


def reduce_axes_to_attributes(graph: "gs.Graph") -> "gs.Graph":
    """Opset-18 reduce (axes input) -> opset-13 reduce (axes attribute), same meaning."""
    gs = require("onnx_graphsurgeon", "to convert graphs for TensorRT 8.x")
    for node in graph.nodes:
        if node.op not in AXES_INPUT_SINCE_18:
            continue
        noop = node.attrs.pop("noop_with_empty_axes", 0)
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        if axes is not None and not (isinstance(axes, gs.Variable) and axes.name == ""):
            if not isinstance(axes, gs.Constant):
                raise LegacyGraphError(f"node {node.name} ({node.op}): axes {axes.name!r} are "
                                       "computed at run time; TensorRT 8.x needs constant axes")
            node.attrs["axes"] = [int(a) for a in axes.values.reshape(-1)]
            node.inputs = node.inputs[:1]
        elif noop:
            raise LegacyGraphError(f"node {node.name} ({node.op}): noop_with_empty_axes=1 has "
                                   "no opset-17 form")
    return graph.cleanup().toposort()


def downgrade_changed_ops(graph: "gs.Graph") -> "gs.Graph":
    """Ops whose opset-18/19 schema differs from opset 17 in ways this graph can use: kept
    when the meaning is the opset-17 one, refused otherwise."""
    import numpy as np

    gs = require("onnx_graphsurgeon", "to convert graphs for TensorRT 8.x")
    for node in graph.nodes:
        if node.op == "Pad":
            if node.attrs.get("mode", "constant") == "wrap" or len(node.inputs) > 3:
                raise LegacyGraphError(f"node {node.name} (Pad): wrap mode / axes input are "
                                       "opset 18+ only")
        elif node.op in ("Cast", "QuantizeLinear"):
            if node.attrs.pop("saturate", 1) != 1:
                raise LegacyGraphError(f"node {node.name} ({node.op}): saturate=0 is opset 19+")
        elif node.op == "Split" and "num_outputs" in node.attrs:
            raise LegacyGraphError(f"node {node.name} (Split): num_outputs is opset 18+")
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            scale = node.inputs[1]
            if not isinstance(scale, gs.Constant) or scale.values.dtype != np.float32 \
                    or not (scale.values > 0).all():
                raise LegacyGraphError(f"node {node.name} ({node.op}): TensorRT 8.x needs "
                                       "constant, positive FP32 scales")
            if len(node.inputs) < 3:  # 8.5-GA: "requires 3 inputs"
                raise LegacyGraphError(f"node {node.name} ({node.op}): no zero point, so ONNX "
                                       "quantizes to UINT8 where TensorRT uses INT8; TensorRT 8.x "
                                       "needs an explicit INT8 zero point")
            if isinstance(node.inputs[2], gs.Constant) and node.inputs[2].values.any():
                raise LegacyGraphError(f"node {node.name} ({node.op}): TensorRT supports "
                                       "symmetric quantization only (zero points must be 0)")
    return graph.cleanup().toposort()


def decompose_layer_norm(graph: "gs.Graph") -> "gs.Graph":
    """LayerNormalization(axis=-1, stash_type=1) -> ReduceMean / Sub / Mul / ReduceMean / Add /
    Sqrt / Div computed in FP32 (Casts around it when the input is FP16), then the scale and
    bias in the input's type: the ONNX function body of LayerNormalization."""
    import numpy as np

    gs = require("onnx_graphsurgeon", "to convert graphs for TensorRT 8.x")
    onnx = require("onnx", "to convert graphs for TensorRT 8.x")
    float_type = onnx.TensorProto.FLOAT
    for node in [n for n in graph.nodes if n.op == "LayerNormalization"]:
        if node.attrs.get("axis", -1) != -1 or node.attrs.get("stash_type", 1) != 1:
            raise LegacyGraphError(f"node {node.name} (LayerNormalization): only axis=-1 with "
                                   "FP32 statistics (stash_type=1) is converted")
        if any(out.outputs for out in node.outputs[1:]):
            raise LegacyGraphError(f"node {node.name} (LayerNormalization): Mean / InvStdDev "
                                   "outputs are used")
        x, scale = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        y = node.outputs[0]
        low = np.dtype(scale.dtype) != np.float32  # the graph's type T (scale has type T)
        name = node.name or y.name
        step = lambda op, inputs, attrs=None, dtype=np.float32: graph.layer(  # noqa: E731
            op=op, name=f"{name}/trt8_{op.lower()}_{len(graph.nodes)}", inputs=inputs,
            outputs=[gs.Variable(f"{name}/trt8_{op.lower()}_{len(graph.nodes)}_out",
                                 dtype=dtype)], attrs=attrs or {})[0]
        node.outputs = []
        xf = step("Cast", [x], {"to": float_type}) if low else x
        mean = step("ReduceMean", [xf], {"axes": [-1], "keepdims": 1})
        centred = step("Sub", [xf, mean])
        variance = step("ReduceMean", [step("Mul", [centred, centred])],
                        {"axes": [-1], "keepdims": 1})
        eps = gs.Constant(f"{name}/trt8_epsilon",
                          np.array(node.attrs.get("epsilon", 1e-5), np.float32))
        normalized = step("Div", [centred, step("Sqrt", [step("Add", [variance, eps])])])
        t_type = np.dtype(scale.dtype)
        if low:
            normalized = step("Cast", [normalized],
                              {"to": onnx.helper.np_dtype_to_tensor_dtype(t_type)}, t_type)
        scaled = step("Mul", [normalized, scale], dtype=t_type)
        if bias is None:
            graph.layer(op="Identity", name=f"{name}/trt8_out", inputs=[scaled], outputs=[y])
        else:
            graph.layer(op="Add", name=f"{name}/trt8_bias", inputs=[scaled, bias], outputs=[y])
    return graph.cleanup().toposort()


def to_trt8_graph(src: str | Path, dst: str | Path, parser_version: str = "8.5"
                  ) -> dict[str, Any]:
    """Write the graph TensorRT `parser_version` (8.5 or 8.6) imports correctly. Returns what
    was changed (counts), for the manifest. Raises LegacyGraphError when that is impossible."""
    from ..trt.version import parse_version

    onnx = require("onnx", "to convert graphs for TensorRT 8.x")
    gs = require("onnx_graphsurgeon", "to convert graphs for TensorRT 8.x")
    major, minor, _ = parse_version(parser_version)
    if (major, minor) not in ((8, 5), (8, 6)):
        raise ValueError(f"parser_version must be one of {PARSERS}, got {parser_version!r}")
    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < LEGACY_OPSET:
        raise LegacyGraphError(f"{Path(src).name} is opset {opset}; expected >= {LEGACY_OPSET}")
    graph = gs.import_onnx(model)
    layer_norms = sum(n.op == "LayerNormalization" for n in graph.nodes)
    reduces = sum(n.op in AXES_INPUT_SINCE_18 and len(n.inputs) > 1 for n in graph.nodes)
    graph.opset = LEGACY_OPSET
    steps = [requantize_int8_weights, reduce_axes_to_attributes, downgrade_changed_ops]
    if (major, minor) < (8, 6):
        steps.append(decompose_layer_norm)
    for step in steps:
        graph = step(graph)
    legacy = gs.export_onnx(graph)
    del legacy.opset_import[:]
    legacy.opset_import.extend([onnx.helper.make_opsetid("", LEGACY_OPSET)] + [
        o for o in model.opset_import if o.domain not in ("", "ai.onnx")])
    legacy.ir_version = min(model.ir_version, 8)  # IR 8 is what opset 17 shipped with
    legacy = infer_shapes(legacy, strict_mode=True)
    with atomic_path(dst) as tmp:
        onnx.save(legacy, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise LegacyGraphError(f"{Path(src).name} has an op this conversion does not bring "
                                   f"to opset {LEGACY_OPSET}: {str(e).splitlines()[0]}") from None
    return {"parser": parser_version, "opset": LEGACY_OPSET, "reduce_axes_to_attributes": reduces,
            "layer_norms_decomposed": layer_norms if (major, minor) < (8, 6) else 0}


def write_trt8_twin(src: str | Path, work_dir: Path) -> Path:
    """The TensorRT 8.x twin of `src` beside it in `work_dir` (8.5 rules, so that 8.6 takes it
    too), linted for both parsers (LintError if either would reject or mis-import it)."""
    from ..trt.lint import check_model

    dst = Path(work_dir) / twin_name(Path(src).name)
    to_trt8_graph(src, dst, "8.5")
    for parser in PARSERS:
        check_model(dst, parser=parser)
    return dst


def describe(count: int) -> str:
    """The stage line's note for `count` twins written by write_trt8_twin."""
    return (f"{count} graphs for TensorRT {' / '.join(PARSERS)}: opset {LEGACY_OPSET}, "
            "reduce axes as attributes, LayerNorm decomposed (FP32 statistics); lint "
            f"{' and '.join(PARSERS)}: no errors")


__all__ = ["to_trt8_graph", "write_trt8_twin", "describe", "twin_name", "LegacyGraphError",
           "LEGACY_OPSET", "NO_TWIN", "PARSERS"]
