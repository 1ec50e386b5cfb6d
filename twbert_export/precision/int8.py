"""INT8: ModelOpt Q/DQ on the weight matrix products (MatMul, Gemm, Conv; not the attention
products), calibrated on real clips with the selection path excluded; the rest then goes through
the same AutoCast as FP16, with the Q/DQ nodes (and their scales) left in FP32. The quantized
weights are stored as INT8 initializers feeding their DequantizeLinear (ModelOpt's `dq_only`:
the values its QuantizeLinear would compute, so the numerics are those of the Q/DQ form, at a
quarter of the bytes); the activations keep their Q/DQ pairs. TensorRT 8.5 / 8.6 get the FP32-weight
form back in their twin (export/legacy.py). The result is
cached by (model hash, calibration data identity, settings) and reused only on a full match of
an entry that passes its check: identity, sha256 recorded when stored, Q/DQ nodes present, the
FP32 graph's inputs and outputs (`cached_result`, `store_result`). A run told not to use the
cache (`use_cache=False`, --no-calib-cache) recalibrates and stores its result over the entry.

Max calibration is the running maximum of `ActivationRanges` (checked equal to ModelOpt's own
calibration: tests/export/test_fp16_ranges.py); it reaches ModelOpt as a TensorRT calibration
cache, and its scales are checked to be ours in the Q/DQ graph (`check_scales`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .modelopt_compat import (calibrator_from, light_shape_inference, matmul_shapes_from,
                              quiet_modelopt, untested_note)
from ..data.calibration import FeedSet, check_calibration_set
from ..util import (Stopwatch, atomic_path, file_sha256, release_heap, require, scratch_directory,
                    write_json)
from .fp16 import PrecisionReport, _classify, to_fp16
from .policy import CALIB_METHODS, FP16_DATA_MAX, INT8_OP_TYPES, QDQ_OPS, SELECTION_NODES
from .ranges import ActivationRanges, RangesSeen


def _cache_dir() -> Path:
    root = os.environ.get("TWBERT_CACHE") or Path.home() / ".cache" / "twbert-export"
    return Path(root) / "int8"


def calibration_key(model_sha: str, calib: FeedSet, method: str) -> str:
    settings = {"model": model_sha, "data": calib.identity["files_sha256"],
                "preprocessing": calib.identity["preprocessing_sha256"], "method": method,
                "op_types": INT8_OP_TYPES, "exclude": list(SELECTION_NODES), "mha_qdq": False,
                "fp32_in_fp16": QDQ_OPS,
                "rows": len(calib), "fp16_data_max": FP16_DATA_MAX, "calibration_batch": 1,
                "max_calibration": "activation-ranges",
                "weights": "int8-dq-only"}
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


class CacheEntryDiscarded(UserWarning):
    """A calibration cache entry failed its check and is rebuilt."""


def cache_identity(key: str, source_sha256: str, calib: FeedSet, method: str) -> dict[str, Any]:
    """What a cache entry must have been made from to be reused (stored in its identity.json)."""
    return {"key": key, "source_model_sha256": source_sha256, "method": method,
            "data_files_sha256": calib.identity["files_sha256"],
            "preprocessing_sha256": calib.identity["preprocessing_sha256"]}


def _entry_problem(cached: Path, expected: dict[str, Any], source: Path | None = None
                   ) -> str | None:
    """Why the cache entry `cached` must not be reused, or None when it passes: its identity
    file matches `expected`, the file has the sha256 recorded when it was stored, it holds
    Q/DQ nodes and, given the `source` graph it is to stand for, takes and gives what that graph
    takes and gives (`_io_problem`: a Q/DQ graph of another model, its hash rewritten, fails
    here and not at a later stage)."""
    try:
        identity = json.loads((cached.parent / "identity.json").read_text())
    except (OSError, ValueError) as e:
        return f"identity.json unreadable ({type(e).__name__})"
    if not isinstance(identity, dict):
        return "identity.json is not a JSON object"
    differing = [k for k, v in expected.items() if identity.get(k) != v]
    if differing:
        return f"identity.json differs in {', '.join(differing)}"
    if identity.get("int8_sha256") != file_sha256(cached):
        return "the file is not the one stored (sha256 differs: truncated or replaced)"
    onnx = require("onnx", "to check the cached graph")
    try:
        graph = onnx.load(str(cached), load_external_data=False).graph
    except Exception as e:  # onnx's parsers raise their own error types
        return f"not a readable ONNX file ({type(e).__name__})"
    ops = {n.op_type for n in graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} <= ops:
        return "no QuantizeLinear/DequantizeLinear nodes: not an INT8 Q/DQ graph"
    if source is not None:
        return _io_problem(graph, onnx.load(str(source), load_external_data=False).graph)
    return None


def _graph_io(graph) -> tuple[list[tuple[str, int, list]], list[tuple[str, int, list]]]:
    """(name, element type, dims) of a graph's inputs (initializers left out) and outputs."""
    def described(values) -> list[tuple[str, int, list]]:
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values]

    initializers = {t.name for t in graph.initializer}
    return (described([i for i in graph.input if i.name not in initializers]),
            described(graph.output))


