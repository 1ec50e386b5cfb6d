"""Stage 5: make the precision explicit in the ONNX file, so that ONNX Runtime on the CPU runs
the numerics TensorRT will build strongly typed.

- fp32: the rewritten graph as it is.
- fp16: ModelOpt AutoCast, FP32 inputs and outputs. The frame selection (scorer, softmax, hard
  top-k, the kept-frames product) stays FP32: a flipped frame choice is a different answer. Nodes
  whose activations on the calibration clips exceed `FP16_DATA_MAX` stay FP32 too, and are
  reported.
- int8: ModelOpt Q/DQ on the weight matrix products (MatMul, Gemm, Conv; not the attention
  products), calibrated on real clips, the selection path excluded; the rest then goes through
  the same AutoCast as fp16, with the Q/DQ nodes (and their scales) left in FP32. The result is
  cached by (model hash, calibration data identity, settings) and reused only on a full match.

Both read the activation ranges from one set of forward passes (`ActivationRanges`): every
tensor on the clips the FP16 check looks at, then only the INT8 inputs on the remaining
calibration clips. Max calibration is that running maximum (checked equal to ModelOpt's own
calibration: tests/export/test_fp16_ranges.py). ModelOpt 0.47 would run the model again for
its own calibration and for its GEMV check, and infer shapes on the whole 1 GB model many
times over: within our calls those take what the passes found and weight-free inference
(`_calibrator_from`, `_matmul_shapes_from`, `_light_shape_inference`; each tested to give
byte-identical graphs, and each leaves ModelOpt as it was on exit).

Measured on the demo checkpoint (24 validation rows, max |error| of itc_sim vs FP32): entropy
calibration 0.26, max 0.054; quantizing the attention products as well 0.26 -> 0.21 without
them (entropy); converting the Q/DQ scales to FP16 with the rest 0.054 -> 0.38, keeping them
FP32 0.056. Hence the defaults below.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from .calibration import FeedSet, check_calibration_set
from .util import (
    Stopwatch,
    atomic_path,
    file_sha256,
    infer_shapes,
    infer_shapes_in_file,
    release_heap,
    require,
    write_json,
)

PRECISIONS = ("fp32", "fp16", "int8")
# Everything that decides which frames are kept: the scorers, their softmax, the hard top-k and
# the product that gathers the kept frames (all named under the selector modules at export).
SELECTION_NODES = [r"/model/selector[12]/.*"]
# Quantize only the matrix products: residual Adds and LayerNorms in INT8 cost accuracy for
# little speed (measured on the tiny model: 10x larger logit error with them quantized).
INT8_OP_TYPES = ["MatMul", "Gemm", "Conv"]
# Activations beyond this stay FP32. Our attention mask adds -1e4 (finite in FP16); ModelOpt's
# default of 512 would keep every masked softmax in FP32 for no reason. Half of FP16's maximum
# leaves headroom for clips brighter than the calibration set.
FP16_DATA_MAX = 32768.0
CALIB_METHODS = ("max", "entropy")
QDQ_OPS = ["QuantizeLinear", "DequantizeLinear"]
# FP16 range check (ActivationRanges): a model with more float tensor bytes per clip than this is
# checked on its first LARGE_MODEL_RANGE_CLIPS clips only (INT8 calibration then continues over
# every clip on its own inputs alone).
LARGE_MODEL_TENSOR_BYTES = 3 * 2**30
LARGE_MODEL_RANGE_CLIPS = 4


@dataclass
class PrecisionReport:
    precision: str
    kept_fp32_selection: list[str] = field(default_factory=list)
    kept_fp32_range: list[str] = field(default_factory=list)
    low_precision_nodes: int = 0
    total_nodes: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)  # seconds of each sub-step

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def _quiet_modelopt():
    """ModelOpt logs every node at INFO (to a stdout handler it made at import) and prints
    progress bars and NVML errors on GPU-less machines: one line per stage is ours to print."""
    ort = require("onnxruntime", "to run the precision conversion")
    ort.set_default_logger_severity(3)
    logging.disable(logging.WARNING)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _linear_dead_node_cleanup():
    """AutoCast's last pass drops nodes whose outputs nothing reads
    (`PrecisionConverter._cleanup_no_consumer_nodes`, ModelOpt 0.47) by scanning every node
    for each output: quadratic, 47 of the 106 s AutoCast took on the base preset's INT8 graph
    (12.6k nodes). Within this context the same rule runs from one set of the consumed names
    (tests/export/test_fp16_ranges.py checks the output is byte-identical). A ModelOpt without
    that method runs unchanged."""
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    name = "_cleanup_no_consumer_nodes"
    original = PrecisionConverter.__dict__.get(name)
    if original is None:
        yield
        return

    def cleanup_no_consumer_nodes(self) -> None:
        graph = self.model.graph
        # ModelOpt's test per output: a graph output, or an input of some node of this graph.
        needed = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(out in needed for out in n.output)]
        for node in dead:
            graph.node.remove(node)

    setattr(PrecisionConverter, name, cleanup_no_consumer_nodes)
    try:
        yield
    finally:
        setattr(PrecisionConverter, name, original)


@contextlib.contextmanager
def _light_shape_inference():
    """ModelOpt's shape inference (ModelOpt 0.47: `modelopt.onnx.utils.infer_shapes`, and
    `onnx.shape_inference.infer_shapes_path` on its input file, both on the whole model,
    weights included) runs as `util.infer_shapes` / `util.infer_shapes_in_file` within this
    context: the same result without serialising the weights for it."""
    onnx = require("onnx", "for shape inference")
    from modelopt.onnx import utils
    from modelopt.onnx.quantization import graph_utils

    onnx_in_file = onnx.shape_inference.infer_shapes_path

    def light_in_file(model_path, output_path="", **kwargs) -> None:
        if not infer_shapes_in_file(model_path, output_path, **kwargs):
            onnx_in_file(model_path, output_path, **kwargs)

    targets = [(m, "infer_shapes", infer_shapes) for m in (utils, graph_utils)
               if hasattr(m, "infer_shapes")]
    targets.append((onnx.shape_inference, "infer_shapes_path", light_in_file))
    originals = [getattr(module, name) for module, name, _ in targets]
    for module, name, replacement in targets:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for (module, name, _), original in zip(targets, originals):
            setattr(module, name, original)


@contextlib.contextmanager
def _calibrator_from(absmax: dict[str, float]):
    """ModelOpt 0.47 runs ONNX Runtime's calibrator even when a calibration cache gives every
    scale: it writes an augmented copy of the model and runs one clip keeping every calibrated
    tensor (34 s and the INT8 step's memory peak on the base preset), then replaces the scales
    by the cache's. Within this context the calibrator factory (ModelOpt's, which it installs
    into ONNX Runtime at each `quantize`) gives these maxima as symmetric ranges without running
    anything; the context yields the list of calibrators it made.
    tests/export/test_pipeline.py checks the Q/DQ graph is byte-identical."""
    calibrate = require("onnxruntime.quantization.calibrate", "for INT8 calibration")
    from modelopt.onnx.quantization import ort_patching

    class KnownRanges:
        def collect_data(self, data_reader) -> None:
            pass

        def compute_data(self):
            return calibrate.TensorsData(calibrate.CalibrationMethod.MinMax, {
                name: (np.array(-amax, np.float32), np.array(amax, np.float32))
                for name, amax in absmax.items()})

    made: list[KnownRanges] = []

    def create_calibrator(*args, **kwargs) -> KnownRanges:
        made.append(KnownRanges())
        return made[-1]

    factories = [(ort_patching, "_create_calibrator_with_extra_options"),
                 (calibrate, "create_calibrator")]
    originals = [getattr(module, name) for module, name in factories]
    for module, name in factories:
        setattr(module, name, create_calibrator)
    try:
        yield made
    finally:
        for (module, name), original in zip(factories, originals):
            setattr(module, name, original)


@contextlib.contextmanager
def _matmul_shapes_from(shapes: dict[str, tuple[int, ...]]):
    """ModelOpt's GEMV check (`graph_utils.get_extended_model_outputs`, ModelOpt 0.47) runs one
    clip through the model once more keeping every matrix product's result, for their shapes
    only (17-19 s on the base preset). Within this context it gets the shapes our range passes saw
    (`ActivationRanges.shapes`: batch 1, and frames and text length are fixed per export, so
    every clip gives the same), as zero-stride arrays; a tensor we did not see sends the call
    to ModelOpt's own run."""
    from modelopt.onnx.quantization import graph_utils

    original = graph_utils.get_extended_model_outputs

    def outputs_of(onnx_path, extended_model, *args, **kwargs):
        names = [o.name for o in extended_model.graph.output]
        if not all(name in shapes for name in names):
            return original(onnx_path, extended_model, *args, **kwargs)
        return {name: np.broadcast_to(np.float32(0), shapes[name]) for name in names}

    graph_utils.get_extended_model_outputs = outputs_of
    try:
        yield
    finally:
        graph_utils.get_extended_model_outputs = original


