"""NVIDIA's own ONNX parser and builder on every graph we ship: TensorRT for RTX, on the CPU.

TensorRT-RTX (PyPI: `tensorrt-rtx-cu12-libs` + `tensorrt-rtx-cu12-bindings`, module
`tensorrt_rtx_bindings`) parses ONNX and builds engines ahead of time (AOT) without a GPU; its
engines run on RTX-class GPUs (NVIDIA lists compute capability 8.0, 8.6, 8.9, 12.0 and later).
It is not the TensorRT of JetPack or of the data-centre containers, but its ONNX parser is the
same lineage and its networks are strongly typed, as our TensorRT 10/11 builds are. So:

- `build_graphs`: each ONNX file parsed and built with one optimization profile from its I/O
  contract's batch range (min/opt/max). A graph the parser rejects or the builder fails on raises
  `RtxGraphError` with the parser's own message and the node name.
- `audit_network`: TensorRT's own types of the parsed network: the MatMul / Normalization
  output-type histogram, and every layer on the frame-selection path FP32 (`RtxAuditError`
  otherwise). ONNX node names survive as TensorRT layer names, so the selection path is found
  with the same patterns the precision step keeps FP32 (`precision.SELECTION_NODES`, passed in).
- `rtx_stage`: the export's stage: every shipped graph, one line, the results for report.json.

Imports only the standard library, numpy, onnx and the package's artifact/contract/util;
TensorRT-RTX itself lazily (`load_rtx`: None and the reason when it is not installed).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Sequence

from ..artifact.contract import IOContract
from ..artifact.manifest import RTX_ENGINE_SUFFIX, RtxCheck, RtxGraphBuild
from ..util import atomic_path, file_sha256, human_size, write_json

MODULE = "tensorrt_rtx_bindings"
# The two real wheels (the `tensorrt-rtx-cu12` metapackage is an sdist that only re-exports the
# bindings as `tensorrt_rtx`); the versions this module was run with.
TESTED_VERSION = "1.7.1.116"
INSTALL = (f"pip install tensorrt-rtx-cu12-libs=={TESTED_VERSION} "
           f"tensorrt-rtx-cu12-bindings=={TESTED_VERSION}")
# NVIDIA, TensorRT-RTX "CPU-Only AOT and TensorRT-RTX Engines": with no compute capability set
# (as here), an engine runs on GPUs of compute capability 8.0, 8.6, 8.9, 12.0 and later.
DEFAULT_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0")
ENGINE_FORMAT = "twbert-rtx-engine"
# Layer types whose output types the audit counts (TensorRT LayerType names).
HISTOGRAM_LAYERS = {"MATRIX_MULTIPLY": "matmul", "NORMALIZATION": "normalization"}
FLOAT_TYPES = frozenset({"FLOAT", "HALF", "BF16", "FP8", "FP4"})
# What a parser/builder warning means for us, for report.json (pattern -> explanation). A
# warning matching none is reported as unexplained.
WARNING_NOTES = {
    r"Make sure (input|output) .* has Int64 binding": (
        "input_ids, attention_mask and frame_indices_* are int64 in the contract (contract.py) "
        "and every runner binds them as int64: expected, nothing to do"),
    r"operand .*Clip.*_beta payload type requires precision-lose casting": (
        "F.normalize's clamp of the ITC norm: the FP16 graph stores its bound 1e-12 as FP16's "
        "smallest step 2^-24, TensorRT casts that FP32 scalar to the layer's HALF (exact unless "
        "the GPU flushes subnormals); it acts only on a norm below 6e-8, and the smallest "
        "measured is 1.97 (docs/rtx.md, 'The Clip warning')"),
}
# TensorRT prints this when a second builder shares the process-wide logger: not about a graph.
_IGNORED = ("differs from one already registered",)


class RtxGraphError(RuntimeError):
    """TensorRT-RTX's parser rejected a graph, or its builder failed on it: a product defect,
    reported like a failed gate (exit 1, nothing moved into place)."""

    def __init__(self, onnx: str, phase: str, message: str, node: str = "", op: str = ""):
        self.onnx, self.phase, self.message, self.node, self.op = onnx, phase, message, node, op
        where = f" at node {node}" + (f" ({op})" if op else "") if node else ""
        super().__init__(f"{onnx}: TensorRT-RTX {phase} failed{where}: {message}")


class RtxAuditError(RtxGraphError):
    """A layer on the frame-selection path is not FP32 in TensorRT's parsed network."""

    def __init__(self, onnx: str, layers: list[str]):
        self.layers = layers
        more = f" (+{len(layers) - 1} more)" if len(layers) > 1 else ""
        super().__init__(onnx, "type audit", f"selection-path layer not FP32: {layers[0]}{more}",
                         layers[0].split(" ")[0])


