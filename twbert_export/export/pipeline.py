"""The export job: checkpoint -> ONNX -> rewrite -> lint -> precision -> TensorRT 8.x twins ->
TensorRT-RTX build check -> validate -> artifact directory.

`run_export` is the list of stages in order; each is a function beside what it runs (`load`,
`onnx_export`, `split`, `convert`, `verify`, `write`), prints one line (artifact, size, time)
and hands the small dataclasses of `job` to the next. Files are kept by (graph, precision) so
that an artifact can hold more graphs than the whole-model one. The artifact is assembled in a
scratch directory beside the target (`outdir.claim`) and moved into place at the end
(`outdir.move_into_place`): what --out may replace, and how, is `artifact/outdir.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import precision
from ..artifact import outdir
from ..artifact.manifest import MODEL_GRAPH, Manifest, Report
from ..trt.rtx import rtx_stage
from ..util import map_large_allocations, removed_if_stopped, require, signals_deferred
from .convert import lint_stage, precision_stage, trt8_stage
from .job import Conversion, ExportOptions, StageLog
from .load import (check_calibration_clips, data_stage, default_name, load_stage,
                   resolve_inputs)
from .onnx_export import export_stage
from .split import split_export_stage
from .verify import validate_stage
from .write import write_artifacts_stage


def run_export(opts: ExportOptions) -> ExportResult:
    """Run every stage and return the artifact's manifest and report (its gate verdicts
    included: the caller decides the exit code). Raises UserError for bad input."""
    inputs = resolve_inputs(opts)
    if opts.out:  # refused before the checkpoint loads (the default --out needs its schedule)
        outdir.check_claim(Path(opts.out), opts.force)
    stages = StageLog(total=7 + len(inputs.precisions) + (opts.graphs == "both"))
    t_start = time.perf_counter()
    map_large_allocations()  # stages load and free whole models: return them to the system
    loaded = load_stage(inputs, opts, stages)
    check_calibration_clips(inputs, opts, loaded.contract)
    out = Path(opts.out or Path("engines") / default_name(opts.ckpt, opts.task,
                                                            loaded.contract.schedule))
    work = outdir.claim(out, opts.force)
    with removed_if_stopped(work):  # a Ctrl-C or SIGTERM removes the scratch directory
        try:
            conversion = Conversion(plan=inputs.plan)
            export_stage(loaded, work, out, stages, conversion)
            if loaded.graph_contracts:
                split_export_stage(loaded, work, stages, conversion)
            # The weights wait idle until validation: free them for the precision steps (1 GB
            # at the base preset); validate_stage reads them back from the checkpoint file.
            loaded.model.to("meta")
            lint_warnings = lint_stage(conversion, stages)
            val, calib = data_stage(inputs, opts, loaded.contract, stages)
            seen: dict[str, precision.RangesSeen] = {}
            for p in inputs.precisions[1:]:
                precision_stage(p, loaded, conversion, calib, opts, work, out, stages, seen)
            conversion.drop_split_feeds()
            trt8_stage(conversion, work, out, stages)
            # NVIDIA's parser and CPU builder on every file; a refused graph raises RtxGraphError
            rtx_check = rtx_stage(conversion.entries(),
                                  {MODEL_GRAPH: loaded.contract, **loaded.graph_contracts},
                                  precision.SELECTION_NODES, stages,
                                  work if opts.rtx_engines else None, opts.rtx_check)
            validation = validate_stage(loaded, conversion, val, opts, work, out, stages)
            manifest, report = write_artifacts_stage(inputs, loaded, conversion, validation, val,
                                                     calib, lint_warnings, opts, work, stages,
                                                     rtx_check)
            report.total_seconds = time.perf_counter() - t_start
            report.write(work)
            with signals_deferred():  # not stopped half-way
                outdir.move_into_place(work, out, opts.force)
        finally:
            outdir.discard_partial(work)
    return ExportResult(out, manifest, report)


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    report: Report

    @property
    def next_onnx(self) -> Path:
        """The file the next command (an engine build) starts from: the last precision."""
        last = [f for f in self.manifest.entries() if f.graph == MODEL_GRAPH][-1]
        return self.out / last.path


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed"
    try:
        cuda = require("torch", "to look for a GPU").cuda.is_available()
    except ImportError:
        cuda = False
    return (True, "") if cuda else (False, "no CUDA GPU is visible")