def _io_problem(cached_graph, source_graph) -> str | None:
    """How a cached INT8 graph's inputs and outputs differ from the FP32 graph it was made from
    (the precision steps keep names, types and shapes of both: the graph's contract), or None."""
    cached_in, cached_out = _graph_io(cached_graph)
    source_in, source_out = _graph_io(source_graph)
    for kind, got, want in (("inputs", cached_in, source_in), ("outputs", cached_out, source_out)):
        if got != want:
            return (f"its {kind} {[g[0] for g in got]} are not the FP32 graph's "
                    f"{[w[0] for w in want]} (names, types and shapes must match): a graph of "
                    "another model")
    return None


def cached_result(key: str, expected: dict[str, Any], source: Path | None = None) -> Path | None:
    """The cached INT8 graph for a calibration key when there is one and it passes its check
    (`_entry_problem`, against the FP32 `source` graph when given); a failing entry is removed
    with a one-line warning, and None returned so that it is rebuilt."""
    cached = _cache_dir() / key / "model.int8.onnx"
    if not cached.is_file():
        return None
    problem = _entry_problem(cached, expected, source)
    if problem is None:
        return cached
    warnings.warn(f"INT8 calibration cache entry {cached.parent} discarded: {problem}; "
                  "recalibrating", CacheEntryDiscarded, stacklevel=2)
    for name in ("model.int8.onnx", "identity.json"):  # the entry's own files, nothing else
        (cached.parent / name).unlink(missing_ok=True)
    return None


def store_result(key: str, dst: Path, identity: dict[str, Any]) -> Path:
    """Keep `dst` in the cache under `key`, with what it was made from (`identity`, see
    `cache_identity`) and its sha256. Each file is written atomically, the graph first: an
    entry cut short has no matching identity and is rebuilt."""
    cached = _cache_dir() / key / "model.int8.onnx"
    with atomic_path(cached) as tmp_cached:
        shutil.copyfile(dst, tmp_cached)
    write_json(cached.parent / "identity.json", {**identity, "int8_sha256": file_sha256(dst)})
    return cached