def load_rtx() -> tuple[ModuleType | None, str]:
    """(the TensorRT-RTX module, "") or (None, why not) in one line."""
    import importlib

    try:
        return importlib.import_module(MODULE), ""
    except ImportError:
        return None, f"TensorRT-RTX is not installed ({INSTALL})"
    except OSError as e:  # the wheel is there but its libraries did not load
        return None, f"TensorRT-RTX did not load: {' '.join(str(e).split())}"


_LOGGER: Any = None


def _logger(trt: ModuleType) -> Any:
    """The one logger of the process (TensorRT keeps the first a builder was given and ignores
    later ones); each phase reads what it collected in `messages`."""
    global _LOGGER
    if _LOGGER is None:
        class Collecting(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[tuple[str, str]] = []

            def log(self, severity: Any, msg: str) -> None:
                level = str(severity).rsplit(".", 1)[-1]
                if level in ("INTERNAL_ERROR", "ERROR", "WARNING") and \
                        not any(s in msg for s in _IGNORED):
                    self.messages.append((level, msg))

        _LOGGER = Collecting()
    return _LOGGER


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file to check and what to build it for."""
    graph: str
    precision: str
    flavour: str
    path: Path
    contract: IOContract


def engine_name(onnx: str | Path) -> str:
    """model.fp16.onnx -> model.fp16.rtx.engine (model.fp16.trt8.onnx -> model.fp16.trt8...)."""
    return Path(onnx).name.removesuffix(".onnx") + RTX_ENGINE_SUFFIX


# -- parse, audit, build --------------------------------------------------------------------------
@contextlib.contextmanager
def _native_output(lines: list[str]) -> Iterator[None]:
    """Collect what the TensorRT-RTX libraries print past the logger, to the process's stdout
    or stderr (file descriptors 1 and 2: "WARNING: in op /model/Clip_min, operand ...
    precision-lose casting", "Unsupported ONNX data type: INT16 (5)"), into `lines`, instead of
    letting it interleave with the stage lines."""
    import ctypes
    import os
    import sys
    import tempfile

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            libc.fflush(None)  # C++ streams synced with stdio write through it
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            lines += [line.strip() for line in sink.read().decode(errors="replace").splitlines()
                      if line.strip()]


def _dtype(value: Any) -> str:
    """'DataType.HALF' / 'LayerType.MATRIX_MULTIPLY' -> 'HALF' / 'MATRIX_MULTIPLY'."""
    return str(value).rsplit(".", 1)[-1]


def _printed(lines: list[str]) -> list[tuple[str, str]]:
    """Lines the libraries printed, as logger messages ('WARNING: x' -> ('WARNING', 'x'))."""
    out = []
    for line in lines:
        level, _, text = line.partition(": ")
        out.append((level, text) if level in ("WARNING", "ERROR") and text else ("WARNING", line))
    return out


def _warnings(messages: list[tuple[str, str]]) -> list[str]:
    """Distinct warnings in order, each with its count when repeated."""
    counts: dict[str, int] = {}
    for level, msg in messages:
        if level == "WARNING":
            text = " ".join(msg.split())
            counts[text] = counts.get(text, 0) + 1
    return [f"{w} (x{n})" if n > 1 else w for w, n in counts.items()]


def parse(trt: ModuleType, path: Path) -> tuple[Any, Any, Any, list[str]]:
    """(builder, network, parser, warnings) of an ONNX file; RtxGraphError with the parser's
    own message and node when it refuses the graph."""
    log = _logger(trt)
    log.messages = []
    builder = trt.Builder(log)
    network = builder.create_network(0)  # strongly typed: TensorRT-RTX's only mode
    parser = trt.OnnxParser(network, log)
    printed: list[str] = []
    with _native_output(printed):
        parsed = parser.parse_from_file(str(path))
    log.messages += _printed(printed)
    if not parsed:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        logged = [" ".join(m.split()) for level, m in log.messages if level != "WARNING"]
        detail = next((m.split("ERROR: ", 1)[1] for m in logged if "ERROR: " in m), "")
        message = (f"{_dtype(first.code())}: {first.desc()}" if first else "parse failed")
        if detail:
            message += f" [{detail}]"
        raise RtxGraphError(path.name, "ONNX parse", message,
                            first.node_name() if first else "",
                            first.node_operator() if first else "")
    return builder, network, parser, _warnings(log.messages)


def audit_network(network: Any, selection: Sequence[str]) -> dict[str, Any]:
    """TensorRT's types of a parsed network: per HISTOGRAM_LAYERS kind, output type -> layers;
    the Quantize/Dequantize layers; the layers on the selection path (name matches a
    `selection` pattern) and those of them with a floating-point output that is not FLOAT."""
    histogram: dict[str, dict[str, int]] = {kind: {} for kind in HISTOGRAM_LAYERS.values()}
    on_path, qdq, not_fp32 = 0, 0, []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = _dtype(layer.type)
        types = [_dtype(layer.get_output(j).dtype) for j in range(layer.num_outputs)]
        qdq += kind in ("QUANTIZE", "DEQUANTIZE")
        if kind in HISTOGRAM_LAYERS and types:
            counts = histogram[HISTOGRAM_LAYERS[kind]]
            counts[types[0]] = counts.get(types[0], 0) + 1
        if any(re.match(p, layer.name) for p in selection):
            on_path += 1
            low = [t for t in types if t in FLOAT_TYPES and t != "FLOAT"]
            if low:
                not_fp32.append(f"{layer.name} ({kind}): {', '.join(low)}")
    return {**histogram, "qdq_layers": qdq, "selection_layers": on_path,
            "selection_not_fp32": not_fp32}


def build(trt: ModuleType, builder: Any, network: Any, contract: IOContract, onnx: str
          ) -> tuple[Any, list[str]]:
    """The serialized engine (one profile: the contract's batch min/opt/max) and the builder's
    warnings; RtxGraphError with the builder's first error when it fails."""
    log = _logger(trt)
    log.messages = []
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in contract.profile_shapes().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    printed: list[str] = []
    with _native_output(printed):
        engine = builder.build_serialized_network(network, config)
    log.messages += _printed(printed)
    if engine is None:
        errors = [" ".join(m.split()) for level, m in log.messages if level != "WARNING"]
        message = errors[0] if errors else "build_serialized_network returned nothing"
        node = re.search(r"(/[\w./-]+)", message)
        raise RtxGraphError(onnx, "engine build", message, node.group(1) if node else "")
    return engine, _warnings(log.messages)


def check_graph(trt: ModuleType, spec: GraphSpec, selection: Sequence[str] = (),
                engines: Path | None = None) -> RtxGraphBuild:
    """Parse, audit and build one graph; with `engines`, write its engine and sidecar there.
    Raises RtxGraphError (parser or builder) or RtxAuditError (selection path not FP32)."""
    t0 = time.perf_counter()
    builder, network, parser, parser_warnings = parse(trt, spec.path)
    audit = audit_network(network, selection)
    t1 = time.perf_counter()
    result = RtxGraphBuild(spec.graph, spec.precision, spec.flavour, spec.path.name, False,
                           parse_seconds=t1 - t0, parser_warnings=parser_warnings, **audit)
    if audit["selection_not_fp32"]:
        raise RtxAuditError(spec.path.name, audit["selection_not_fp32"])
    engine, result.builder_warnings = build(trt, builder, network, spec.contract, spec.path.name)
    result.build_seconds = time.perf_counter() - t1
    result.built, result.engine_bytes = True, int(engine.nbytes)
    if engines is not None:
        result.engine = write_engine(engines, spec, engine, trt.__version__)
    del parser, network, builder
    return result


def write_engine(directory: Path, spec: GraphSpec, engine: Any, version: str) -> str:
    """<onnx stem>.rtx.engine, as TensorRT-RTX wrote it, and beside it <engine>.json: what built
    it and where it runs. Both written atomically."""
    name = engine_name(spec.path)
    with atomic_path(directory / name) as tmp:
        tmp.write_bytes(memoryview(engine))
    write_json(directory / f"{name}.json", {
        "format": ENGINE_FORMAT, "engine": name, "onnx": spec.path.name,
        "onnx_sha256": file_sha256(spec.path), "graph": spec.graph,
        "precision": spec.precision, "flavour": spec.flavour,
        "tensorrt_rtx_version": version,
        "build": "TensorRT-RTX ahead-of-time (AOT) build on the CPU, no GPU",
        "compute_capabilities": list(DEFAULT_COMPUTE_CAPABILITIES),
        "compute_capabilities_note": "NVIDIA's default for an AOT build with none set: these "
                                     "and later; the just-in-time phase runs on the GPU",
        "profile_shapes": {n: [list(s) for s in shapes]
                           for n, shapes in spec.contract.profile_shapes().items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return name


def build_graphs(specs: Iterable[GraphSpec], selection: Sequence[str] = (),
                 engines: Path | None = None, trt: ModuleType | None = None,
                 int8_may_fail: bool = True) -> list[RtxGraphBuild]:
    """Every graph in turn (one at a time: a build holds the network and the engine in memory).
    With `int8_may_fail`, an INT8 graph TensorRT-RTX cannot parse or build is recorded as not
    built with the reason (NVIDIA lists INT8 as weight-only GEMM for TensorRT-RTX) instead of
    raising; the audit still applies to whatever it parsed."""
    if trt is None:
        trt, why = load_rtx()
        if trt is None:
            raise ImportError(why)
    results = []
    for spec in specs:
        try:
            results.append(check_graph(trt, spec, selection, engines))
        except RtxAuditError:
            raise
        except RtxGraphError as e:
            if not (int8_may_fail and spec.precision == "int8"):
                raise
            results.append(RtxGraphBuild(spec.graph, spec.precision, spec.flavour,
                                         spec.path.name, False, note=str(e)))
    return results


def explain_warnings(results: Iterable[RtxGraphBuild]) -> dict[str, str]:
    """Each distinct warning (counts dropped) -> what it means (WARNING_NOTES), or that it is
    not explained yet."""
    notes: dict[str, str] = {}
    for r in results:
        for w in (*r.parser_warnings, *r.builder_warnings):
            text = re.sub(r" \(x\d+\)$", "", w)
            notes.setdefault(text, next((n for p, n in WARNING_NOTES.items()
                                         if re.search(p, text)), "not explained yet"))
    return notes


# -- the export's stage ----------------------------------------------------------------------------
def rtx_stage(entries: Iterable[tuple[str, str, str, Path]], contracts: dict[str, IOContract],
              selection: Sequence[str], stages: Any, engines: Path | None = None,
              asked: bool = True) -> RtxCheck:
    """The export's TensorRT-RTX stage over (graph, precision, flavour, file) entries, with
    each graph's contract. One line on `stages` (a pipeline.StageLog); raises RtxGraphError /
    RtxAuditError for a graph NVIDIA's parser or builder refuses (INT8 excepted, see
    build_graphs). `asked` False: the line says it was skipped, and nothing runs."""
    trt, why = load_rtx() if asked else (None, "not asked for (ExportOptions.rtx_check)")
    if trt is None:
        stages.line("rtx", 0.0, None, f"skipped: {why}")
        return RtxCheck(ran=False, reason=why)
    specs = [GraphSpec(g, p, fl, f, contracts[g]) for g, p, fl, f in entries]
    t0 = time.perf_counter()
    results = build_graphs(specs, selection, engines, trt)
    seconds = time.perf_counter() - t0
    stages.line("rtx", seconds, None, summary_line(results, trt.__version__))
    return RtxCheck(ran=True, version=trt.__version__, graphs=results,
                    warnings=explain_warnings(results))


def summary_line(results: list[RtxGraphBuild], version: str) -> str:
    """'TensorRT-RTX 1.7.1.116 CPU build: 20/20 graphs, engines 1.2 MB..21.3 MB (model.fp16 ...),
    selection path FP32 in all; 2 warning kinds'."""
    built = [r for r in results if r.built]
    line = f"TensorRT-RTX {version} CPU build: {len(built)}/{len(results)} graphs built"
    if built:
        total = sum(r.engine_bytes for r in built)
        big = max(built, key=lambda r: r.engine_bytes)
        line += (f", engines {human_size(total)} in all (largest {Path(big.onnx).stem} "
                 f"{human_size(big.engine_bytes)})")
    refused = sorted({r.precision for r in results if not r.built})
    if refused:
        line += f"; not built: {', '.join(refused)} (see report.md)"
    line += f"; selection path FP32 in {sum(not r.selection_not_fp32 for r in results)} graphs"
    return line


def engine_sidecar(engine: str | Path) -> dict[str, Any]:
    """The sidecar of an .rtx.engine (ValueError when it is missing or not ours)."""
    path = Path(f"{engine}.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: the TensorRT-RTX engine's sidecar is unreadable ({e})") \
            from None
    if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
        raise ValueError(f"{path}: not a TensorRT-RTX engine sidecar of ours")
    return data


# -- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m twbert_export.trt.rtx ARTIFACT_DIR [--only NAME ...] [--engines]`: the
    export's check on an existing artifact. Exit 0 every graph built (INT8 may be refused),
    1 a graph refused or the audit failed, 2 bad input or TensorRT-RTX missing (one line)."""
    import argparse
    import sys

    from ..artifact.manifest import Manifest

    ap = argparse.ArgumentParser(prog="python -m twbert_export.trt.rtx", description=main.__doc__)
    ap.add_argument("artifact", help="artifact directory (manifest.json)")
    ap.add_argument("--only", action="append", default=[], metavar="FILE",
                    help="only these ONNX files of the artifact (e.g. model.fp16.onnx)")
    ap.add_argument("--selection", action="append", default=[], metavar="REGEX",
                    help="selection-path layer names (default: the precision step's)")
    ap.add_argument("--engines", action="store_true",
                    help="keep the engines (<file>.rtx.engine + .json) in the artifact directory")
    args = ap.parse_args(argv)
    try:
        manifest = Manifest.load(args.artifact)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trt, why = load_rtx()
    if trt is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    directory = Path(args.artifact)
    files = [f for f in manifest.files if not args.only or f.path in args.only]
    if args.only and len(files) != len(set(args.only)):
        missing = sorted(set(args.only) - {f.path for f in files})
        print(f"error: not in {directory / 'manifest.json'}: {', '.join(missing)}",
              file=sys.stderr)
        return 2
    if args.selection:
        selection: Sequence[str] = args.selection
    else:
        from ..artifact.contract import SELECTION_NODES

        selection = SELECTION_NODES
    results = []
    try:
        for f in files:
            spec = GraphSpec(f.graph, f.precision, f.flavour, directory / f.path,
                             manifest.contract_of(f.graph))
            r = build_graphs([spec], selection, directory if args.engines else None, trt)[0]
            results.append(r)
            print(f"{r.onnx:<28} {'built' if r.built else 'NOT BUILT'} parse "
                  f"{r.parse_seconds:5.1f}s build {r.build_seconds:5.1f}s "
                  f"{human_size(r.engine_bytes):>9}  MatMul {r.matmul} Normalization "
                  f"{r.normalization} Q/DQ {r.qdq_layers} selection {r.selection_layers} "
                  f"layers, not FP32: {len(r.selection_not_fp32)}"
                  + (f"  ({r.note})" if r.note else ""), flush=True)
            for w in (*r.parser_warnings, *r.builder_warnings):
                print(f"  warning: {w}")
    except RtxGraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_line(results, trt.__version__))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