def _float_nodes(model) -> dict[str, str]:
    """Node name -> elem type name of its first output, after shape inference."""
    onnx = require("onnx", "to inspect the graph")
    inferred = infer_shapes(model, weights=False)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    return {n.name: names[types[n.output[0]]] for n in inferred.graph.node
            if n.output and types.get(n.output[0]) in names}


def _classify(fp32_model, converted) -> tuple[int, int, list[str], list[str]]:
    import re

    before, after = _float_nodes(fp32_model), _float_nodes(converted)
    fp16 = [n for n, t in after.items() if t == "float16"]
    kept = [n for n in before if after.get(n) == "float32"]
    selection = [n for n in kept if any(re.match(p, n) for p in SELECTION_NODES)]
    by_range = [n for n in kept if n not in selection]
    return len(fp16), len(before), selection, by_range


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
    each reduction as soon as it can, so no tensor outlives its consumers (with the default
    order the base preset held 11 GB per clip and ran 2.7x slower). AutoCast's own reference run
    instead makes every tensor a graph output and keeps them for all clips at once (one base
    clip is about 24 GB of tensors; it was killed at 24 GB). Rows are taken in order; asking
    for more rows extends the running maxima. `watch` limits the tensors (default: every float
    tensor a node makes); `narrowed` continues on fewer tensors, which costs less per row.
    Without `watch` the passes also record the shapes of the matrix products' operands and
    results and of the graph outputs (`shapes`), which ModelOpt's GEMV check needs
    (`_matmul_shapes_from`).
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
        self._tmp: tempfile.TemporaryDirectory | None = None

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
        if self._tmp is None and self._model is None:
            raise RuntimeError("these activation ranges are closed: make new ones for more rows")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory()
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
        assert self._tmp is not None
        return Path(self._tmp.name) / "ranges.onnx"

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
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_fp16(src: str | Path, dst: str | Path, ranges: ActivationRanges,
            op_types_to_exclude: list[str] | None = None) -> PrecisionReport:
    """AutoCast to FP16 with FP32 I/O, selection and out-of-range nodes kept in FP32. `ranges`
    watches `src`, or the FP32 graph `src` was made from (INT8: its Q/DQ graph keeps the node
    names); rows not yet seen are checked first (`ActivationRanges.default_rows`)."""
    require("modelopt.onnx.autocast", "for FP16 AutoCast (pip install nvidia-modelopt)")
    from modelopt.onnx.autocast import convert_to_mixed_precision

    onnx = require("onnx", "to write ONNX files")
    with Stopwatch() as range_check:
        ranges.over(ranges.default_rows())
    ranges.release()  # its ONNX Runtime session, before AutoCast loads the model again
    out_of_range = [f"^{re.escape(name)}$" for name in ranges.nodes_beyond(FP16_DATA_MAX)]
    with (_quiet_modelopt(), _linear_dead_node_cleanup(), _light_shape_inference(),
          Stopwatch() as autocast):
        # data_max=inf: the range rule was applied above, and AutoCast skips its own reference
        # run (the memory problem ActivationRanges describes).
        model = convert_to_mixed_precision(
            str(src), low_precision_type="fp16", keep_io_types=True,
            nodes_to_exclude=SELECTION_NODES + out_of_range,
            op_types_to_exclude=op_types_to_exclude, data_max=np.inf, providers=["cpu"])
    # AutoCast reuses one symbolic dim name for different sizes; let inference redo value_info.
    del model.graph.value_info[:]
    model = infer_shapes(model)
    with atomic_path(dst) as tmp_dst:
        onnx.save(model, str(tmp_dst))
        onnx.checker.check_model(str(tmp_dst), full_check=True)
    low, total, selection, by_range = _classify(onnx.load(str(src)), model)
    calib = ranges.calib
    return PrecisionReport("fp16", selection, by_range, low, total,
                           calibration={"clips": len(calib.video), "data": calib.identity,
                                        "range_check_clips": ranges.rows_done},
                           steps={"range check": range_check.seconds,
                                  "AutoCast": autocast.seconds})


