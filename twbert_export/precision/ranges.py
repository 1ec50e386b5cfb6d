"""Activation ranges: the largest |value| of a graph's float tensors over calibration clips,
from one set of forward passes that the FP16 range check and INT8 max calibration share.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from ..data.calibration import FeedSet
from ..util import infer_shapes, require, scratch_directory
from .policy import INT8_OP_TYPES, SELECTION_NODES

# FP16 range check: a model with more float tensor bytes per clip than this is checked on its
# first LARGE_MODEL_RANGE_CLIPS clips only (INT8 calibration then continues over every clip on
# its own inputs alone).
LARGE_MODEL_TENSOR_BYTES = 3 * 2**30
LARGE_MODEL_RANGE_CLIPS = 4


@dataclass(frozen=True)
class RangesSeen:
    """What one ActivationRanges found (every watched tensor over its first `rows` rows), handed
    to another step on the same graph and clips so that it does not run those passes again."""
    src: Path
    calib_identity: dict
    rows: int
    absmax: dict[str, float]
    shapes: dict[str, tuple[int, ...]]


def _tensor_bytes(value_type) -> int:
    """Bytes of one clip's float tensor from its inferred type (symbolic dimensions, the batch,
    as 1)."""
    dims = [d.dim_value if d.HasField("dim_value") else 1
            for d in value_type.tensor_type.shape.dim]
    return 4 * int(np.prod(dims, dtype=np.int64))


class ActivationRanges:
    """The largest |value| of float tensors of a graph over the calibration rows, one forward
    pass per row: the FP16 range check and INT8 max calibration share these passes.

    Each watched tensor gets a ReduceMax and a ReduceMin placed right after the node that makes
    it, and the graph's outputs become those scalars; ONNX Runtime's priority-based order runs
    each reduction as soon as it can, so no tensor outlives its consumers (the default order
    holds far more per clip). AutoCast's own reference run instead makes every tensor a graph
    output and keeps them for all clips at once, which does not fit in memory at the base preset
    (figures: docs/benchmarks.md, "Export-time measurements behind the code"). Rows are taken in
    order; asking for more rows extends the running maxima. `watch` limits the tensors
    (default: every float tensor a node makes); `narrowed` continues on fewer tensors, which costs less per row.
    Without `watch` the passes also record the shapes of the matrix products' operands and
    results and of the graph outputs (`shapes`), which ModelOpt's GEMV check needs
    (`modelopt_compat.matmul_shapes_from`).
    """

    def __init__(self, src: str | Path, calib: FeedSet, watch: set[str] | None = None):
        onnx = require("onnx", "to inspect the graph")
        self.src, self.calib, self.rows_done = Path(src), calib, 0
        self.absmax: dict[str, float] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        model = onnx.load(str(src))
        inferred = infer_shapes(model, weights=False)
        value_types = {vi.name: vi.type
                       for vi in [*inferred.graph.value_info, *inferred.graph.output]}
        del inferred
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        initializers = {t.name for t in model.graph.initializer}
        self.node_tensors = {n.name: [t for t in [*n.input, *n.output] if t]
                             for n in model.graph.node}
        self.int8_inputs = {t for n in model.graph.node if n.op_type in INT8_OP_TYPES
                            and not any(re.match(p, n.name) for p in SELECTION_NODES)
                            for t in n.input if t and t not in initializers}
        self.watched: list[str] = []
        self.bytes_per_row = 0
        nodes = []
        for node in model.graph.node:
            nodes.append(node)
            for name in node.output:
                if name in value_types and value_types[name].tensor_type.elem_type in floats:
                    self.bytes_per_row += _tensor_bytes(value_types[name])
                    if watch is None or name in watch:
                        self.watched.append(name)
                        nodes += [onnx.helper.make_node(op, [name], [f"{name}::{op}"],
                                                        keepdims=0)
                                  for op in ("ReduceMax", "ReduceMin")]
        shaped = [] if watch is not None else list(dict.fromkeys(
            [o.name for o in model.graph.output]
            + [t for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
               for t in (n.output[0], n.input[1]) if t not in initializers]))
        nodes += [onnx.helper.make_node("Shape", [name], [f"{name}::Shape"]) for name in shaped]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        del model.graph.output[:]
        model.graph.output.extend(
            onnx.helper.make_tensor_value_info(f"{name}::{op}", value_types[name].tensor_type
                                               .elem_type, [])
            for name in self.watched for op in ("ReduceMax", "ReduceMin"))
        model.graph.output.extend(
            onnx.helper.make_tensor_value_info(f"{name}::Shape", onnx.TensorProto.INT64, [None])
            for name in shaped)
        self.inputs = [i.name for i in model.graph.input]
        self._model = model
        self._session = None
        self._scratch = contextlib.ExitStack()
        self._dir: Path | None = None

    @property
    def is_large(self) -> bool:
        """A model whose tensors per clip exceed LARGE_MODEL_TENSOR_BYTES: its forward passes
        are slow, so the FP16 check looks at LARGE_MODEL_RANGE_CLIPS clips."""
        return self.bytes_per_row > LARGE_MODEL_TENSOR_BYTES

    def default_rows(self) -> int:
        return min(len(self.calib), LARGE_MODEL_RANGE_CLIPS) if self.is_large else len(self.calib)

    def _start(self) -> None:
        onnx = require("onnx", "to write the range-watching graph")
        ort = require("onnxruntime", "to find the activation ranges")
        if self._dir is None and self._model is None:
            raise RuntimeError("these activation ranges are closed: make new ones for more rows")
        if self._dir is None:
            self._dir = self._scratch.enter_context(scratch_directory("twbert-ranges-"))
            # External weights: the graph stays under protobuf's 2 GB limit at any model size.
            onnx.save(self._model, str(self._path()), save_as_external_data=True,
                      location="weights.bin")
            self._model = None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        self._session = ort.InferenceSession(str(self._path()), opts,
                                             providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]

    def _path(self) -> Path:
        assert self._dir is not None
        return self._dir / "ranges.onnx"

    def release(self) -> None:
        """Free the ONNX Runtime session (its weights and arena); more rows start it again."""
        self._session = None

    def over(self, rows: int) -> dict[str, float]:
        """Largest |value| per watched tensor (graph inputs included) over the first `rows`
        rows."""
        rows = min(rows, len(self.calib))
        if rows > self.rows_done and self._session is None:
            self._start()
        for i in range(self.rows_done, rows):
            feed = self.calib.feed(slice(i, i + 1))
            values = dict(zip(self._outputs, self._session.run(self._outputs, feed)))
            for name, value in feed.items():
                if np.issubdtype(value.dtype, np.floating) and value.size:
                    values[f"{name}::ReduceMax"], values[f"{name}::ReduceMin"] = (
                        value.max(), value.min())
            for key, value in values.items():
                name, kind = key.rsplit("::", 1)
                if kind == "Shape":
                    self.shapes[name] = tuple(int(d) for d in value)
                else:
                    self.absmax[name] = max(self.absmax.get(name, 0.0), abs(float(value)))
        self.rows_done = max(self.rows_done, rows)
        return self.absmax

    def narrowed(self, tensors: set[str]) -> "ActivationRanges":
        """Ranges of `tensors` only, carrying on from the rows seen so far. This instance is
        closed (its session and files freed); it keeps what it found."""
        other = ActivationRanges(self.src, self.calib, watch=tensors)
        other.absmax = {t: v for t, v in self.absmax.items() if t in tensors}
        other.shapes, other.rows_done = self.shapes, self.rows_done
        self.close()
        return other

    def nodes_beyond(self, data_max: float) -> list[str]:
        """Nodes with an input or output beyond `data_max` on the rows seen so far."""
        return [node for node, tensors in self.node_tensors.items()
                if any(self.absmax.get(t, 0.0) > data_max for t in tensors)]

    def close(self) -> None:
        self._session = None
        self._scratch.close()
        self._dir = None

    def seen(self) -> RangesSeen:
        return RangesSeen(self.src, self.calib.identity, self.rows_done, dict(self.absmax),
                          dict(self.shapes))

    def resume(self, seen: RangesSeen) -> None:
        """Start from what another instance on the same graph and clips found."""
        if Path(seen.src) != self.src or seen.calib_identity != self.calib.identity:
            raise ValueError(f"activation ranges of {seen.src} on other clips cannot resume "
                             f"those of {self.src}")
        self.absmax, self.shapes = dict(seen.absmax), dict(seen.shapes)
        self.rows_done = seen.rows

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
