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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import FeedSet, check_calibration_set
from .util import atomic_path, file_sha256, require, write_json

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
# FP16 range check (out_of_range_nodes): tensors watched per forward pass, and the clips checked
# when a model needs several passes per clip.
RANGE_CHECK_GROUP_BYTES = 3 * 2**30
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


def _float_nodes(model) -> dict[str, str]:
    """Node name -> elem type name of its first output, after shape inference."""
    onnx = require("onnx", "to inspect the graph")
    inferred = onnx.shape_inference.infer_shapes(model)
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


def out_of_range_nodes(src: str | Path, calib: FeedSet, data_max: float = FP16_DATA_MAX
                       ) -> tuple[list[str], int]:
    """Names of the nodes with an input or output beyond `data_max` on the calibration clips, and
    how many clips were checked.

    AutoCast applies the same rule, but its reference run makes every tensor a graph output and
    keeps them for every clip at once: one clip of the base preset alone is about 24 GB of
    tensors, and it was killed at 24 GB. Here the tensors are watched in groups of at most
    `RANGE_CHECK_GROUP_BYTES` per clip, one ONNX Runtime session per group, one clip at a time,
    keeping only running maxima. When a model needs more than one group (a large model), only the
    first `LARGE_MODEL_RANGE_CLIPS` clips are checked: each group costs a forward pass per clip.
    """
    onnx = require("onnx", "to inspect the graph")
    ort = require("onnxruntime", "to find the activation ranges")
    model = onnx.load(str(src))
    inferred = onnx.shape_inference.infer_shapes(model)
    value_types = {vi.name: vi.type
                   for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    watched = [(name, _tensor_bytes(value_types[name])) for node in model.graph.node
               for name in node.output
               if name in value_types and value_types[name].tensor_type.elem_type in floats]
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in watched:
        if groups[-1] and size + nbytes > RANGE_CHECK_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    clips = len(calib) if len(groups) == 1 else min(len(calib), LARGE_MODEL_RANGE_CLIPS)
    absmax: dict[str, float] = {}

    def update(values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            if value.size and np.issubdtype(value.dtype, np.floating):
                absmax[name] = max(absmax.get(name, 0.0), float(np.abs(value).max()))

    with tempfile.TemporaryDirectory() as tmp:
        # Weights once, in one external file; each group's model is the graph only, beside it.
        full = Path(tmp) / "model.onnx"
        onnx.save(model, str(full), save_as_external_data=True, location="weights.bin")
        del model
        graph_only = onnx.load(str(full), load_external_data=False)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        for i in range(clips):
            update(calib.feed(slice(i, i + 1)))
        for k, group in enumerate(groups):
            watch = onnx.ModelProto()
            watch.CopyFrom(graph_only)
            del watch.graph.output[:]
            watch.graph.output.extend(onnx.ValueInfoProto(name=n, type=value_types[n])
                                      for n in group)
            path = Path(tmp) / f"group{k}.onnx"
            onnx.save(watch, str(path))
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for i in range(clips):
                update(dict(zip(group, session.run(group, calib.feed(slice(i, i + 1))))))
            del session
    names = [n.name for n in inferred.graph.node
             if any(absmax.get(t, 0.0) > data_max for t in [*n.input, *n.output])]
    return names, clips


def to_fp16(src: str | Path, dst: str | Path, calib: FeedSet,
            op_types_to_exclude: list[str] | None = None) -> PrecisionReport:
    """AutoCast to FP16 with FP32 I/O, selection and out-of-range nodes kept in FP32."""
    require("modelopt.onnx.autocast", "for FP16 AutoCast (pip install nvidia-modelopt)")
    from modelopt.onnx.autocast import convert_to_mixed_precision

    onnx = require("onnx", "to write ONNX files")
    over, range_clips = out_of_range_nodes(src, calib)
    out_of_range = [f"^{re.escape(name)}$" for name in over]
    with _quiet_modelopt():
        # data_max=inf: the range rule was applied above, and AutoCast skips its own reference
        # run (the memory problem out_of_range_nodes describes).
        model = convert_to_mixed_precision(
            str(src), low_precision_type="fp16", keep_io_types=True,
            nodes_to_exclude=SELECTION_NODES + out_of_range,
            op_types_to_exclude=op_types_to_exclude, data_max=np.inf, providers=["cpu"])
    # AutoCast reuses one symbolic dim name for different sizes; let inference redo value_info.
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    with atomic_path(dst) as tmp_dst:
        onnx.save(model, str(tmp_dst))
        onnx.checker.check_model(str(tmp_dst), full_check=True)
    low, total, selection, by_range = _classify(onnx.load(str(src)), model)
    return PrecisionReport("fp16", selection, by_range, low, total,
                           calibration={"clips": len(calib.video), "data": calib.identity,
                                        "range_check_clips": range_clips})


def _cache_dir() -> Path:
    root = os.environ.get("TWBERT_CACHE") or Path.home() / ".cache" / "twbert-export"
    return Path(root) / "int8"


def calibration_key(model_sha: str, calib: FeedSet, method: str) -> str:
    settings = {"model": model_sha, "data": calib.identity["files_sha256"],
                "preprocessing": calib.identity["preprocessing_sha256"], "method": method,
                "op_types": INT8_OP_TYPES, "exclude": SELECTION_NODES, "mha_qdq": False,
                "fp32_in_fp16": QDQ_OPS,
                "rows": len(calib), "fp16_data_max": FP16_DATA_MAX, "calibration_batch": 1}
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


def to_int8(src: str | Path, dst: str | Path, calib: FeedSet, method: str = "max",
            use_cache: bool = True) -> PrecisionReport:
    """Q/DQ INT8 on the matrix products from real clips, then FP16 for the rest (AutoCast)."""
    if method not in CALIB_METHODS:
        raise ValueError(f"--calib-method must be one of {CALIB_METHODS}, got {method!r}")
    check_calibration_set(calib)
    require("modelopt.onnx.quantization", "for INT8 Q/DQ (pip install nvidia-modelopt)")
    from modelopt.onnx.quantization import quantize

    calibration = {"clips": len(calib.video), "rows": len(calib), "method": method,
                   "data": calib.identity}
    key = calibration_key(file_sha256(src), calib, method)
    cached = _cache_dir() / key / "model.int8.onnx"
    if use_cache and cached.is_file():
        shutil.copyfile(cached, dst)
        report = to_report_from(src, dst, calibration)
        report.cache = f"reused {cached}"
        return report

    with tempfile.TemporaryDirectory() as tmp:
        # ModelOpt writes scratch files beside its input: work on a copy in our own folder.
        work = Path(tmp) / "model.onnx"
        shutil.copyfile(src, work)
        qdq = Path(tmp) / "model.qdq.onnx"
        # A padded text first: the mask bias must not be all zeros in the first batch, or the
        # entropy histogram's range is fixed too small (seen to crash ORT's calibrator).
        order = np.argsort(calib.attention_mask.sum(1), kind="stable")
        with _quiet_modelopt():
            quantize(str(work), quantize_mode="int8",
                     calibration_data_reader=_RowReader(calib, order),
                     calibration_method=method, calibration_eps=["cpu"],
                     op_types_to_quantize=INT8_OP_TYPES, nodes_to_exclude=SELECTION_NODES,
                     high_precision_dtype="fp32", disable_mha_qdq=True,
                     output_path=str(qdq), log_level="ERROR")
        to_fp16(qdq, Path(tmp) / "model.int8.onnx", calib, op_types_to_exclude=QDQ_OPS)
        shutil.copyfile(Path(tmp) / "model.int8.onnx", dst)
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp_cached:
            shutil.copyfile(dst, tmp_cached)
        write_json(cached.parent / "identity.json", {"source_model_sha256": file_sha256(src),
                                                     **calibration})
    report = to_report_from(src, dst, calibration)
    report.cache = f"stored {cached}" if use_cache else None
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