def _cache_dir() -> Path:
    root = os.environ.get("TWBERT_CACHE") or Path.home() / ".cache" / "twbert-export"
    return Path(root) / "int8"


def calibration_key(model_sha: str, calib: FeedSet, method: str) -> str:
    settings = {"model": model_sha, "data": calib.identity["files_sha256"],
                "preprocessing": calib.identity["preprocessing_sha256"], "method": method,
                "op_types": INT8_OP_TYPES, "exclude": SELECTION_NODES, "mha_qdq": False,
                "fp32_in_fp16": QDQ_OPS,
                "rows": len(calib), "fp16_data_max": FP16_DATA_MAX, "calibration_batch": 1,
                "max_calibration": "activation-ranges"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


class _RowReader:
    """Calibration rows one at a time (ONNX Runtime's CalibrationDataReader protocol, plus
    ModelOpt's `get_first`). ModelOpt's calibrators fold each batch into running ranges; given
    all rows as one batch, the base preset would hold every quantized input of 64 clips at once
    (tens of GB). Same ranges either way."""

    def __init__(self, calib: FeedSet, order: np.ndarray):
        self.calib, self.order, self.next_row = calib, order, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next_row >= len(self.order):
            return None
        row = self.order[self.next_row:self.next_row + 1]
        self.next_row += 1
        return self.calib.feed(row)

    def get_first(self) -> dict[str, np.ndarray]:
        """The first row without advancing (ModelOpt's test run of the session)."""
        return self.calib.feed(self.order[:1])

    def rewind(self) -> None:
        self.next_row = 0


def write_scale_cache(path: Path, absmax: dict[str, float]) -> Path:
    """INT8 activation scales (symmetric: |max| / 127) in TensorRT's calibration-cache text
    format, which ModelOpt imports (`calibration_cache_path`): a header line, then
    `tensor: <scale as big-endian float32 hex>` per tensor. A tensor that is all zeros gets
    scale 1, as ONNX Runtime's calibration gives it."""
    lines = ["TRT-twbert-export-MaxCalibration"]
    for name, amax in absmax.items():
        scale = amax / 127.0 if amax > 0 else 1.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def check_scales(model, absmax: dict[str, float]) -> int:
    """Every activation QuantizeLinear must carry the scale of our own max calibration (ModelOpt
    replaces scales by tensor name; a silent miss would leave a one-clip scale in place).
    Returns how many were checked."""
    numpy_helper = require("onnx.numpy_helper", "to read the scales")
    inits = {t.name: t for t in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        amax = absmax.get(node.input[0])
        scale = float(numpy_helper.to_array(inits[node.input[1]]))
        expected = np.float32(amax / 127.0 if amax else 1.0)
        if amax is None or scale != expected:
            raise RuntimeError(f"INT8 scale of {node.input[0]} is {scale}, not the calibrated "
                               f"{expected}: ModelOpt did not take the calibration cache")
        checked += 1
    return checked


def to_int8(src: str | Path, dst: str | Path, calib: FeedSet, method: str = "max",
            use_cache: bool = True, ranges: ActivationRanges | None = None) -> PrecisionReport:
    """Q/DQ INT8 on the matrix products from real clips, then FP16 for the rest (AutoCast).

    `max`: the activation maxima come from `ranges` over every calibration clip (the FP16
    check's clips, then the INT8 inputs alone on the rest) and reach ModelOpt as a calibration
    cache, and to ONNX Runtime's calibrator inside ModelOpt as its result (`_calibrator_from`:
    no calibration run of ModelOpt's own); ModelOpt's scales are checked to be ours. Its GEMV
    check takes the shapes our passes saw (`_matmul_shapes_from`).
    `entropy`: ModelOpt calibrates on every clip (histograms are its own)."""
    if method not in CALIB_METHODS:
        raise ValueError(f"--calib-method must be one of {CALIB_METHODS}, got {method!r}")
    check_calibration_set(calib)
    require("modelopt.onnx.quantization", "for INT8 Q/DQ (pip install nvidia-modelopt)")
    from modelopt.onnx.quantization import quantize

    onnx = require("onnx", "to read the quantized graph")
    calibration = {"clips": len(calib.video), "rows": len(calib), "method": method,
                   "data": calib.identity}
    key = calibration_key(file_sha256(src), calib, method)
    cached = _cache_dir() / key / "model.int8.onnx"
    if use_cache and cached.is_file():
        shutil.copyfile(cached, dst)
        report = to_report_from(src, dst, calibration)
        report.cache = f"reused {cached}"
        return report

    own_ranges = ranges is None
    ranges = ranges or ActivationRanges(src, calib)
    steps: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # ModelOpt writes scratch files beside its input: work on a copy in our own folder.
            work = Path(tmp) / "model.onnx"
            shutil.copyfile(src, work)
            qdq = Path(tmp) / "model.qdq.onnx"
            # A padded text first: the mask bias must not be all zeros in the first batch, or
            # the entropy histogram's range is fixed too small (seen to crash ORT's calibrator).
            order = np.argsort(calib.attention_mask.sum(1), kind="stable")
            scales = None
            if method == "max":
                with Stopwatch() as passes:
                    ranges.over(ranges.default_rows())  # what the FP16 step below needs
                    quantized = ranges.narrowed(ranges.int8_inputs | set(ranges.inputs))
                    try:
                        absmax = dict(quantized.over(len(calib)))
                    finally:
                        quantized.close()
                        release_heap()  # before ModelOpt loads its copies of the model
                steps["calibration passes"] = passes.seconds
                scales = write_scale_cache(Path(tmp) / "scales.cache", absmax)
                order = order[:1]
            known = _calibrator_from(absmax) if scales else contextlib.nullcontext()
            with (_quiet_modelopt(), known, _matmul_shapes_from(ranges.shapes),
                  _light_shape_inference(), Stopwatch() as quantizing):
                quantize(str(work), quantize_mode="int8",
                         calibration_data_reader=_RowReader(calib, order),
                         calibration_method=method, calibration_eps=["cpu"],
                         calibration_cache_path=str(scales) if scales else None,
                         op_types_to_quantize=INT8_OP_TYPES, nodes_to_exclude=SELECTION_NODES,
                         high_precision_dtype="fp32", disable_mha_qdq=True,
                         output_path=str(qdq), log_level="ERROR")
            steps["ModelOpt Q/DQ"] = quantizing.seconds
            if scales:
                calibration["scales_checked"] = check_scales(onnx.load(str(qdq)), absmax)
            fp16 = to_fp16(qdq, Path(tmp) / "model.int8.onnx", ranges,
                           op_types_to_exclude=QDQ_OPS)
            steps["AutoCast"] = fp16.steps["AutoCast"]
            shutil.copyfile(Path(tmp) / "model.int8.onnx", dst)
    finally:
        if own_ranges:
            ranges.close()
    calibration["range_check_clips"] = ranges.rows_done
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp_cached:
            shutil.copyfile(dst, tmp_cached)
        write_json(cached.parent / "identity.json", {"source_model_sha256": file_sha256(src),
                                                     **calibration})
    report = to_report_from(src, dst, calibration)
    report.cache = f"stored {cached}" if use_cache else None
    report.steps = steps
    return report


def to_report_from(src: str | Path, dst: str | Path, calibration: dict[str, Any]
                   ) -> PrecisionReport:
    onnx = require("onnx", "to inspect the graph")
    model = onnx.load(str(dst))
    low, total, selection, kept = _classify(onnx.load(str(src)), model)
    # Nodes fed by DequantizeLinear run in INT8 (TensorRT fuses Q/DQ into the layer); their
    # FP32 type in the file is that of the dequantized values, not a range decision.
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    int8_nodes = {n.name for n in model.graph.node if dequantized.intersection(n.input)}
    by_range = [n for n in kept if n not in int8_nodes and n not in selection]
    qdq = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    return PrecisionReport("int8", selection, by_range, low, total,
                           calibration={**calibration, "quantized_tensors": qdq,
                                        "int8_nodes": len(int8_nodes)})
