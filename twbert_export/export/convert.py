"""The stages after the export that convert every graph: the TensorRT lint, the precision
steps (FP16 AutoCast, weight-only INT8, INT8 Q/DQ; each split graph calibrated on its own inputs)
and the TensorRT 8.5 / 8.6 twins (none for int8w, which those versions cannot build)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import precision
from ..artifact.manifest import MODEL_GRAPH, SPLIT_GRAPHS, TRT8_FLAVOUR
from ..data.calibration import FeedSet
from ..trt import lint
from ..util import Stopwatch, release_heap
from ..validation import parity as validate
from . import legacy
from .job import SPLIT_FEEDS_DIR, Conversion, ExportOptions, Loaded, StageLog


def lint_stage(conversion: Conversion, stages: StageLog) -> list[Any]:
    with Stopwatch() as sw:
        warnings = [w for (_, p), f in conversion.files.items() if p == "fp32"
                    for w in lint.check_model(f)]
    stages.line("lint", sw.seconds, None,
                f"TensorRT 10 parser: no errors, {len(warnings)} warnings")
    return warnings


def precision_stage(p: str, loaded: Loaded, conversion: Conversion, calib: FeedSet | None,
                    opts: ExportOptions, work: Path, out: Path, stages: StageLog,
                    seen: dict[str, precision.RangesSeen]) -> None:
    """Every graph's fp32 file to precision `p`. `seen`: per graph, the activation ranges an
    earlier precision step found on the same file and clips (spares their forward passes);
    updated with what this step found. A split graph is calibrated on its own inputs as the
    FP32 split graphs upstream compute them from the calibration clips (`split.graph_feeds`).
    With a per-graph plan, only the graphs the plan gives `p` (the whole model: its own
    precision)."""
    assert calib is not None, "resolve_inputs asks for calibration data beyond fp32"
    model_dst, model_rep, first = None, None, None
    with Stopwatch() as sw:
        # The split graphs' rows before the whole model's conversion, whose freed copies leave
        # the heap large (docs/benchmarks.md, "Memory of the base export").
        feeds = (_split_feeds(loaded, conversion, calib, work)
                 if any(q == "fp32" and g != MODEL_GRAPH and conversion.needs(g, p)
                        for g, q in conversion.files) else {})
        for (graph, q), fp32 in list(conversion.files.items()):
            if q != "fp32" or not conversion.needs(graph, p):
                continue
            rows = calib if graph == MODEL_GRAPH else feeds[graph]
            dst = conversion.files[(graph, p)] = work / f"{graph}.{p}.onnx"
            if p in ("fp16", "int8w"):
                convert = precision.to_fp16 if p == "fp16" else precision.to_int8_weights
                with precision.ActivationRanges(fp32, rows) as ranges:
                    if graph in seen:
                        ranges.resume(seen[graph])
                    rep = convert(fp32, dst, ranges)
                    seen[graph] = ranges.seen()
            else:
                rep = precision.to_int8(fp32, dst, rows, opts.calib_method,
                                        use_cache=opts.calib_cache, seen=seen.get(graph))
            first = first or (dst, rep)
            if graph == MODEL_GRAPH:
                model_dst, model_rep = dst, rep
            else:
                conversion.graph_reports[(graph, p)] = rep.to_dict()
    assert first is not None
    # The line reports the whole model's step, or (a plan keeps the model at another
    # precision) the first split graph's, then what the split graphs kept in FP32.
    model_dst, rep = (model_dst, model_rep) if model_rep is not None else first
    rep.seconds = sw.seconds
    if model_rep is not None:
        conversion.reports[p] = rep.to_dict()
    int8 = rep.calibration.get("int8_nodes")
    int8_weights = rep.calibration.get("int8_weights")
    split = [conversion.graph_reports[(g, p)] for g in SPLIT_GRAPHS
             if (g, p) in conversion.graph_reports]
    stages.line(p, sw.seconds, out / model_dst.name,
                (f"{int8} INT8 layers, " if int8 else "")
                + (f"{int8_weights} weights stored INT8, " if int8_weights else "")
                + f"{len(rep.kept_fp32_selection)} selection nodes FP32, "
                f"{len(rep.kept_fp32_range)} other nodes kept FP32 by AutoCast"
                + (f" ({rep.cache.split()[0]} calibration cache)" if rep.cache else "")
                + "".join(f"; {step} {sec:.1f}s" for step, sec in rep.steps.items())
                + (f"; {rep.note}" if rep.note else "")
                + (f"; split graphs: {sum(len(r['kept_fp32_selection']) for r in split)} "
                   f"selection nodes FP32, {sum(len(r['kept_fp32_range']) for r in split)} "
                   "others" if split else "")
                + (f"; the plan's {p} graphs: "
                   + ", ".join(g for g in (MODEL_GRAPH, *SPLIT_GRAPHS) if conversion.needs(g, p))
                   if conversion.plan else ""), model_dst)


def _split_feeds(loaded: Loaded, conversion: Conversion, calib: FeedSet, work: Path
                 ) -> dict[str, Any]:
    """Each split graph's calibration rows, computed once by the FP32 split graphs and kept in
    memory-mapped files under `work` (`Conversion.drop_split_feeds` removes them): at the base
    preset the stems and selected tokens of 64 clips are 1.8 GB, which would otherwise stay
    resident through every whole-model conversion."""
    if conversion.split_feeds is None:
        from ..validation.composed import ComposedSplit, graph_feeds, spilled_feeds

        fp32 = conversion.split_files("fp32")
        assert fp32 is not None
        # Runs of the validation batch (at the base preset, 32 frames, runs of 8 took more
        # than this machine's 24 GB), one graph's session at a time.
        with ComposedSplit(fp32, loaded.graph_contracts, loaded.contract,
                           max_batch=validate.validation_batch(loaded.contract),
                           one_session_at_a_time=True) as pipeline:
            feeds = graph_feeds(pipeline, calib)
        conversion.split_feeds_dir = work / SPLIT_FEEDS_DIR
        conversion.split_feeds = spilled_feeds(feeds, conversion.split_feeds_dir)
        del feeds
        release_heap()
    return conversion.split_feeds


def trt8_stage(conversion: Conversion, work: Path, out: Path, stages: StageLog) -> None:
    """Every default-flavour file (each graph, each precision) to its TensorRT 8.5 / 8.6 twin of
    flavour trt8 (legacy.py), linted for both parsers; validate_stage judges them with the
    same gates as the files they came from."""
    twins = conversion.twins.setdefault(TRT8_FLAVOUR, {})
    with Stopwatch() as sw:
        for key, src in conversion.files.items():
            if key[1] not in legacy.NO_TWIN:
                twins[key] = legacy.write_trt8_twin(src, work)
    shown = list(conversion.of(MODEL_GRAPH, TRT8_FLAVOUR).values())[-1]  # the last precision's
    stages.line(TRT8_FLAVOUR, sw.seconds, out / shown.name, legacy.describe(len(twins)), shown)