def to_int8(src: str | Path, dst: str | Path, calib: FeedSet, method: str = "max",
            use_cache: bool = True, seen: RangesSeen | None = None) -> PrecisionReport:
    """Q/DQ INT8 on the matrix products from real clips, then FP16 for the rest (AutoCast).

    `max`: the activation maxima come from this step's own `ActivationRanges` over every
    calibration clip (the FP16 check's clips on every tensor, then the INT8 inputs alone on the
    rest; `seen`, what the FP16 step found on the same graph and clips, spares those first
    passes) and reach ModelOpt as a calibration cache, and to ONNX Runtime's calibrator inside
    ModelOpt as its result (`modelopt_compat.calibrator_from`: no calibration run of ModelOpt's
    own); ModelOpt's scales are checked to be ours. Its GEMV check takes the shapes our passes
    saw (`modelopt_compat.matmul_shapes_from`).
    `entropy`: ModelOpt calibrates on every clip (histograms are its own)."""
    if method not in CALIB_METHODS:
        raise ValueError(f"--calib-method must be one of {CALIB_METHODS}, got {method!r}")
    check_calibration_set(calib)
    require("modelopt.onnx.quantization", "for INT8 Q/DQ (pip install nvidia-modelopt)")
    calibration = {"clips": len(calib.video), "rows": len(calib), "method": method,
                   "data": calib.identity}
    source_sha256 = file_sha256(src)
    key = calibration_key(source_sha256, calib, method)
    identity = cache_identity(key, source_sha256, calib, method)
    cached = cached_result(key, identity, Path(src)) if use_cache else None
    if cached:
        shutil.copyfile(cached, dst)
        report = to_report_from(src, dst, calibration)
        report.cache = f"reused {cached}"
        return report

    with ActivationRanges(src, calib) as ranges:
        if seen is not None:
            ranges.resume(seen)
        steps = _quantize(Path(src), Path(dst), calib, method, ranges, calibration)
        calibration["range_check_clips"] = ranges.rows_done
    report = to_report_from(src, dst, calibration)
    # Stored with or without use_cache: recalibrating (--no-calib-cache) is how a user replaces
    # an entry they distrust, so the fresh result takes its place.
    stored = store_result(key, Path(dst), {**identity, "calibration": calibration})
    report.cache = f"{'stored' if use_cache else 'refreshed'} {stored}"
    report.steps = steps
    report.note = untested_note()
    return report


def _quantize(src: Path, dst: Path, calib: FeedSet, method: str, ranges: ActivationRanges,
              calibration: dict[str, Any]) -> dict[str, float]:
    """ModelOpt Q/DQ, then AutoCast, from `src` to `dst`; the seconds of each sub-step."""
    from modelopt.onnx.quantization import quantize

    onnx = require("onnx", "to read the quantized graph")
    steps: dict[str, float] = {}
    with scratch_directory("twbert-int8-") as tmp:
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
        # ModelOpt appends the matrix products it leaves unquantized (GEMV shapes) to the
        # exclusion list it is given; those stay FP32 in the AutoCast below, as they always did.
        excluded = list(SELECTION_NODES)
        known = calibrator_from(absmax) if scales else contextlib.nullcontext()
        with (quiet_modelopt(), known, matmul_shapes_from(ranges.shapes),
              light_shape_inference(), Stopwatch() as quantizing):
            quantize(str(work), quantize_mode="int8",
                     calibration_data_reader=_RowReader(calib, order),
                     calibration_method=method, calibration_eps=["cpu"],
                     calibration_cache_path=str(scales) if scales else None,
                     op_types_to_quantize=INT8_OP_TYPES, nodes_to_exclude=excluded,
                     high_precision_dtype="fp32", disable_mha_qdq=True, dq_only=True,
                     output_path=str(qdq), log_level="ERROR")
        steps["ModelOpt Q/DQ"] = quantizing.seconds
        if scales:
            calibration["scales_checked"] = check_scales(onnx.load(str(qdq)), absmax)
        fp16 = to_fp16(qdq, Path(tmp) / "model.int8.onnx", ranges, op_types_to_exclude=QDQ_OPS,
                       nodes_kept_fp32=excluded[len(SELECTION_NODES):])
        steps["AutoCast"] = fp16.steps["AutoCast"]
        shutil.copyfile(Path(tmp) / "model.int8.onnx", dst)
    return steps


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
    int8_weights = sum(1 for t in model.graph.initializer
                       if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2)
    return PrecisionReport("int8", selection, by_range, low, total,
                           calibration={**calibration, "quantized_tensors": qdq,
                                        "int8_nodes": len(int8_nodes),
                                        "int8_weights": int8_weights})
