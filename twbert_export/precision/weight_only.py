"""int8w: weight-only INT8. The graph is the FP16 one (the same AutoCast, range check and FP32
selection path as `fp16.to_fp16`), then each matrix-product weight (INT8_OP_TYPES, outside the
selection path and the nodes kept FP32) is stored as an INT8 initializer with one FP16 scale per
output channel and a DequantizeLinear in front of its product: activations stay FP16 and nothing
is calibrated (the scales come from the weights: max |w| per channel / 127).

This is the DQ-only weight form of TensorRT's explicit quantization ("pre-quantized weights": an
INT8 constant, an IDequantizeLayer, then the linear operator), with no Q/DQ on the activation:
TensorRT 10.x imports it and may run the product as a weight-only GEMM or dequantize the weights
at build time (docs/deploy.md says which versions take which form); TensorRT 8.5 / 8.6 get no
twin of it (export/legacy.py refuses).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..util import atomic_path, infer_shapes, require
from .fp16 import PrecisionReport, _classified, _float_nodes, to_fp16
from .policy import INT8_OP_TYPES, SELECTION_NODES, WEIGHT_ONLY_QMAX
from .ranges import ActivationRanges


def weight_axis(node) -> int | None:
    """The output-channel axis of `node`'s weight (its input 1), or None when the op has none we
    quantize: MatMul (K, N) -> 1, Gemm -> 0 with transB else 1, Conv (M, C, ...) -> 0."""
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "Conv":
        return 0
    return None


def quantize_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(INT8 values, FP16 scales) of `weight` along `axis`: symmetric, narrow range, rounded half
    to even (as ONNX QuantizeLinear). The values are computed with the FP16 scale the graph
    stores, so DequantizeLinear gives back q * scale exactly as quantized. A channel of zeros
    gets scale 1 (and values 0)."""
    w = weight.astype(np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=other)
    scale = np.where(absmax > 0, absmax / WEIGHT_ONLY_QMAX, 1.0)
    # FP16 subnormals would lose the scale's precision; the smallest normal FP16 is 2**-14.
    scale = np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.astype(np.float32).reshape(shape)), -WEIGHT_ONLY_QMAX,
                WEIGHT_ONLY_QMAX)
    return q.astype(np.int8), scale


def weights_to_quantize(graph) -> dict[str, int]:
    """Weight initializer name -> output-channel axis, for each matrix-product weight of `graph`
    (rank >= 2) whose every consumer is a quantized product (INT8_OP_TYPES, outside the
    selection path) taking it as input 1 along one axis (a shared or otherwise used tensor is
    left out)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    chosen = {}
    for tensor in graph.initializer:
        uses = consumers.get(tensor.name, [])
        if len(tensor.dims) < 2 or not uses:
            continue
        if all(node.op_type in INT8_OP_TYPES and i == 1
               and not any(re.match(p, node.name) for p in SELECTION_NODES)
               for node, i in uses):
            axes = {weight_axis(node) for node, _ in uses}
            if len(axes) == 1:
                chosen[tensor.name] = axes.pop()
    return chosen


def quantize_weights(model) -> int:
    """Replace, in place, each FP16 weight of `weights_to_quantize` by INT8 values + FP16
    per-channel scales + DequantizeLinear, whose output keeps the weight's name (its consumers
    are untouched). FP32 weights (the nodes kept FP32: selection path, range) stay as they are.
    Returns how many were replaced."""
    onnx = require("onnx", "to rewrite the graph")
    numpy_helper = require("onnx.numpy_helper", "to read the weights")
    graph = model.graph
    axes = weights_to_quantize(graph)
    dequantize_nodes = []
    for tensor in [t for t in graph.initializer if t.name in axes]:
        if tensor.data_type != onnx.TensorProto.FLOAT16:
            continue
        name, axis = tensor.name, axes[tensor.name]
        q, scale = quantize_per_channel(numpy_helper.to_array(tensor), axis)
        graph.initializer.remove(tensor)
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            # Explicit zero point: INT8 and symmetric (TensorRT takes zero points of 0 only).
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point")])
        dequantize_nodes.append(onnx.helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"], [name],
            name=f"{name}_DequantizeLinear", axis=axis))
    # Initializer-fed nodes first keeps the graph topologically sorted.
    for node in reversed(dequantize_nodes):
        graph.node.insert(0, node)
    return len(dequantize_nodes)


def to_int8_weights(src: str | Path, dst: str | Path, ranges: ActivationRanges
                    ) -> PrecisionReport:
    """`src` (FP32) to weight-only INT8: `fp16.to_fp16` (FP32 I/O, selection and out-of-range
    nodes FP32), then `quantize_weights`. `ranges` as for `to_fp16`."""
    onnx = require("onnx", "to write ONNX files")
    fp16_report = to_fp16(src, dst, ranges)
    model = onnx.load(str(dst))
    replaced = quantize_weights(model)
    model = infer_shapes(model, in_place=True)
    with atomic_path(dst) as tmp_dst:
        onnx.save(model, str(tmp_dst))
        after = _float_nodes(model)
        del model  # as fp16.to_fp16: before the checker and the FP32 model load their own
        onnx.checker.check_model(str(tmp_dst), full_check=True)
    low, total, selection, by_range = _classified(_float_nodes(onnx.load(str(src))), after)
    return PrecisionReport(
        "int8w", selection, by_range, low, total,
        calibration={**fp16_report.calibration, "int8_weights": replaced,
                     "activation_calibration": None},
        steps={**fp16_report.steps}, note=fp16_report.note)
